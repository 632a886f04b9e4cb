"""Working files go after upload, come back only when a rerun needs them; local publishing links.

S3 to S3 against a real moto_server behind the request-recording proxy; reruns are read
from the jobs Snakemake reports, refetches from the requests the proxy saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from s3_workflow_support import CT, NEW_CT, World, chain
from workflow_support import write_config

from medprep import storage

pytestmark = pytest.mark.slow


@pytest.fixture
def world(moto_server, aws_env, tiny_data, tmp_path):  # noqa: F811
    workdir = tmp_path / "work"
    workdir.mkdir()
    world = World(moto_server, aws_env, tiny_data, workdir)
    world.upload(CT[2])
    world.upload(NEW_CT[2])
    world.configure([CT, NEW_CT])
    reconfigure(world)  # the default keep_working_files
    yield world
    world.proxy.stop()


def local_files(world: World, sample: str) -> set[str]:
    folder = world.workdir / "results" / "ct" / sample
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def gets(proxy) -> list[str]:
    return [path for method, path, _ in proxy.stats()["history"] if method == "GET"]


def reconfigure(world: World, **settings) -> None:
    write_config(
        world.workdir,
        destination=f"s3://{world.bucket}/published",
        storage={"endpoint_url": world.endpoint, "region": "us-east-1"},
        **settings,
    )


def test_s3_to_s3_leaves_no_working_files_and_reruns_fetch_only_what_they_need(world):
    samples = [CT[0], NEW_CT[0]]
    assert world.run().ran() == chain(CT[0], "ct") | chain(NEW_CT[0], "ct")
    published = world.published()
    for sample in samples:
        left = local_files(world, sample)
        assert not [f for f in left if f.startswith("download/") and not f.startswith(".")]
        assert not {"preprocess/volume.nii.gz", "preprocess/lung_mask.nii.gz"} & left
        assert "patches/patches.npy" not in left
        # what stays: step manifests, summaries, the QC picture the report shows
        assert {"download.json", "preprocess.json", "tile.json", "upload.json"} <= left
        assert "preprocess/qc.png" in left
        assert {"preprocess/volume.nii.gz", "patches/patches.parquet"} <= set(
            published[f"ct/{sample}"]
        )
    log = (world.workdir / "logs" / "upload" / "ct" / f"{CT[0]}.log").read_text()
    assert "removed" in log and "working files" in log

    assert world.run().ran() == set(), "an unchanged second run must do nothing"

    # A tile setting: tile_ct and upload rerun; the volume and mask come back from the
    # published copy, the raw series is not downloaded again.
    proxy = world.swap_proxy()
    reconfigure(world, ct={"spacing": [3.0, 3.0, 3.0], "patches": {"size_mm": 48, "stride_mm": 24}})
    rerun = world.run()
    assert rerun.ran() == {(r, s) for s in samples for r in ("tile_ct", "upload")}
    fetched = gets(proxy)
    assert not [p for p in fetched if f"/{world.bucket}/ct/" in p], "raw input fetched again"
    assert [p for p in fetched if p.endswith("/preprocess/volume.nii.gz")]
    after = world.published()
    assert (
        after[f"ct/{CT[0]}"]["patches/patches.parquet"]
        != published[f"ct/{CT[0]}"]["patches/patches.parquet"]
    )
    assert (
        after[f"ct/{CT[0]}"]["preprocess/volume.nii.gz"]
        == (published[f"ct/{CT[0]}"]["preprocess/volume.nii.gz"])
    )
    assert "patches/patches.npy" not in local_files(world, CT[0])

    # A preprocess setting needs the raw series: it is downloaded again, once per sample.
    proxy = world.swap_proxy()
    reconfigure(
        world,
        ct={
            "spacing": [3.0, 3.0, 3.0],
            "patches": {"size_mm": 48, "stride_mm": 24},
            "lung": {"dilation_mm": 3},
        },
    )
    rerun = world.run()
    assert rerun.ran() == {(r, s) for s in samples for r in ("preprocess_ct", "tile_ct", "upload")}
    raw = [p for p in gets(proxy) if f"/{world.bucket}/ct/{CT[0]}/" in p]
    slices = json.loads((world.workdir / "results/ct" / CT[0] / "download.json").read_text())
    assert len(raw) == len(slices["files"]), "each raw object fetched once"
    assert not [f for f in local_files(world, CT[0]) if f.startswith("download/")]
    assert world.run().ran() == set()


def test_keep_working_files_keeps_them_and_changing_it_reruns_nothing(world):
    reconfigure(world, keep_working_files=True)
    world.run()
    left = local_files(world, CT[0])
    # (patches are coordinates in the table by default: no patches.npy to keep)
    assert {"preprocess/volume.nii.gz", "preprocess/lung_mask.nii.gz"} <= left
    assert [f for f in left if f.startswith("download/") and f.endswith(".dcm")]
    reconfigure(world, keep_working_files=False)
    assert world.run().ran() == set()


def publish_here(tmp_path: Path, destination: Path) -> tuple[Path, dict]:
    work = tmp_path / "work" / "volume.nii.gz"
    work.parent.mkdir(parents=True)
    work.write_bytes(os.urandom(200_000))
    receipt = storage.publish(
        [{"name": "preprocess/volume.nii.gz", "path": str(work)}],
        str(destination),
        manifest={"sample": "S1"},
    )
    return work, receipt


def test_a_local_destination_on_the_same_file_system_holds_hard_links(tmp_path):
    work, receipt = publish_here(tmp_path, tmp_path / "published")
    published = tmp_path / "published" / receipt["files"][0]["path"]
    assert os.stat(published).st_ino == os.stat(work).st_ino
    assert receipt["files"][0]["action"] == "linked"
    # removing the working file leaves the published one whole
    data = work.read_bytes()
    work.unlink()
    assert published.read_bytes() == data


def test_a_destination_on_another_device_gets_real_copies(tmp_path):
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    destination = other / f"medprep-{os.getpid()}"
    try:
        work, receipt = publish_here(tmp_path, destination)
        published = destination / receipt["files"][0]["path"]
        assert os.stat(published).st_dev != os.stat(work).st_dev
        assert published.read_bytes() == work.read_bytes()
        assert receipt["files"][0]["action"] == "copied"
    finally:
        import shutil

        shutil.rmtree(destination, ignore_errors=True)


def test_which_working_files_go_after_upload(tmp_path):
    from medprep.workflow import working_files as scratch

    assert scratch.keep_working_files(None, "/data/ct/S1") is True
    assert scratch.keep_working_files(None, "s3://bucket/ct/S1/") is False
    assert scratch.keep_working_files(True, "s3://bucket/ct/S1/") is True
    assert scratch.keep_working_files(False, "/data/ct/S1") is False
    download = {"step": "download", "files": [{"path": "/w/download/1.dcm"}]}
    pre = {
        "step": "preprocess",
        "artifacts": [
            {"name": "preprocess/volume.nii.gz", "path": "/w/preprocess/volume.nii.gz"},
            {"name": "preprocess/qc.png", "path": "/w/preprocess/qc.png"},
        ],
    }
    outputs = {"/w/preprocess/qc.png"}
    remote = scratch.working_files([download, pre], outputs, raw_dir="/w/download")
    assert set(map(str, remote)) == {
        "/w/download/1.dcm",
        "/w/download/.medprep-download.json",
        "/w/preprocess/volume.nii.gz",
    }
    # a local input is never removed, only the intermediates
    local = scratch.working_files([download, pre], outputs, raw_dir=None)
    assert set(map(str, local)) == {"/w/preprocess/volume.nii.gz"}


def test_a_working_file_missing_from_the_destination_fails_with_a_clear_line(tmp_path):
    from medprep.common.errors import InputError
    from medprep.workflow import working_files as scratch

    step = {
        "step": "preprocess",
        "sample": "S1",
        "modality": "ct",
        "artifacts": [{"name": "preprocess/volume.nii.gz", "path": str(tmp_path / "v.nii.gz")}],
    }
    with pytest.raises(InputError, match="removed after upload and is not published"):
        scratch._restore_artifacts(step, str(tmp_path / "nowhere"), {})


def test_cpu_jobs_take_one_core_in_a_local_cohort_of_at_least_as_many_samples_as_cores():
    from medprep.workflow.resources import cpu_job_threads

    assert cpu_job_threads(2, samples=12, cores=2, on_cluster=False) == 1
    assert cpu_job_threads(2, samples=1, cores=2, on_cluster=False) == 2
    assert cpu_job_threads(4, samples=12, cores=2, on_cluster=True) == 4
