"""Publishing stays inside the sample's destination, whatever the destination holds.

- a tampered published ``manifest.json`` (or a planted link or key) never makes a
  republish delete or write anything outside the sample's folder or prefix;
- what a killed publish left (temporaries, unfinished multipart uploads) is removed at
  every depth of the sample's folder;
- a rerun notices a published file that went missing or changed and republishes that
  sample, and only it;
- a destination that cannot be published to stops the run before any job, in one line.

Local folders and a real S3-compatible server (moto_server process, tests/s3_support.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_support import (
    fake_credentials,
    free_port,
    isolated_aws_environment,
    new_bucket_name,
)
from s3_workflow_support import (
    World,
    assert_no_credentials_anywhere,
    assert_published_complete,
    chain,
)
from workflow_support import (
    copy_workdir,
    make_artifacts,
    published_file,
    run_snakemake,
    write_config,
    write_samples,
)

from medprep import storage
from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.storage import layout

MB = 1024 * 1024
CT = ("real-dcmqi-3slice", "ct", "data/ct/real-dcmqi-3slice")
WSI = ("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if atomic.is_temporary_name(p.name)]


def assert_local_complete(
    folder: Path, names: set[str] | None = None, *, alone: bool = True
) -> dict:
    """manifest.json lists exactly the files of the version folder it points at, with their
    SHA-256; with ``alone``, nothing but the two is in ``folder``, nothing half-written."""
    manifest = atomic.read_json(folder / "manifest.json")
    version = folder / manifest["version"]
    on_disk = {
        p.relative_to(version).as_posix(): sha256(p.read_bytes())
        for p in version.rglob("*")
        if p.is_file()
    }
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == on_disk
    assert {f["path"] for f in manifest["files"]} == {f"{version.name}/{n}" for n in on_disk}
    if names is not None:
        assert set(on_disk) == names
    if alone:
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", version.name]
        assert temporaries(folder) == [], "nothing half-written may be left"
    return manifest


# ---------------------------------------------------------------- local: tampered manifest


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files a republish must never touch, next to the destination."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_text("keep me")
    (tmp_path / "victim.txt").write_text("keep me too")
    return folder


def hostile_entries(tmp_path: Path) -> list[str]:
    return [
        "../../../victim.txt",  # -> tmp_path/victim.txt
        "../../../outside/victim.txt",
        str(tmp_path / "outside" / "victim.txt"),  # absolute
        "a/../../../../victim.txt",
        "..\\..\\..\\victim.txt",
        "escape/victim.txt",  # through the link planted below
        "",
    ]


def test_local_republish_reads_and_removes_nothing_a_tampered_manifest_names_outside(
    tmp_path, outside, caplog
):
    sample = tmp_path / "pub" / "ct" / "S1"
    first = make_artifacts(tmp_path / "v1", {"a.npy": 100, "tiles/old.png": 50, "b.json": 10})
    storage.publish(first, str(sample), manifest={"sample": "S1"})
    (sample / "escape").symlink_to(outside)  # a link planted in the published folder
    tampered = atomic.read_json(sample / "manifest.json")
    # entries naming files outside, with the size and SHA-256 of the victim: a publisher
    # that reused "identical" published files would link the victim into the publication
    victim = {"bytes": len(b"keep me"), "sha256": sha256(b"keep me")}
    for name in hostile_entries(tmp_path):
        tampered["files"].append({"name": name, "path": name, **victim})
    tampered["files"] += [{"nom": "x"}, "not an entry"]
    # a plain entry whose file is not there: nothing to reuse, and no reason to refuse
    tampered["files"].append({"name": "gone.bin", "path": "v-0000000000000000/gone", **victim})
    atomic.write_json(sample / "manifest.json", tampered)
    same_bytes = tmp_path / "v2" / "victim-like.txt"
    same_bytes.parent.mkdir()
    same_bytes.write_bytes(b"keep me")
    other_device = {"path": str(same_bytes), "name": "notes/victim-like.txt"}

    second = [first[0], *make_artifacts(tmp_path / "v2", {"b.json": 12}, seed=2), other_device]
    with caplog.at_level(logging.WARNING):
        receipt = storage.publish(second, str(sample), manifest={"sample": "S1"})

    assert (outside / "victim.txt").read_text() == "keep me"
    assert (tmp_path / "victim.txt").read_text() == "keep me too"
    assert (sample / "escape").is_symlink(), "refused, so left as it was"
    refused = receipt["refused"]
    assert len(refused) == len(hostile_entries(tmp_path)) + 1
    where = f"sample S1: file {sample / 'manifest.json'}: ignoring "
    assert sum(line.startswith(where) for line in refused) == len(hostile_entries(tmp_path))
    assert f"sample S1: file {sample / 'escape'}: a link to a folder; left alone" in refused
    assert all("\n" not in line for line in refused)
    assert any("'../../../victim.txt'" in line and "'..'" in line for line in refused)
    assert any(
        "'escape/victim.txt'" in line and "a link on its path leaves" in line for line in refused
    )
    assert any("backslash" in line for line in refused)
    assert any("absolute path" in line for line in refused)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == refused
    published = sample / receipt["version"] / "notes" / "victim-like.txt"
    assert os.stat(published).st_ino == os.stat(same_bytes).st_ino, "from the source, linked"
    for victim_file in (outside / "victim.txt", tmp_path / "victim.txt"):
        assert os.stat(victim_file).st_nlink == 1, "never linked into the publication"
    # the sample is published, the previous version removed, the bad entries gone
    (sample / "escape").unlink()
    manifest = assert_local_complete(sample, {"a.npy", "b.json", "notes/victim-like.txt"})
    assert manifest["sample"] == "S1"
    assert receipt["removed"] == [layout.version_of(
        (a["name"], sha256(Path(a["path"]).read_bytes())) for a in first
    )]  # fmt: skip


def test_local_publish_refuses_to_write_through_a_link_leaving_the_folder(tmp_path, outside):
    sample = tmp_path / "pub" / "wsi" / "S2"
    sample.mkdir(parents=True)
    artifacts = make_artifacts(tmp_path / "v1", {"preprocess/mask.png": 30, "x.json": 5})
    version = layout.version_of(
        (a["name"], sha256(Path(a["path"]).read_bytes())) for a in artifacts
    )
    before = sorted(p.name for p in outside.iterdir())

    (sample / version).symlink_to(outside)  # the version folder itself
    with pytest.raises(InputError, match="not a folder of this publication") as error:
        storage.publish(artifacts, str(sample), manifest={"sample": "S2"})
    assert version in str(error.value) and str(sample) in str(error.value)

    (sample / version).unlink()
    (sample / version).mkdir()
    (sample / version / "preprocess").symlink_to(outside)  # a folder inside it
    with pytest.raises(InputError, match="a link on its path leaves the sample folder") as error:
        storage.publish(artifacts, str(sample), manifest={"sample": "S2"})
    assert "preprocess/mask.png" in str(error.value) and str(sample) in str(error.value)

    assert sorted(p.name for p in outside.iterdir()) == before
    assert not (sample / "manifest.json").exists() and not (sample / version / "x.json").exists()


def test_an_unreadable_old_manifest_is_reported_and_replaced(tmp_path):
    sample = tmp_path / "pub" / "ct" / "S3"
    first = make_artifacts(tmp_path / "v1", {"a.npy": 100, "old.bin": 10})
    storage.publish(first, str(sample), manifest={"sample": "S3"})
    (sample / "manifest.json").write_text('{"files": [{"name": "old.bin"}')  # cut short

    receipt = storage.publish(first[:1], str(sample), manifest={"sample": "S3"})

    assert len(receipt["refused"]) == 1 and "unreadable" in receipt["refused"][0]
    assert [f["name"] for f in atomic.read_json(sample / "manifest.json")["files"]] == ["a.npy"]
    assert_local_complete(sample, {"a.npy"})


# ---------------------------------------------------------------- local: killed publish

KILLED_LOCAL_PUBLISH = """
import json, os, shutil, signal, sys
from medprep import storage
args = json.load(open(sys.argv[1]))
copy = shutil.copyfile
def copy_then_die(source, target, *rest, **options):
    # the process is killed while it writes this file (as by kill -9 of the job)
    if str(source).endswith(args["kill_at"]):
        with open(source, "rb") as f, open(target, "wb") as out:
            out.write(f.read(1000))
        os.kill(os.getpid(), signal.SIGKILL)
    return copy(source, target, *rest, **options)
shutil.copyfile = copy_then_die
link = os.link
def link_then_die(source, target, *rest, **options):
    # on one file system the publisher hard-links: killed right after the link
    link(source, target, *rest, **options)
    if str(source).endswith(args["kill_at"]):
        os.kill(os.getpid(), signal.SIGKILL)
os.link = link_then_die
storage.publish(args["artifacts"], args["destination"], manifest={"v": 2}, threads=1)
"""


def test_a_killed_local_publish_leaves_no_temporary_at_any_depth_after_the_rerun(tmp_path):
    sample = tmp_path / "pub" / "wsi" / "S1"
    sizes = {f"tiles/pixels/{row:02d}/{n:04d}.jpg": 3000 for row in range(2) for n in range(3)}
    sizes["tiles/tiles.parquet"] = 4000
    v1 = make_artifacts(tmp_path / "v1", sizes)
    storage.publish(v1, str(sample), manifest={"v": 1})
    v2 = make_artifacts(tmp_path / "v2", sizes, seed=2)
    arguments = tmp_path / "args.json"
    kill_at = "tiles__pixels__01__0001.jpg"
    arguments.write_text(
        json.dumps({"artifacts": v2, "destination": str(sample), "kill_at": kill_at})
    )

    child = subprocess.run([sys.executable, "-c", KILLED_LOCAL_PUBLISH, str(arguments)])

    assert child.returncode == -9
    left = temporaries(sample)
    new = layout.version_of((a["name"], sha256(Path(a["path"]).read_bytes())) for a in v2)
    assert [Path(p).parent.relative_to(sample).as_posix() for p in left] == [
        f"{new}/tiles/pixels/01"
    ]
    # the previous publication is still the one a reader sees, whole
    assert assert_local_complete(sample, set(sizes), alone=False)["v"] == 1

    receipt = storage.publish(v2, str(sample), manifest={"v": 2})

    assert temporaries(sample) == []
    manifest = assert_local_complete(sample, set(sizes))
    assert manifest["v"] == 2
    assert {f["sha256"] for f in manifest["files"]} == {
        sha256(Path(a["path"]).read_bytes()) for a in v2
    }
    assert receipt["refused"] == []


# ---------------------------------------------------------------- S3


@pytest.fixture
def settings(moto_server):
    return {"endpoint_url": moto_server.url, "region": "us-east-1", "part_size_mb": 5}


def keys(s3, bucket, prefix="") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def assert_s3_complete(s3, bucket, prefix) -> dict:
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    for entry in manifest["files"]:
        assert entry["path"] == f"{manifest['version']}/{entry['name']}"
        data = s3.get_object(Bucket=bucket, Key=prefix + entry["path"])["Body"].read()
        assert sha256(data) == entry["sha256"], entry["name"]
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    return manifest


def test_s3_republish_deletes_only_plain_keys_under_the_sample_prefix(
    s3, bucket, settings, tmp_path
):
    prefix = "pub/ct/S1/"
    destination = f"s3://{bucket}/{prefix}"
    first = make_artifacts(tmp_path / "v1", {"a.npy": 100, "tiles/old.png": 50})
    before = storage.publish(
        first, destination, manifest={"sample": "S1"}, threads=2, settings=settings
    )
    victims = ["victim.txt", "pub/victim.txt", "pub/ct/victim.txt", "pub/ct/S10/keep.bin"]
    for key in victims:
        s3.put_object(Bucket=bucket, Key=key, Body=b"keep me")
    tampered = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    tampered["files"] += [{"name": "../../victim.txt"}, {"name": "/victim.txt"}]
    s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(tampered).encode())
    hostile = [prefix + "../../victim.txt", prefix + "a\\..\\..\\victim.txt", prefix + "x//y"]
    for key in hostile:  # literal keys under the prefix that a normalising proxy would move
        s3.put_object(Bucket=bucket, Key=key, Body=b"not ours to delete")

    second = [first[0], *make_artifacts(tmp_path / "v2", {"b.json": 12}, seed=2)]
    receipt = storage.publish(
        second, destination, manifest={"sample": "S1"}, threads=2, settings=settings
    )

    assert {k for k in keys(s3, bucket) if not k.startswith(prefix)} == set(victims)
    new = prefix + receipt["version"]
    assert keys(s3, bucket, prefix) == {
        f"{new}/a.npy",
        f"{new}/b.json",
        prefix + "manifest.json",
        *hostile,
    }
    assert receipt["removed"] == [before["version"]]
    assert receipt["files"][0]["action"] == "copied", "a.npy: copied within the store"
    assert len(receipt["refused"]) == len(hostile)
    for line, key in zip(receipt["refused"], sorted(hostile), strict=True):
        assert line.startswith(f"sample S1: file s3://{bucket}/{prefix}: refusing to delete ")
        assert repr(key) in line
    manifest = assert_s3_complete(s3, bucket, prefix)
    assert sorted(f["name"] for f in manifest["files"]) == ["a.npy", "b.json"]


KILLED_S3_PUBLISH = """
import json, os, signal, sys
from medprep import storage
from medprep.storage import s3_connect
args = json.load(open(sys.argv[1]))
new_client = s3_connect._new_client
def die(**_):
    os.kill(os.getpid(), signal.SIGKILL)  # killed with a part uploaded, as by kill -9
def dying_client(*arguments, **options):
    client = new_client(*arguments, **options)
    client.meta.events.register("after-call.s3.UploadPart", die)
    return client
s3_connect._new_client = dying_client
storage.publish(args["artifacts"], args["destination"], manifest={"v": 2}, threads=1,
                settings=args["settings"])
"""


def test_a_killed_s3_publish_leaves_no_unfinished_upload_at_any_depth_after_the_rerun(
    s3, bucket, settings, s3_env, tmp_path
):
    prefix = "pub/wsi/S1/"
    destination = f"s3://{bucket}/{prefix}"
    sizes = {"tiles/pixels/deep/shard-000000.tar": 11 * MB, "tiles/tiles.parquet": 2000}
    v2 = make_artifacts(tmp_path / "v2", sizes, seed=2)
    arguments = tmp_path / "args.json"
    arguments.write_text(
        json.dumps({"artifacts": v2, "destination": destination, "settings": settings})
    )

    child = subprocess.run(
        [sys.executable, "-c", KILLED_S3_PUBLISH, str(arguments)], env={**os.environ, **s3_env}
    )

    assert child.returncode == -9
    unfinished = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    version = layout.version_of((a["name"], sha256(Path(a["path"]).read_bytes())) for a in v2)
    assert [u["Key"] for u in unfinished] == [
        f"{prefix}{version}/tiles/pixels/deep/shard-000000.tar"
    ]
    assert prefix + "manifest.json" not in keys(s3, bucket, prefix)

    # the rerun publishes something else at first (a changed setting): still cleaned up
    storage.publish(v2[1:], destination, manifest={"v": 2}, threads=2, settings=settings)
    assert assert_s3_complete(s3, bucket, prefix)["v"] == 2
    storage.publish(v2, destination, manifest={"v": 3}, threads=2, settings=settings)
    manifest = assert_s3_complete(s3, bucket, prefix)
    assert {f["sha256"] for f in manifest["files"]} == {
        sha256(Path(a["path"]).read_bytes()) for a in v2
    }


def test_destination_checks_name_the_destination_and_the_cause(
    s3, bucket, settings, s3_env, tmp_path
):
    storage.check_destination(f"s3://{bucket}/published", settings)
    assert keys(s3, bucket) == set(), "the probe is deleted again"
    missing = new_bucket_name()
    with pytest.raises(storage.DestinationUnusable) as error:
        storage.check_destination(f"s3://{missing}/published", settings)
    assert str(error.value) == (
        f"destination s3://{missing}/published: cannot publish there: "
        f"bucket {missing} does not exist"
    )
    closed = {**settings, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(storage.DestinationUnusable, match="cannot connect to http://127.0.0.1"):
        storage.check_destination(f"s3://{bucket}/published", closed)
    for secret in s3_env.values():
        assert secret not in str(error.value)

    storage.check_destination(str(tmp_path / "new" / "folder"), {})
    assert list((tmp_path / "new" / "folder").iterdir()) == [], "the probe is deleted again"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(storage.DestinationUnusable, match="Not a directory"):
        storage.check_destination(str(tmp_path / "a-file" / "published"), {})


# ---------------------------------------------------------------- workflow, local destination


@pytest.fixture(scope="module")
def published_once(tiny_data, tmp_path_factory) -> Path:
    """A working directory where one CT scan and one slide have been published."""
    workdir = tmp_path_factory.mktemp("published") / "w"
    workdir.mkdir()
    os.symlink(tiny_data, workdir / "data")
    write_samples(workdir, [CT, WSI])
    write_config(workdir)
    run = run_snakemake(workdir)
    assert run.ran() == chain(CT[0], "ct") | chain(WSI[0], "wsi")
    return workdir


@pytest.fixture
def workdir(published_once, tmp_path) -> Path:
    return copy_workdir(published_once, tmp_path / "copy")


def published(workdir: Path, sample) -> Path:
    return workdir / "published" / sample[1] / sample[0]


def assert_receipt_matches(workdir: Path, sample) -> None:
    receipt = atomic.read_json(workdir / "results" / sample[1] / sample[0] / "upload.json")
    manifest = atomic.read_json(published(workdir, sample) / "manifest.json")
    assert {f["name"]: f["sha256"] for f in receipt["files"]} == {
        f["name"]: f["sha256"] for f in manifest["files"]
    }


pytest_slow = pytest.mark.slow


@pytest_slow
def test_a_deleted_or_overwritten_published_file_is_republished_for_its_sample_only(workdir):
    ct_folder, wsi_folder = published(workdir, CT), published(workdir, WSI)
    names = {
        sample: {f["name"] for f in atomic.read_json(folder / "manifest.json")["files"]}
        for sample, folder in ((CT, ct_folder), (WSI, wsi_folder))
    }
    qc = published_file(ct_folder, "preprocess/qc.png")
    qc.unlink()

    dry = run_snakemake(workdir, "--dry-run")
    assert dry.ran() == {("upload", CT[0])}
    assert not qc.exists(), "a dry-run changes nothing"

    rerun = run_snakemake(workdir)
    assert rerun.ran() == {("upload", CT[0])}
    relative = qc.relative_to(workdir).as_posix()
    assert (
        f"medprep: sample {CT[0]}: file {relative}: missing since it was published; "
        "upload runs again" in rerun.stderr
    )
    assert_local_complete(ct_folder, names[CT])
    assert_receipt_matches(workdir, CT)
    assert run_snakemake(workdir).ran() == set(), "repaired: nothing more to do"

    # overwritten with other bytes of the same size
    parquet = published_file(wsi_folder, "tiles/tiles.parquet")
    parquet.write_bytes(bytes(len(parquet.read_bytes())))
    assert run_snakemake(workdir).ran() == {("upload", WSI[0])}
    assert_local_complete(wsi_folder, names[WSI])
    assert_receipt_matches(workdir, WSI)
    assert run_snakemake(workdir).ran() == set()
    assert_local_complete(ct_folder, names[CT])


@pytest_slow
def test_checksum_verification_finds_a_change_that_sizes_and_times_hide(workdir):
    folder = published(workdir, WSI)
    summary = published_file(folder, "tiles/summary.json")
    stat = summary.stat()
    original = summary.read_bytes()
    summary.write_bytes(original.replace(b"{", b" ", 1)[: len(original)])  # same size
    os.utime(summary, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert run_snakemake(workdir).ran() == set(), "the default check compares sizes and times"
    write_config(workdir, storage={"verify_published": "checksum"})
    assert run_snakemake(workdir).ran() == {("upload", WSI[0])}
    assert summary.read_bytes() == original
    assert_local_complete(folder)
    assert run_snakemake(workdir).ran() == set()


@pytest_slow
def test_a_tampered_manifest_is_republished_and_removes_nothing_outside(workdir):
    victim = workdir.parent / "victim.txt"
    victim.write_text("keep me")
    folder = published(workdir, CT)
    manifest = atomic.read_json(folder / "manifest.json")
    manifest["files"].append({"name": "../../../../victim.txt"})
    atomic.write_json(folder / "manifest.json", manifest)

    rerun = run_snakemake(workdir)

    assert rerun.ran() == {("upload", CT[0])}
    assert victim.read_text() == "keep me"
    warnings = [line for line in rerun.stderr.splitlines() if "medprep warning" in line]
    assert warnings == [
        f"medprep warning: sample {CT[0]}: file published/ct/{CT[0]}/manifest.json: "
        "ignoring '../../../../victim.txt', listed in it: "
        "has an empty, '.' or '..' path component"
    ]
    assert_local_complete(folder)
    assert_local_complete(published(workdir, WSI))
    assert run_snakemake(workdir).ran() == set()


@pytest_slow
def test_forcerun_upload_republishes_every_sample_skipping_identical_files(workdir):
    before = {s: published(workdir, s).joinpath("manifest.json").read_bytes() for s in (CT, WSI)}
    run = run_snakemake(workdir, "--forcerun", "upload")
    assert run.ran() == {("upload", CT[0]), ("upload", WSI[0])}
    for sample in (CT, WSI):
        receipt = atomic.read_json(workdir / "results" / sample[1] / sample[0] / "upload.json")
        assert {f["action"] for f in receipt["files"]} == {"skipped"}
        assert published(workdir, sample).joinpath("manifest.json").read_bytes() == before[sample]
    assert run_snakemake(workdir).ran() == set()


# ---------------------------------------------------------------- destination checked first


def assert_stopped_before_any_job(run, workdir: Path, destination: str, cause: str) -> None:
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
    assert errors == [f"medprep error: destination {destination}: cannot publish there: {cause}"]
    assert "Traceback" not in run.stderr and "unexpected" not in run.stderr
    assert run.ran() == set()
    assert not (workdir / "results").exists(), "no job may have run"
    assert not list(workdir.glob("logs/**/*.log")) and not list(workdir.glob("logs/**/*.tsv"))


@pytest.fixture
def fresh_workdir(tiny_data, tmp_path) -> Path:
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    os.symlink(tiny_data, workdir / "data")
    write_samples(workdir, [CT, WSI])
    return workdir


@pytest_slow
def test_a_local_destination_that_cannot_be_created_stops_the_run_before_any_job(fresh_workdir):
    (fresh_workdir / "a-file").write_text("in the way")
    write_config(fresh_workdir, destination="a-file/published")

    dry = run_snakemake(fresh_workdir, "--dry-run")
    assert dry.returncode == 0 and dry.ran(), "a dry-run plans the jobs and writes no probe"

    run = run_snakemake(fresh_workdir, check=False)
    assert_stopped_before_any_job(
        run, fresh_workdir, "a-file/published", "Not a directory (a-file/published)"
    )
    assert (fresh_workdir / "a-file").read_text() == "in the way"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest_slow
def test_a_read_only_local_destination_stops_the_run_before_any_job(fresh_workdir):
    (fresh_workdir / "published").mkdir(mode=0o555)
    write_config(fresh_workdir, destination="published")
    try:
        run = run_snakemake(fresh_workdir, check=False)
    finally:
        (fresh_workdir / "published").chmod(0o755)
    errors = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
    assert errors and "Permission denied" in errors[0]
    assert_stopped_before_any_job(run, fresh_workdir, "published", errors[0].split("there: ")[1])


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory) -> dict[str, str]:
    return isolated_aws_environment(tmp_path_factory.mktemp("aws"), fake_credentials())


@pytest_slow
def test_a_missing_bucket_stops_the_run_before_any_job(fresh_workdir, moto_server, aws_env):
    missing = new_bucket_name()
    write_config(
        fresh_workdir,
        destination=f"s3://{missing}/published",
        storage={"endpoint_url": moto_server.url, "region": "us-east-1"},
    )
    run = run_snakemake(fresh_workdir, check=False, env=aws_env)
    assert_stopped_before_any_job(
        run, fresh_workdir, f"s3://{missing}/published", f"bucket {missing} does not exist"
    )
    for secret in (aws_env["AWS_ACCESS_KEY_ID"], aws_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in run.stdout + run.stderr


# ---------------------------------------------------------------- workflow, S3 destination


@pytest.fixture
def world(moto_server, aws_env, tiny_data, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    world = World(moto_server, aws_env, tiny_data, workdir)
    yield world
    world.proxy.stop()


@pytest_slow
def test_s3_published_objects_missing_changed_or_tampered_are_republished(world):
    samples = [(CT[0], "ct", "ct/real-dcmqi-3slice"), (WSI[0], "wsi", "wsi/synthetic-01.tiff")]
    for _, _, relative in samples:
        world.upload(relative)
    world.configure(samples)
    assert world.run().ran() == chain(CT[0], "ct") | chain(WSI[0], "wsi")
    s3, bucket = world.s3, world.bucket
    ct_prefix, wsi_prefix = f"published/ct/{CT[0]}/", f"published/wsi/{WSI[0]}/"

    def key_of(prefix: str, name: str) -> str:
        """The key of published file ``name``: its path in the manifest's version."""
        manifest = json.loads(
            s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
        )
        return prefix + next(f["path"] for f in manifest["files"] if f["name"] == name)

    s3.delete_object(Bucket=bucket, Key=key_of(wsi_prefix, "tiles/overlay.png"))
    assert world.run().ran() == {("upload", WSI[0])}
    assert_published_complete(world, samples)

    # one object overwritten (same size, another ETag), the manifest tampered with and a
    # hostile key planted: one republish of that sample
    key = key_of(ct_prefix, "patches/summary.json")
    size = len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    s3.put_object(Bucket=bucket, Key=key, Body=b" " * size)
    s3.put_object(Bucket=bucket, Key="victim.txt", Body=b"keep me")
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=ct_prefix + "manifest.json")["Body"].read()
    )
    manifest["files"].append({"name": "../../../victim.txt"})
    s3.put_object(
        Bucket=bucket, Key=ct_prefix + "manifest.json", Body=json.dumps(manifest).encode()
    )
    s3.put_object(Bucket=bucket, Key=ct_prefix + "../../victim.txt", Body=b"planted")
    rerun = world.run()
    assert rerun.ran() == {("upload", CT[0])}
    assert s3.get_object(Bucket=bucket, Key="victim.txt")["Body"].read() == b"keep me"
    assert f"refusing to delete object '{ct_prefix}../../victim.txt'" in rerun.stderr
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=ct_prefix + "manifest.json")["Body"].read()
    )
    assert "../../../victim.txt" not in {f["name"] for f in manifest["files"]}
    s3.delete_object(Bucket=bucket, Key=ct_prefix + "../../victim.txt")
    assert_published_complete(world, samples)
    assert world.run().ran() == set()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_no_credentials_anywhere(world)
