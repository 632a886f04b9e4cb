"""Storage helpers without a server: key safety, sample names, ranges, ETags, local backend."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from medprep import storage
from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.common.settings import sample_name_pattern
from medprep.storage import layout, local
from medprep.storage.s3_listing import RemoteObject, parent_prefix, select_for_key
from medprep.storage.s3_transfer import describe_local, file_part_md5s, multipart_etag


@pytest.mark.parametrize("key", ["a.dcm", "series/0001.dcm", "a..b/c", ".hidden"])
def test_plain_relative_keys_are_accepted(key):
    assert storage.check_relative_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["../evil", "a/../../evil", "/etc/passwd", "a//b", "a/./b", "", "..", "a\x00b", "..\\evil"],
)
def test_keys_that_could_leave_the_folder_are_refused(key):
    with pytest.raises(ValueError):
        storage.check_relative_key(key)


LONG_NAME = "".join(f"s{i}" for i in range(100))  # 290 characters, cut to 128


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("S1", "S1"),
        ("patient 7", "patient_7"),
        ("_x-1.2", "x-1.2"),
        ("a/b:c", "a_b_c"),
        (LONG_NAME, LONG_NAME[:128]),
    ],
)
def test_sample_names_are_made_safe(raw, name):
    assert storage.safe_sample_name(raw) == name
    assert re.fullmatch(sample_name_pattern(), name)


@pytest.mark.parametrize("raw", ["", "___", "..", "é"])
def test_names_with_nothing_usable_are_refused(raw):
    with pytest.raises(InputError, match="cannot make a sample name"):
        storage.safe_sample_name(raw, where="s3://b/x")


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("A1.svs", "A1"),
        ("b.ome.tiff", "b"),
        ("C.TIF", "C"),
        ("notes.txt", None),
        (".svs", None),
        ("x.mrxs", None),
    ],
)
def test_slide_stems(name, stem):
    assert storage.slide_stem(name) == stem


def test_hidden_and_clutter_files_are_not_data():
    assert storage.is_hidden(".DS_Store")
    assert storage.is_hidden("sub/.git/x")
    assert storage.is_hidden("Thumbs.db")
    assert not storage.is_hidden("0001.dcm")
    assert not storage.is_hidden("../x")  # refused as hostile, never silently skipped


def test_local_digests_match_whole_and_per_part(tmp_path):
    data = os.urandom(5 * 1024 * 1024 * 2 + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    part = 5 * 1024 * 1024
    described = describe_local("f.bin", str(path), part)
    assert described.size == len(data)
    assert described.sha256 == hashlib.sha256(data).hexdigest()
    expected_parts = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]
    assert described.part_md5s == expected_parts
    assert described.multipart
    assert described.expected_etag == multipart_etag(expected_parts)
    assert file_part_md5s(path, part) == expected_parts


def test_small_and_empty_files_are_single_puts(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "s").write_bytes(b"abc")
    empty = describe_local("e", str(tmp_path / "e"), 1 << 20)
    small = describe_local("s", str(tmp_path / "s"), 1 << 20)
    assert not empty.multipart and empty.expected_etag == hashlib.md5(b"").hexdigest()
    assert not small.multipart and small.expected_etag == hashlib.md5(b"abc").hexdigest()


def _obj(key):
    return RemoteObject(key, 1, "e", "t")


def test_a_uri_without_slash_is_the_object_or_its_folder_never_a_sibling():
    objects = [_obj(k) for k in ["ct/S1.bak", "ct/S1/a.dcm", "ct/S1/sub/b.dcm", "ct/S10/a.dcm"]]
    assert [o.key for o in select_for_key(objects, "ct/S1")] == ["ct/S1/a.dcm", "ct/S1/sub/b.dcm"]
    assert [o.key for o in select_for_key(objects, "ct/S1/")] == ["ct/S1/a.dcm", "ct/S1/sub/b.dcm"]
    slide = [_obj("wsi/a.svs"), _obj("wsi/a.svs.bak")]
    assert [o.key for o in select_for_key(slide, "wsi/a.svs")] == ["wsi/a.svs"]


def test_parent_prefix():
    assert parent_prefix("ct/S1/") == "ct/"
    assert parent_prefix("ct/S1") == "ct/"
    assert parent_prefix("a.svs") == ""


# ---------------------------------------------------------------- local backend


def test_local_discover_makes_safe_names_and_keeps_only_slides(tmp_path):
    for name in ["A 1.svs", "B.tiff", "notes.txt", ".hidden.svs"]:
        (tmp_path / name).write_bytes(b"x")
    found = storage.discover(str(tmp_path), "wsi")
    assert [s["sample"] for s in found] == ["A_1", "B"]
    assert found[0]["fingerprint"] == storage.source_fingerprint(found[0]["uri"])


def test_local_discover_refuses_two_sources_with_one_name(tmp_path):
    (tmp_path / "a b").mkdir()
    (tmp_path / "a_b").mkdir()
    with pytest.raises(InputError, match="two samples would be named a_b"):
        local.discover(str(tmp_path), "ct", {})


def test_files_fingerprint_equals_source_fingerprint_for_local_inputs(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "1.dcm").write_bytes(b"1")
    (tmp_path / "s" / "2.dcm").write_bytes(b"22")
    files = storage.fetch(str(tmp_path / "s"), tmp_path / "unused")
    assert storage.files_fingerprint(files) == storage.source_fingerprint(str(tmp_path / "s"))


def test_local_publish_writes_manifest_last_and_skips_identical(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"data")
    destination = tmp_path / "pub" / "wsi" / "S1"
    artifacts = [{"name": "a.bin", "path": str(source)}]
    first = storage.publish(artifacts, str(destination), manifest={"sample": "S1"})
    second = storage.publish(artifacts, str(destination), manifest={"sample": "S1"})
    assert [f["action"] for f in first["files"]] == [
        "linked"
    ]  # same file system: a hard link, no second copy
    assert [f["action"] for f in second["files"]] == ["skipped"]
    published = atomic.read_json(destination / "manifest.json")
    checksum = hashlib.sha256(b"data").hexdigest()
    version = layout.version_of([("a.bin", checksum)])
    assert published["version"] == first["version"] == version
    assert published["files"] == [
        {"name": "a.bin", "path": f"{version}/a.bin", "bytes": 4, "sha256": checksum}
    ]
    assert (destination / version / "a.bin").read_bytes() == b"data"
    assert sorted(p.name for p in destination.iterdir()) == ["manifest.json", version]
