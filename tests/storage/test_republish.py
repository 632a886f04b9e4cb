"""Republishing never loses the last good copy.

- a publish that does not fit (a full file system, inodes, a store's quota) is one line
  with the destination and the bytes needed, changes nothing a reader sees and gives
  back what it wrote;
- files an earlier version holds are linked (local) or copied within the store (S3);
- a sample's earlier versions stay while a dataset index refers to them, and go once none
  does; the layout of earlier medprep versions is read, and replaced the same way.

Real small file systems (a tmpfs of 30 MB mounted for the test: root only, skipped with
the reason elsewhere) and a real S3-compatible server (moto_server) behind a proxy that
answers like a store over its quota.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from dataset_support import write_cohort
from s3_support import FaultProxy, create_bucket, raw_client, use_test_credentials
from workflow_support import make_artifacts

from medprep import storage
from medprep.common import atomic
from medprep.data import index as dataset
from medprep.data import open_dataset

MB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def small_file_system(folder: Path, size: str = "30m", inodes: int | None = None):
    """A tmpfs of ``size`` (and ``inodes``) mounted at ``folder``; skips where it cannot."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    folder.mkdir(parents=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def assert_whole(folder: Path) -> dict:
    """What a reader of ``folder`` sees: manifest.json and every file it lists, checked."""
    manifest = atomic.read_json(folder / "manifest.json")
    for entry in manifest["files"]:
        assert sha256((folder / entry["path"]).read_bytes()) == entry["sha256"], entry["name"]
    return manifest


# ---------------------------------------------------------------- a full local file system


def test_a_republish_that_does_not_fit_changes_nothing_and_says_what_it_needs(tmp_path):
    with small_file_system(tmp_path / "small") as small:
        sample = small / "wsi" / "S1"
        v1 = make_artifacts(
            tmp_path / "v1", {"tiles/pixels/a.tar": 10 * MB, "tiles/t.parquet": 2 * MB}
        )
        first = storage.publish(v1, str(sample), manifest={"v": 1})
        assert {f["action"] for f in first["files"]} == {"copied"}  # another file system
        before, free = assert_whole(sample), free_bytes(small)
        big = make_artifacts(tmp_path / "v2", {f"tiles/pixels/{n}.tar": 7 * MB for n in "bcd"})

        with pytest.raises(storage.DestinationFull) as full:
            storage.publish([v1[0], *big], str(sample), manifest={"v": 2})

        line = str(full.value)
        assert "\n" not in line and line.startswith(f"file {sample}: not enough space left ")
        need = int(line.split("publishing needs ")[1].split(" bytes")[0].replace(",", ""))
        assert 21 * MB <= need < 22 * MB, "the three new files; a.tar is linked, free"
        assert f"{free:,} are free" in line and "the previous publication is kept" in line
        assert full.value.kind == "destination"
        assert assert_whole(sample) == before
        assert sorted(p.name for p in sample.iterdir()) == ["manifest.json", first["version"]]
        assert free_bytes(small) == free, "nothing was written"

        # what fits is published; the unchanged file is a link to the previous version's
        smaller = [v1[0], big[0], v1[1]]
        second = storage.publish(smaller, str(sample), manifest={"v": 2})
        actions = {f["name"]: f["action"] for f in second["files"]}
        assert actions == {
            "tiles/pixels/a.tar": "linked",
            "tiles/t.parquet": "linked",
            "tiles/pixels/b.tar": "copied",
        }
        assert assert_whole(sample)["v"] == 2
        assert second["removed"] == [first["version"]]
        assert sorted(p.name for p in sample.iterdir()) == ["manifest.json", second["version"]]


def test_a_file_system_that_fills_up_while_publishing_gets_back_what_was_written(tmp_path):
    # room for the bytes, not for the files: the check before writing passes, and the
    # file system runs out of inodes (ENOSPC) half-way
    with small_file_system(tmp_path / "small", inodes=16) as small:
        sample = small / "ct" / "S1"
        v1 = make_artifacts(tmp_path / "v1", {"preprocess/volume.nii.gz": MB, "p/t.parquet": 10})
        storage.publish(v1, str(sample), manifest={"v": 1})
        before, free = assert_whole(sample), free_bytes(small)
        many = make_artifacts(
            tmp_path / "v2", {f"patches/slices/{n:02d}.png": 1000 for n in range(12)}
        )

        with pytest.raises(storage.DestinationFull, match="No space left on device|no space left"):
            storage.publish([*v1, *many], str(sample), manifest={"v": 2})

        assert assert_whole(sample) == before
        assert sorted(p.name for p in sample.iterdir()) == ["manifest.json", before["version"]]
        assert free_bytes(small) == free


# ---------------------------------------------------------------- a store over its quota


@pytest.fixture
def store(moto_server, tmp_path, monkeypatch):
    credentials = use_test_credentials(tmp_path, monkeypatch)
    bucket = create_bucket(moto_server, credentials)
    yield moto_server, bucket, raw_client(moto_server.url, credentials)
    storage.clear_caches()


def test_a_store_over_its_quota_is_one_line_and_keeps_the_previous_publication(store, tmp_path):
    server, bucket, s3 = store
    destination = f"s3://{bucket}/pub/wsi/S1"
    v1 = make_artifacts(tmp_path / "v1", {"tiles/a.tar": 3 * MB, "tiles/t.parquet": 2000})
    v2 = make_artifacts(tmp_path / "v2", {"tiles/b.tar": 6 * MB, "tiles/t.parquet": 3000}, 2)
    with FaultProxy(server.url, quota_bytes=4 * MB) as proxy:
        settings = {"endpoint_url": proxy.url, "region": "us-east-1", "part_size_mb": 5}
        first = storage.publish(v1, destination, manifest={"v": 1}, settings=settings)

        with pytest.raises(storage.DestinationFull) as full:
            storage.publish([v1[0], *v2], destination, manifest={"v": 2}, settings=settings)
        refused = proxy.stats()["over_quota"]

    line = str(full.value)
    assert "\n" not in line and line.startswith(f"file s3://{bucket}/pub/wsi/S1/: ")
    assert "full or over its quota: XMinioStorageFull" in line
    need = int(line.split("publishing needs ")[1].split(" bytes")[0].replace(",", ""))
    # b.tar and t.parquet uploaded, a.tar copied within the store, and the manifest
    assert 9 * MB + 3000 < need < 9 * MB + 3000 + 2000
    assert "the previous publication is kept" in line
    assert 1 <= refused <= 3, "answered once per write, not retried blindly"
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key="pub/wsi/S1/manifest.json")["Body"].read()
    )
    assert manifest["v"] == 1 and manifest["version"] == first["version"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="pub/")["Contents"]}
    paths = {f"pub/wsi/S1/{f['path']}" for f in manifest["files"]}
    assert keys == {"pub/wsi/S1/manifest.json", *paths}, "what the failed publish wrote goes"
    for entry in manifest["files"]:
        data = s3.get_object(Bucket=bucket, Key="pub/wsi/S1/" + entry["path"])["Body"].read()
        assert sha256(data) == entry["sha256"]


# ---------------------------------------------------------------- versions and indexes


def publish_sample(entry: dataset.SampleEntry, destination: Path, receipts: Path) -> dict:
    """Publish a sample's artifacts as `upload` does (earlier versions kept), with its receipt."""
    tile = atomic.read_json(entry.tile_manifest)
    receipt = storage.publish(
        tile["artifacts"],
        str(destination / entry.modality / entry.sample),
        manifest={"sample": entry.sample},
        superseded="keep",
    )
    entry.receipt = str(receipts / f"{entry.sample}-{uuid.uuid4().hex[:6]}.json")
    atomic.write_json(entry.receipt, receipt)
    return receipt


def publish_index(entries, destination: Path, run: str, work: Path) -> dict:
    folder = work / f"index-{run}"
    manifest = dataset.build(entries, folder)
    files = {name: str(folder / name) for name in dataset.TABLES}
    dataset.publish(files, str(destination / "dataset" / run), {**manifest, "run": run})
    return dataset.remove_superseded(entries, str(destination))


def test_a_version_an_index_refers_to_stays_until_no_index_does(tmp_path):
    destination, receipts = tmp_path / "published", tmp_path / "receipts"
    receipts.mkdir()
    (entry,) = write_cohort(tmp_path / "work1", [("S1", "wsi", "P1", "1")], tiles=30)
    first = publish_sample(entry, destination, receipts)
    publish_index([entry], destination, "a", tmp_path)
    assert open_dataset(destination, run="a").samples["publication"].tolist() == [
        f"wsi/S1/{first['version']}"
    ]

    # the sample changes and is published again; run b indexes it, run a still refers
    # to the first version
    (changed,) = write_cohort(tmp_path / "work2", [("S1", "wsi", "P1", "1")], tiles=40, seed=3)
    second = publish_sample(changed, destination, receipts)
    assert second["superseded"] == {"versions": [first["version"]], "legacy": False}
    swept = publish_index([changed], destination, "b", tmp_path)
    assert swept["removed"] == 0 and swept["kept"] == [f"S1: {first['version']}"]
    old = open_dataset(destination, run="a")
    table = destination / old.samples["publication"][0] / "tiles" / "tiles.parquet"
    assert len(open_dataset(destination, run="a").tiles) == 30 and table.is_file()

    # run a is rebuilt on the new version: nothing refers to the first one any more
    swept = publish_index([changed], destination, "a", tmp_path)
    assert swept["removed"] == 1 and swept["kept"] == []
    assert sorted(p.name for p in (destination / "wsi" / "S1").iterdir()) == [
        "manifest.json",
        second["version"],
    ]
    assert len(open_dataset(destination, run="a").tiles) == 40


def write_earlier_layout(entries, destination: Path, run: str) -> None:
    """A destination as earlier versions of medprep published it: files under their
    names, manifests without a version, an index without the publication column."""
    for entry in entries:
        folder = destination / entry.modality / entry.sample
        files = []
        for artifact in atomic.read_json(entry.tile_manifest)["artifacts"]:
            target = folder / artifact["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact["path"], target)
            data = target.read_bytes()
            files.append({"name": artifact["name"], "bytes": len(data), "sha256": sha256(data)})
        atomic.write_json(folder / "manifest.json", {"sample": entry.sample, "files": files})
    index = destination / "dataset" / run
    manifest = dataset.build(entries, index)
    import pyarrow.parquet as pq

    samples = pq.read_table(index / "samples.parquet").drop_columns(["publication"])
    pq.write_table(samples, index / "samples.parquet")
    listed = [{"name": n, "sha256": sha256((index / n).read_bytes())} for n in dataset.TABLES]
    atomic.write_json(index / "manifest.json", {**manifest, "files": listed})


def test_the_earlier_layout_is_read_and_replaced_once_no_index_refers_to_it(tmp_path):
    destination, receipts = tmp_path / "published", tmp_path / "receipts"
    receipts.mkdir()
    entries = write_cohort(tmp_path / "work", [("S1", "wsi", "P1", "1"), ("S2", "wsi", "P2", "0")])
    write_earlier_layout(entries, destination, "old")
    earlier = open_dataset(destination, run="old")
    assert len(earlier.tiles) == 200 and "publication" not in earlier.samples
    assert set(earlier.tiles.table["file"].str.split("/").str[2]) == {"tiles"}

    republished = [publish_sample(e, destination, receipts) for e in entries]
    assert all(r["superseded"] == {"versions": [], "legacy": True} for r in republished)
    swept = publish_index(entries, destination, "new", tmp_path)
    assert swept["removed"] == 0 and len(swept["kept"]) == 2, "index 'old' still refers to them"
    assert (destination / "wsi" / "S1" / "tiles" / "tiles.parquet").is_file()
    assert len(open_dataset(destination, run="old").tiles) == 200

    swept = publish_index(entries, destination, "old", tmp_path)  # rebuilt by this version
    assert swept["removed"] == 2
    for entry, receipt in zip(entries, republished, strict=True):
        folder = destination / "wsi" / entry.sample
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", receipt["version"]]
        assert_whole(folder)
    for run in ("old", "new"):
        assert len(open_dataset(destination, run=run).tiles) == 200


def test_an_index_that_cannot_be_read_keeps_every_earlier_version(tmp_path, caplog):
    destination, receipts = tmp_path / "published", tmp_path / "receipts"
    receipts.mkdir()
    (entry,) = write_cohort(tmp_path / "work1", [("S1", "wsi", "P1", "1")], tiles=10)
    first = publish_sample(entry, destination, receipts)
    (changed,) = write_cohort(tmp_path / "work2", [("S1", "wsi", "P1", "1")], tiles=12, seed=5)
    publish_sample(changed, destination, receipts)
    broken = destination / "dataset" / "broken"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text('{"files": [{"name": "samples.parquet"')  # cut short

    swept = publish_index([changed], destination, "b", tmp_path)

    assert swept["removed"] == 0 and swept["kept"] == ["S1: all"]
    assert (destination / "wsi" / "S1" / first["version"]).is_dir()
    assert "kept every earlier version of 1 samples: cannot read the dataset indexes" in (
        caplog.text
    )
