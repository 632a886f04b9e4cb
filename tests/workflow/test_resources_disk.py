"""Local disk as a scheduled resource: --resources disk_mb=N bounds what results/ holds.

S3 inputs (a real moto_server) to an S3 destination: each sample's raw download and
intermediates live in results/ only until its upload. The disk results/ takes is sampled
while the workflow runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_support import (
    MotoServer,
    fake_credentials,
    isolated_aws_environment,
    new_bucket_name,
    raw_client,
)
from slurm_support import JobEvent, job_events
from workflow_support import DiskSampler, folder_bytes, run_snakemake, write_config, write_samples

from medprep.demo.ct_phantom import write_chest_phantom

pytestmark = pytest.mark.slow

SAMPLES = ["p1", "p2", "p3"]
CORES = 4
MB = 1024 * 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A bucket with three 2.4 MB CT series, and the environment that reaches it."""
    env = isolated_aws_environment(tmp_path_factory.mktemp("aws"), fake_credentials())
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        bucket = new_bucket_name()
        s3 = raw_client(server.url, env)
        s3.create_bucket(Bucket=bucket)
        data = tmp_path_factory.mktemp("series")
        for index, sample in enumerate(SAMPLES):
            folder = data / sample
            write_chest_phantom(
                folder, rows=160, cols=160, slices=48, pixel_mm=2.5, slice_mm=5.0, seed=index
            )
            for path in sorted(folder.iterdir()):
                s3.put_object(Bucket=bucket, Key=f"ct/{sample}/{path.name}", Body=path.read_bytes())
        yield server, bucket, env


def new_workdir(tmp_path: Path, store, name: str) -> Path:
    server, bucket, _ = store
    workdir = tmp_path / name
    workdir.mkdir()
    write_samples(workdir, [(s, "ct", f"s3://{bucket}/ct/{s}/") for s in SAMPLES])
    write_config(
        workdir,
        destination=f"s3://{bucket}/published/{name}",
        storage={"endpoint_url": server.url, "region": "us-east-1"},
    )
    return workdir


def run_sampled(workdir: Path, store, *args: str, check: bool = True):
    (workdir / "results").mkdir(exist_ok=True)
    with DiskSampler(workdir / "results", every_s=0.05) as sampler:
        run = run_snakemake(workdir, *args, cores=CORES, env=store[2], check=check)
    return run, sampler.peak


def running_disk(events: list[JobEvent]) -> int:
    """The most disk_mb that jobs running at the same time held together."""
    disk_of = {e.jobid: e.disk_mb or 0 for e in events if e.kind == "start"}
    running, most = set(), 0
    for event in events:
        if event.kind == "start" and event.jobid in disk_of:
            running.add(event.jobid)
            most = max(most, sum(disk_of[j] for j in running))
        elif event.kind == "finish":
            running.discard(event.jobid)
    return most


def test_a_disk_budget_bounds_the_disk_results_takes(tmp_path, store):
    free = new_workdir(tmp_path, store, "free")
    run, free_peak = run_sampled(free, store)
    events = job_events(run.stderr)
    budget = max(e.disk_mb for e in events if e.kind == "start" and e.disk_mb)
    # without a budget, jobs of several samples held more than one working set at once
    assert running_disk(events) > budget

    bounded = new_workdir(tmp_path, store, "bounded")
    run, peak = run_sampled(bounded, store, f"--resources=disk_mb={budget}")
    assert running_disk(job_events(run.stderr)) <= budget
    assert peak <= budget * MB, f"results/ reached {peak / MB:.1f} MB, budget {budget} MB"
    assert peak < free_peak
    # what stays after S3 to S3: manifests, summaries and QC pictures only
    assert folder_bytes(bounded / "results") < 0.05 * len(SAMPLES) * 2.4e6


def test_a_sample_larger_than_the_disk_budget_fails_with_a_clear_line(tmp_path, store):
    workdir = new_workdir(tmp_path, store, "small")
    run, _ = run_sampled(workdir, store, "--resources=disk_mb=1", check=False)
    assert run.returncode != 0
    for sample in SAMPLES:
        assert f"medprep error: sample {sample}: needs " in run.stderr
    assert "more than the whole disk budget of 1 MB" in run.stderr


def test_a_job_larger_than_the_default_budget_runs_alone_instead_of_failing(tmp_path, store):
    # The default budget is sized from the downloads, before any output is known; patches
    # materialised at a fine stride make the tile step's working set larger than it.
    server, bucket, env = store
    workdir = tmp_path / "materialised"
    workdir.mkdir()
    write_samples(workdir, [("p1", "ct", f"s3://{bucket}/ct/p1/")])
    write_config(
        workdir,
        destination=f"s3://{bucket}/published/materialised",
        storage={"endpoint_url": server.url, "region": "us-east-1"},
        ct={"patches": {"materialise": "normalised", "size_mm": 64, "stride_mm": 8}},
    )
    run, _ = run_sampled(workdir, store)
    events = [e for e in job_events(run.stderr) if e.kind == "start" and e.disk_mb]
    budget = max(e.disk_mb for e in events)
    log = (workdir / "logs" / "tile_ct" / "p1.log").read_text()
    assert f"more than the default budget of {budget} MB: runs alone" in log
    assert (workdir / "results" / "ct" / "p1" / "upload.json").is_file()
