"""The S3 backend against a real S3-compatible server (moto_server in its own process).

Faults come from a real HTTP proxy process in front of the server (tests/s3_support.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_support import (
    FaultProxy,
    free_port,
)
from workflow_support import make_artifacts

from medprep import storage
from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.common.redact import RedactingFilter
from medprep.storage import layout, s3_listing
from medprep.storage.s3 import DOWNLOAD_STATE, StorageUnavailable
from medprep.storage.s3_connect import TransferCorrupt
from medprep.storage.s3_listing import RemoteObject
from medprep.storage.s3_transfer import (
    Download,
    RemoteChanged,
    describe_local,
    download,
    stored_etag,
    upload,
)

MB = 1024 * 1024
PART_MB = 5  # S3's minimum part size: objects above it go in ranges / multipart


@pytest.fixture(scope="module")
def counting_proxy(moto_server):
    """A proxy without faults: its request counts show what a call cost."""
    with FaultProxy(moto_server.url) as proxy:
        yield proxy


@pytest.fixture
def settings(moto_server):
    return {
        "endpoint_url": moto_server.url,
        "region": "us-east-1",
        "part_size_mb": PART_MB,
        "max_attempts": 6,
    }


def put_series(s3, bucket, prefix, count, size=3000, seed=0):
    """A fake DICOM series: ``count`` objects of random bytes; returns key -> bytes."""
    rng = __import__("random").Random(seed)
    objects = {}
    for index in range(count):
        key = f"{prefix}{index:04d}.dcm"
        objects[key] = rng.randbytes(size)
        s3.put_object(Bucket=bucket, Key=key, Body=objects[key])
    return objects


def put_multipart(s3, bucket, key, data, part=PART_MB * MB):
    """Upload ``data`` the way other tools do: multipart, no medprep metadata."""
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), part), start=1):
        etag = s3.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=data[start : start + part],
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )


def requests_made(proxy, since):
    return proxy.stats()["requests"] - since


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------- download


def test_fetch_downloads_a_series_verified_and_describes_it(s3, bucket, settings, tmp_path):
    series = put_series(s3, bucket, "ct/S1/", 25)
    s3.put_object(Bucket=bucket, Key="ct/S1/sub/extra.dcm", Body=b"nested")
    s3.put_object(Bucket=bucket, Key="ct/S1/.DS_Store", Body=b"clutter")
    s3.put_object(Bucket=bucket, Key="ct/S1/folder/", Body=b"")  # a console-made "folder"
    s3.put_object(Bucket=bucket, Key="ct/S10/0000.dcm", Body=b"another sample")

    files = storage.fetch(
        f"s3://{bucket}/ct/S1", tmp_path / "download", threads=4, settings=settings
    )

    assert [f.key for f in files] == sorted(
        [k.removeprefix("ct/S1/") for k in series] + ["sub/extra.dcm"]
    )
    on_disk = local_files(tmp_path / "download")
    assert set(on_disk) == {f.key for f in files} | {DOWNLOAD_STATE}
    for key, data in series.items():
        assert on_disk[key.removeprefix("ct/S1/")] == data
    first = files[0]
    assert first.bytes == 3000
    assert first.etag == hashlib.md5(series["ct/S1/0000.dcm"]).hexdigest()
    assert first.last_modified and first.verified == "md5"
    assert Path(first.path).is_absolute()


def test_a_large_object_comes_in_ranges_checked_against_its_multipart_etag(
    s3, bucket, settings, tmp_path
):
    data = os.urandom(12 * MB + 77)
    put_multipart(s3, bucket, "wsi/slide.svs", data)

    files = storage.fetch(
        f"s3://{bucket}/wsi/slide.svs", tmp_path / "d", threads=4, settings=settings
    )

    assert [(f.key, f.bytes, f.verified) for f in files] == [
        ("slide.svs", len(data), "multipart-md5")
    ]
    assert (
        hashlib.sha256(Path(files[0].path).read_bytes()).digest() == hashlib.sha256(data).digest()
    )
    assert files[0].etag.endswith("-3")


def test_rerun_downloads_only_changed_objects_and_drops_deleted_ones(
    s3, bucket, settings, tmp_path
):
    put_series(s3, bucket, "ct/S1/", 6)
    target = tmp_path / "d"
    storage.fetch(f"s3://{bucket}/ct/S1/", target, threads=2, settings=settings)
    inodes = {p.name: p.stat().st_ino for p in target.iterdir()}

    s3.put_object(Bucket=bucket, Key="ct/S1/0001.dcm", Body=b"changed")
    s3.delete_object(Bucket=bucket, Key="ct/S1/0002.dcm")
    s3.put_object(Bucket=bucket, Key="ct/S1/0100.dcm", Body=b"new")
    files = storage.fetch(f"s3://{bucket}/ct/S1/", target, threads=2, settings=settings)

    assert [f.key for f in files] == [
        "0000.dcm",
        "0001.dcm",
        "0003.dcm",
        "0004.dcm",
        "0005.dcm",
        "0100.dcm",
    ]
    assert (target / "0001.dcm").read_bytes() == b"changed"
    assert not (target / "0002.dcm").exists()
    # unchanged objects were kept (same file), the changed one was replaced
    for name in ["0000.dcm", "0003.dcm", "0004.dcm", "0005.dcm"]:
        assert (target / name).stat().st_ino == inodes[name]
    assert (target / "0001.dcm").stat().st_ino != inodes["0001.dcm"]
    assert not [p for p in target.iterdir() if ".tmp-" in p.name]


def test_a_local_file_touched_after_download_is_downloaded_again(s3, bucket, settings, tmp_path):
    put_series(s3, bucket, "ct/S1/", 2)
    target = tmp_path / "d"
    storage.fetch(f"s3://{bucket}/ct/S1/", target, threads=1, settings=settings)
    (target / "0000.dcm").write_bytes(b"x" * 3000)  # same size, different content

    storage.fetch(f"s3://{bucket}/ct/S1/", target, threads=1, settings=settings)

    assert (target / "0000.dcm").read_bytes() == s3.get_object(Bucket=bucket, Key="ct/S1/0000.dcm")[
        "Body"
    ].read()


@pytest.mark.parametrize(
    "hostile", ["ct/S1/../../../escaped.txt", "ct/S1//etc/escaped.txt", "ct/S1/a/./b.dcm"]
)
def test_keys_that_would_escape_the_folder_are_refused(s3, bucket, settings, tmp_path, hostile):
    put_series(s3, bucket, "ct/S1/", 2)
    s3.put_object(Bucket=bucket, Key=hostile, Body=b"gotcha")
    assert any(o["Key"] == hostile for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    target = tmp_path / "deep" / "er" / "download"

    with pytest.raises(InputError, match="refusing object key") as refused:
        storage.fetch(f"s3://{bucket}/ct/S1/", target, threads=2, settings=settings)

    assert hostile in str(refused.value)
    assert not [p for p in (tmp_path / "deep").rglob("*") if p.is_file()], "nothing may be written"
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not Path("/etc/escaped.txt").exists()


def test_missing_bucket_and_empty_prefix_are_input_errors(bucket, settings, tmp_path):
    with pytest.raises(InputError, match="bucket does not exist"):
        storage.fetch("s3://no-such-bucket-medprep/ct/S1/", tmp_path, threads=1, settings=settings)
    with pytest.raises(InputError, match="no objects"):
        storage.fetch(f"s3://{bucket}/ct/none/", tmp_path, threads=1, settings=settings)


def test_an_object_overwritten_during_download_fails_instead_of_mixing(
    s3, bucket, settings, tmp_path
):
    s3.put_object(Bucket=bucket, Key="a.dcm", Body=b"old")
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"][0]
    stale = RemoteObject("a.dcm", 3, listed["ETag"].strip('"'), "t")
    s3.put_object(Bucket=bucket, Key="a.dcm", Body=b"new")
    item = Download(bucket, stale, tmp_path / "a.dcm", tmp_path / ".a.dcm.tmp")

    with pytest.raises(RemoteChanged):
        download(storage.s3_connect.client(settings), [item], settings, threads=1)
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / ".a.dcm.tmp").exists()


def test_a_download_costs_one_get_per_small_object_and_one_head_per_large_one(
    s3, bucket, counting_proxy, settings, tmp_path
):
    put_series(s3, bucket, "ct/S1/", 6)
    big = make_artifacts(tmp_path / "art", {"slide.svs": 11 * MB})
    receipt = storage.publish(
        big, f"s3://{bucket}/wsi/S2", manifest={}, threads=2, settings=settings
    )
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}

    start = len(counting_proxy.stats()["history"])
    files = storage.fetch(f"s3://{bucket}/ct/S1/", tmp_path / "ct", threads=4, settings=via_proxy)
    methods = [m for m, _, _ in counting_proxy.stats()["history"][start:]]
    assert sorted(methods) == ["GET"] * 7  # the listing, then one GET per object, no HEAD
    assert {f.verified for f in files} == {"md5"}

    start = len(counting_proxy.stats()["history"])
    slide = storage.fetch(
        f"s3://{bucket}/wsi/S2/{receipt['files'][0]['path']}",
        tmp_path / "wsi",
        threads=4,
        settings=via_proxy,
    )
    methods = [m for m, _, _ in counting_proxy.stats()["history"][start:]]
    # the listing, three ranges of 5 MB, one HEAD for the checksum of a multipart object
    assert sorted(methods) == ["GET"] * 4 + ["HEAD"]
    # by the SHA-256 metadata when the part HEAD carries it, else by the recomputed ETag
    # (moto's answer has no metadata)
    assert slide[0].verified in {"sha256", "multipart-md5"}
    assert Path(slide[0].path).read_bytes() == Path(big[0]["path"]).read_bytes()


def test_a_failed_download_is_one_line_naming_the_object_and_leaves_nothing(
    s3, bucket, settings, tmp_path
):
    s3.put_object(Bucket=bucket, Key="ct/S1/a.dcm", Body=b"abc")
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"][0]
    gone = RemoteObject("ct/S1/a.dcm", 3, listed["ETag"].strip('"'), "t")
    s3.delete_object(Bucket=bucket, Key="ct/S1/a.dcm")  # deleted after the listing
    folder = tmp_path / "download"
    folder.mkdir()
    item = Download(bucket, gone, folder / "a.dcm", folder / ".a.dcm.tmp")

    with pytest.raises(InputError) as failed:
        download(storage.s3_connect.client(settings), [item], settings, threads=1)

    line = str(failed.value)
    assert "\n" not in line and f"s3://{bucket}/ct/S1/a.dcm" in line
    assert "download failed" in line and "NoSuchKey" in line
    assert list(folder.iterdir()) == []


def test_an_upload_is_checked_against_what_the_store_holds(s3, bucket, settings, tmp_path):
    artifacts = make_artifacts(tmp_path, {"a.npy": 3000})
    local = describe_local("a.npy", artifacts[0]["path"], PART_MB * MB)
    client = storage.s3_connect.client(settings)
    s3.put_object(Bucket=bucket, Key="p/a.npy", Body=Path(local.path).read_bytes())
    with pytest.raises(TransferCorrupt, match="lacks the SHA-256"):
        stored_etag(client, bucket, "p/a.npy", local)  # same bytes, but not medprep's upload
    s3.put_object(
        Bucket=bucket, Key="p/a.npy", Body=b"x" * local.size, Metadata={"sha256": local.sha256}
    )
    with pytest.raises(TransferCorrupt, match="ETag"):
        stored_etag(client, bucket, "p/a.npy", local)  # the checksum claimed, other bytes

    etags = upload(client, bucket, "p/", [local], settings, threads=2)

    assert etags == {"a.npy": local.expected_etag}
    assert stored_etag(client, bucket, "p/a.npy", local) == local.expected_etag


# ---------------------------------------------------------------- fingerprints, listings, discovery


def test_fingerprint_follows_etag_and_size_not_upload_time(s3, bucket, settings):
    put_series(s3, bucket, "ct/S1/", 3)
    uri = f"s3://{bucket}/ct/S1/"
    before = storage.source_fingerprint(uri, settings)
    storage.clear_caches()
    first = s3.get_object(Bucket=bucket, Key="ct/S1/0001.dcm")
    data = first["Body"].read()
    time.sleep(1.1)  # a new LastModified (second resolution)
    s3.put_object(Bucket=bucket, Key="ct/S1/0001.dcm", Body=data)
    assert (
        s3.head_object(Bucket=bucket, Key="ct/S1/0001.dcm")["LastModified"] > first["LastModified"]
    )
    assert storage.source_fingerprint(uri, settings) == before
    storage.clear_caches()
    s3.put_object(Bucket=bucket, Key="ct/S1/0001.dcm", Body=data[::-1])
    assert storage.source_fingerprint(uri, settings) != before
    assert storage.source_fingerprint(f"s3://{bucket}/ct/none/", settings) == "missing"
    assert storage.source_fingerprint("s3://no-such-bucket-medprep/x/", settings) == "missing"


def test_fingerprint_of_fetched_files_equals_the_source_fingerprint(s3, bucket, settings, tmp_path):
    put_series(s3, bucket, "ct/S1/", 4)
    uri = f"s3://{bucket}/ct/S1"
    files = storage.fetch(uri, tmp_path, threads=2, settings=settings)
    assert storage.files_fingerprint(files) == storage.source_fingerprint(uri, settings)


def test_an_unreachable_store_raises_rather_than_changing_every_fingerprint(settings):
    closed = {**settings, "endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1}
    with pytest.raises(StorageUnavailable, match="cannot list"):
        storage.source_fingerprint("s3://any-bucket/ct/S1/", closed)


def test_a_primed_listing_answers_every_fingerprint_without_a_request(
    s3, bucket, counting_proxy, settings
):
    for sample in range(12):
        put_series(s3, bucket, f"ct/P{sample:02d}/", 3, seed=sample)
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}
    uris = [f"s3://{bucket}/ct/P{sample:02d}/" for sample in range(12)]
    unprimed = [storage.source_fingerprint(uri, via_proxy) for uri in uris]
    storage.clear_caches()

    start = counting_proxy.stats()["requests"]
    assert storage.prime_listing(f"s3://{bucket}/ct/", via_proxy)
    assert requests_made(counting_proxy, start) == 1
    start = counting_proxy.stats()["requests"]
    primed = [storage.source_fingerprint(uri, via_proxy) for uri in uris]
    assert requests_made(counting_proxy, start) == 0
    assert primed == unprimed


def test_expected_sources_list_their_parent_once(s3, bucket, counting_proxy, settings):
    for sample in range(12):
        put_series(s3, bucket, f"ct/P{sample:02d}/", 2, seed=sample)
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}
    uris = [f"s3://{bucket}/ct/P{sample:02d}/" for sample in range(12)]
    storage.expect_sources(uris, via_proxy)

    start = counting_proxy.stats()["requests"]
    [storage.source_fingerprint(uri, via_proxy) for uri in uris]
    # the first sample alone, then one listing of ct/ for the other eleven
    assert requests_made(counting_proxy, start) == 2


def test_priming_gives_up_when_the_parent_holds_too_much_else(
    s3, bucket, counting_proxy, settings, monkeypatch
):
    monkeypatch.setattr(s3_listing, "PAGE_SIZE", 2)
    put_series(s3, bucket, "ct/A/", 1)
    put_series(s3, bucket, "ct/B/", 1)
    put_series(s3, bucket, "ct/other/", 8)  # 10 objects: 5 pages, more than the 2 samples
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}
    uris = [f"s3://{bucket}/ct/A/", f"s3://{bucket}/ct/B/"]
    storage.expect_sources(uris, via_proxy)

    start = counting_proxy.stats()["requests"]
    fingerprints = [storage.source_fingerprint(uri, via_proxy) for uri in uris]
    # A alone (1), an abandoned listing of ct/ (2 pages), B alone (1)
    assert requests_made(counting_proxy, start) == 4
    assert "missing" not in fingerprints


def test_discover_ct_one_sample_per_sub_prefix(s3, bucket, settings):
    put_series(s3, bucket, "archive/ct/S1/", 2)
    put_series(s3, bucket, "archive/ct/patient 7/study/", 2)
    put_series(s3, bucket, "archive/ct/.trash/", 1)
    s3.put_object(Bucket=bucket, Key="archive/ct/README.txt", Body=b"not a sample")

    found = storage.discover(f"s3://{bucket}/archive/ct", "ct", settings)

    assert [(s["sample"], s["uri"]) for s in found] == [
        ("S1", f"s3://{bucket}/archive/ct/S1/"),
        ("patient_7", f"s3://{bucket}/archive/ct/patient 7/"),
    ]
    for sample in found:
        assert sample["modality"] == "ct"
        assert sample["fingerprint"] == storage.source_fingerprint(sample["uri"], settings)


def test_discover_wsi_one_sample_per_slide_and_fingerprints_from_the_same_listing(
    s3, bucket, counting_proxy, settings
):
    for key in ["wsi/A1.svs", "wsi/B 2.ome.tiff", "wsi/notes.txt", "wsi/sub/C.svs"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"slide bytes")
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}

    start = counting_proxy.stats()["requests"]
    found = storage.discover(f"s3://{bucket}/wsi/", "wsi", via_proxy)
    fingerprints = [storage.source_fingerprint(s["uri"], via_proxy) for s in found]

    assert [(s["sample"], s["uri"]) for s in found] == [
        ("A1", f"s3://{bucket}/wsi/A1.svs"),
        ("B_2", f"s3://{bucket}/wsi/B 2.ome.tiff"),
    ]
    assert fingerprints == [s["fingerprint"] for s in found]
    assert requests_made(counting_proxy, start) == 1


def test_discover_refuses_two_slides_with_one_sample_name(s3, bucket, settings):
    s3.put_object(Bucket=bucket, Key="wsi/a b.svs", Body=b"1")
    s3.put_object(Bucket=bucket, Key="wsi/a_b.svs", Body=b"2")
    with pytest.raises(InputError, match="two samples would be named a_b"):
        storage.discover(f"s3://{bucket}/wsi/", "wsi", settings)


# ---------------------------------------------------------------- upload


def read_published(s3, bucket, prefix):
    """Every object under ``prefix``: name -> (bytes, sha256 metadata)."""
    found = {}
    for entry in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        response = s3.get_object(Bucket=bucket, Key=entry["Key"])
        found[entry["Key"][len(prefix) :]] = (
            response["Body"].read(),
            response["Metadata"].get("sha256"),
        )
    return found


def writes(history, bucket):
    return [
        (method, path)
        for method, path, _ in history
        if method in ("PUT", "POST", "DELETE") and bucket in path
    ]


SIZES = {"tile/shard-0000.tar": 11 * MB, "tile/tiles.parquet": 4000, "preprocess/mask.png": 900}


def test_publish_writes_data_then_manifest_and_skips_what_is_already_there(
    s3, bucket, counting_proxy, settings, tmp_path
):
    artifacts = make_artifacts(tmp_path / "v1", SIZES)
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}
    destination = f"s3://{bucket}/published/wsi/S1"
    start = len(counting_proxy.stats()["history"])

    receipt = storage.publish(
        artifacts, destination, manifest={"sample": "S1"}, threads=4, settings=via_proxy
    )

    published = read_published(s3, bucket, "published/wsi/S1/")
    manifest = json.loads(published.pop("manifest.json")[0])
    assert manifest["sample"] == "S1" and manifest["version"] == receipt["version"]
    for item in artifacts:
        data = Path(item["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        path = f"{receipt['version']}/{item['name']}"
        assert published[path] == (data, sha)
        entry = {"name": item["name"], "path": path, "bytes": len(data), "sha256": sha}
        assert entry in manifest["files"]
    assert len(published) == len(artifacts)
    assert sorted(f["action"] for f in receipt["files"]) == ["uploaded"] * 3
    order = writes(counting_proxy.stats()["history"][start:], bucket)
    assert order[-1] == ("PUT", f"/{bucket}/published/wsi/S1/manifest.json")
    assert sum(1 for _, path in order if "partNumber" in path) == 3  # 11 MB in 5 MB parts

    start = len(counting_proxy.stats()["history"])
    again = storage.publish(
        artifacts, destination, manifest={"sample": "S1"}, threads=4, settings=via_proxy
    )
    assert [f["action"] for f in again["files"]] == ["skipped"] * 3
    assert again["manifest_action"] == "skipped"
    assert writes(counting_proxy.stats()["history"][start:], bucket) == []


def test_republishing_writes_a_new_version_switches_the_manifest_then_removes_the_old(
    s3, bucket, counting_proxy, settings, tmp_path
):
    via_proxy = {**settings, "endpoint_url": counting_proxy.url}
    destination = f"s3://{bucket}/published/ct/S2"
    first = make_artifacts(tmp_path / "v1", {"a.npy": 5000, "b.npy": 6000, "old.png": 100})
    one = storage.publish(first, destination, manifest={"v": 1}, threads=2, settings=via_proxy)
    second = [first[0], *make_artifacts(tmp_path / "v2", {"b.npy": 6000}, seed=9)]
    start = len(counting_proxy.stats()["history"])

    receipt = storage.publish(second, destination, manifest={"v": 2}, threads=2, settings=via_proxy)

    order = writes(counting_proxy.stats()["history"][start:], bucket)
    prefix = f"/{bucket}/published/ct/S2/"
    new, old = prefix + receipt["version"] + "/", prefix + one["version"] + "/"
    switch = order.index(("PUT", prefix + "manifest.json"))
    before, after = order[:switch], order[switch + 1 :]
    # the new version whole first (a.npy copied within the store, b.npy uploaded), nothing
    # of the previous one touched; then the old version removed
    assert sorted(path for _, path in before) == [new + "a.npy", new + "b.npy"]
    assert {method for method, _ in before} == {"PUT"}
    assert sorted(after) == [("DELETE", old + name) for name in ("a.npy", "b.npy", "old.png")]
    assert {f["name"]: f["action"] for f in receipt["files"]} == {
        "a.npy": "copied",
        "b.npy": "uploaded",
    }
    assert receipt["removed"] == [one["version"]]
    assert set(read_published(s3, bucket, "published/ct/S2/")) == {
        f"{receipt['version']}/a.npy",
        f"{receipt['version']}/b.npy",
        "manifest.json",
    }


def test_kept_versions_stay_until_removed_and_the_current_one_never_goes(
    s3, bucket, settings, tmp_path
):
    destination = f"s3://{bucket}/published/wsi/S3"
    first = make_artifacts(tmp_path / "v1", {"tiles/a.tar": 3000, "tiles/t.parquet": 200})
    one = storage.publish(first, destination, manifest={}, settings=settings, superseded="keep")
    second = make_artifacts(tmp_path / "v2", {"tiles/a.tar": 3000, "tiles/t.parquet": 200}, 4)
    two = storage.publish(second, destination, manifest={}, settings=settings, superseded="keep")

    assert two["superseded"] == {"versions": [one["version"]], "legacy": False}
    tops = {k.split("/")[0] for k in read_published(s3, bucket, "published/wsi/S3/")}
    assert tops == {"manifest.json", one["version"], two["version"]}
    outcome = storage.remove_superseded(
        destination, [one["version"], two["version"]], False, settings
    )
    assert outcome == {"removed": [one["version"]], "refused": []}
    assert_complete_if_manifest(s3, bucket, "published/wsi/S3/")
    tops = {k.split("/")[0] for k in read_published(s3, bucket, "published/wsi/S3/")}
    assert tops == {"manifest.json", two["version"]}


def test_upload_skips_objects_with_the_same_sha256_even_if_etags_differ(
    s3, bucket, settings, tmp_path
):
    artifacts = make_artifacts(tmp_path, {"big.bin": 11 * MB})
    data = Path(artifacts[0]["path"]).read_bytes()
    key = f"p/{layout.version_of([('big.bin', hashlib.sha256(data).hexdigest())])}/big.bin"
    # another tool uploaded the same bytes with other part sizes (another ETag) and the checksum
    upload = s3.create_multipart_upload(
        Bucket=bucket, Key=key, Metadata={"sha256": hashlib.sha256(data).hexdigest()}
    )["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), 6 * MB), start=1):
        response = s3.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=data[start : start + 6 * MB],
        )
        parts.append({"PartNumber": number, "ETag": response["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )

    receipt = storage.publish(
        artifacts, f"s3://{bucket}/p", manifest={}, threads=2, settings=settings
    )
    assert [f["action"] for f in receipt["files"]] == ["skipped"]


def test_artifact_names_that_could_escape_the_prefix_are_refused(bucket, settings, tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    for name in ["../x", "/abs", "manifest.json"]:
        with pytest.raises(ValueError):
            storage.publish(
                [{"name": name, "path": str(tmp_path / "x")}],
                f"s3://{bucket}/p/S1",
                manifest={},
                threads=1,
                settings=settings,
            )


# ---------------------------------------------------------------- faults


def test_transfers_through_a_faulty_network_succeed_with_identical_data(
    s3, bucket, moto_server, settings, tmp_path
):
    series = put_series(s3, bucket, "ct/S1/", 40)
    slide = os.urandom(16 * MB + 5)
    put_multipart(s3, bucket, "wsi/slide.svs", slide)
    artifacts = make_artifacts(
        tmp_path / "art", {"shard.tar": 11 * MB, "a.parquet": 3000, "b.png": 800}
    )

    with FaultProxy(moto_server.url, fault_rate=0.25, seed=7) as proxy:
        faulty = {**settings, "endpoint_url": proxy.url, "max_attempts": 8}
        files = storage.fetch(f"s3://{bucket}/ct/S1/", tmp_path / "ct", threads=4, settings=faulty)
        slide_files = storage.fetch(
            f"s3://{bucket}/wsi/slide.svs", tmp_path / "wsi", threads=4, settings=faulty
        )
        storage.publish(
            artifacts, f"s3://{bucket}/pub/S1", manifest={"s": 1}, threads=4, settings=faulty
        )
        stats = proxy.stats()

    assert {f.key: Path(f.path).read_bytes() for f in files} == {
        k.removeprefix("ct/S1/"): v for k, v in series.items()
    }
    assert Path(slide_files[0].path).read_bytes() == slide
    published = read_published(s3, bucket, "pub/S1/")
    manifest = json.loads(published["manifest.json"][0])
    for item in artifacts:
        path = f"{manifest['version']}/{item['name']}"
        assert published[path][0] == Path(item["path"]).read_bytes()
    assert manifest["s"] == 1
    injected = {
        mode: stats[mode]
        for mode in ("status500", "status503", "drop_before", "drop_after", "truncate")
    }
    assert all(count > 0 for count in injected.values()), injected
    assert sum(injected.values()) >= 15


# ---------------------------------------------------------------- killed upload


PUBLISH_SCRIPT = """
import json, sys
from medprep import storage
args = json.load(open(sys.argv[1]))
storage.publish(args["artifacts"], args["destination"], manifest=args["manifest"], threads=2,
                settings=args["settings"])
"""


def assert_complete_if_manifest(s3, bucket, prefix):
    """A reader's rule: if manifest.json is there, every file it lists is there, whole."""
    try:
        body = s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    manifest = json.loads(body)
    for entry in manifest["files"]:
        data = s3.get_object(Bucket=bucket, Key=prefix + entry["path"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
    return manifest


def test_an_upload_killed_midway_leaves_the_previous_publication_and_the_rerun_finishes(
    s3, bucket, moto_server, s3_env, settings, tmp_path
):
    prefix = "pub/wsi/S1/"
    destination = f"s3://{bucket}/{prefix}"
    sizes = {f"tile/shard-{n}.tar": 6 * MB for n in range(4)} | {"tile/tiles.parquet": 2000}
    storage.publish(
        make_artifacts(tmp_path / "v1", sizes),
        destination,
        manifest={"v": 1},
        threads=2,
        settings=settings,
    )
    assert assert_complete_if_manifest(s3, bucket, prefix)["v"] == 1
    v2 = make_artifacts(tmp_path / "v2", sizes, seed=2)
    v1_etags = {
        o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    }

    with FaultProxy(moto_server.url, latency_ms=60) as slow:  # slow enough to catch it midway
        arguments = tmp_path / "args.json"
        slow_settings = {**settings, "endpoint_url": slow.url}
        arguments.write_text(
            json.dumps(
                {
                    "artifacts": v2,
                    "destination": destination,
                    "manifest": {"v": 2},
                    "settings": slow_settings,
                }
            )
        )
        child = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_SCRIPT, str(arguments)], env={**os.environ, **s3_env}
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.poll() is None:
                assert_complete_if_manifest(s3, bucket, prefix)
                now = {
                    o["Key"]: o["ETag"]
                    for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
                }
                if set(now) - set(v1_etags):
                    break  # some v2 data is in place
                time.sleep(0.05)
            assert child.poll() is None, "the upload finished before it could be interrupted"
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()

    assert assert_complete_if_manifest(s3, bucket, prefix)["v"] == 1, "the last good copy"
    assert {
        o["Key"]: o["ETag"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        if o["Key"] in v1_etags
    } == v1_etags, "nothing of the previous publication was touched"
    storage.publish(v2, destination, manifest={"v": 2}, threads=2, settings=settings)
    manifest = assert_complete_if_manifest(s3, bucket, prefix)
    assert manifest["v"] == 2
    assert {e["sha256"] for e in manifest["files"]} == {
        hashlib.sha256(Path(a["path"]).read_bytes()).hexdigest() for a in v2
    }
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    assert set(v1_etags) & {
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    } == {prefix + "manifest.json"}, "the previous version removed after the switch"


# ---------------------------------------------------------------- credentials


def test_credentials_appear_in_no_log_output_or_error(
    s3, bucket, settings, s3_env, tmp_path, monkeypatch
):
    # credentials from a profile in a shared credentials file, not the environment
    profile_key, profile_secret = (
        "AKIAPROFILE" + os.urandom(6).hex().upper(),
        "pr0file-" + os.urandom(16).hex(),
    )
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(
        f"[medprep-test]\naws_access_key_id = {profile_key}\naws_secret_access_key = {profile_secret}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with_profile = {**settings, "profile": "medprep-test"}
    put_series(s3, bucket, "ct/S1/", 3)
    log_path = tmp_path / "rule.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # botocore's debug log prints request headers (Authorization)
    errors = []
    try:
        files = storage.fetch(
            f"s3://{bucket}/ct/S1/", tmp_path / "d", threads=2, settings=with_profile
        )
        receipt = storage.publish(
            [{"name": "x.dcm", "path": files[0].path}],
            f"s3://{bucket}/pub/S1",
            manifest={"sample": "S1"},
            threads=2,
            settings=with_profile,
        )
        atomic.write_json(tmp_path / "receipt.json", receipt)
        for failing in (
            lambda: storage.fetch(
                "s3://no-such-bucket-medprep/x/", tmp_path / "e", threads=1, settings=with_profile
            ),
            lambda: storage.source_fingerprint(
                "s3://b/x/", {**with_profile, "endpoint_url": "http://127.0.0.1:9"}
            ),
        ):
            try:
                failing()
            except Exception as error:  # noqa: BLE001 - collecting the messages
                errors.append(f"{error!r} {error}")
                logging.getLogger("test").exception("failed")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()

    text = log_path.read_text()
    assert "Authorization" in text and "Credential=***" in text, (
        "the debug log should show redacted headers"
    )
    assert len(errors) == 2
    outputs = [text, *errors, *(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))]
    for secret in (profile_key, profile_secret, *s3_env.values()):
        assert not any(secret in output for output in outputs)
