"""Transfer jobs as threads of the Snakemake process, end to end: they run in its worker
processes, a failing one fails its sample only, a killed run reruns what is incomplete,
and the samples fetched but not yet published stay within their bound.

S3 inputs come from a real moto_server process (tests/s3_workflow_support.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_SAMPLES
from s3_workflow_support import CT, World, assert_no_credentials_anywhere
from workflow_support import (
    process_alive,
    run_snakemake,
    snakemake_command,
    write_config,
    write_samples,
)

pytestmark = pytest.mark.slow

TIMEOUT_S = 600
WORKER_LINE = re.compile(r"in transfer worker (\d+) of the Snakemake process (\d+)")


def transfer_logs(workdir: Path) -> list[Path]:
    return sorted(
        log for rule in ("download", "upload") for log in (workdir / "logs" / rule).rglob("*.log")
    )


def test_transfer_jobs_run_in_warm_workers_of_the_snakemake_process(workdir):
    process = subprocess.Popen(
        snakemake_command(workdir), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()[-4000:]
    logs = transfer_logs(workdir)
    assert len(logs) == 2 * len(TINY_SAMPLES)
    workers = set()
    for log in logs:
        worker, snakemake = map(int, WORKER_LINE.search(log.read_text()).groups())
        assert snakemake == process.pid, log
        workers.add(worker)
    # 8 transfers in at most `transfers` (2) warm processes, none of them Snakemake's
    assert 1 <= len(workers) <= 2 and process.pid not in workers
    assert "localrule download:" in stderr.decode()


def test_a_run_without_force_use_threads_stops_in_one_line(workdir):
    run = run_snakemake(workdir, "--workflow-profile", "none", check=False)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("medprep error")]
    assert lines == [
        "medprep error: jobs run as threads of the Snakemake process: add "
        "--force-use-threads (profiles/default sets it; a --workflow-profile other than "
        "profiles/default must set it too)"
    ]
    assert not list(workdir.glob("results/*/*/download.json")), "a job ran"


##### S3 inputs #####


def put_copies(world: World, names: list[str]) -> list[tuple[str, str, str]]:
    """The tiny CT series under one prefix per name: samples of the same size."""
    source = world.data / CT[2]
    for name in names:
        for path in sorted(source.iterdir()):
            world.s3.put_object(
                Bucket=world.bucket, Key=f"ct/{name}/{path.name}", Body=path.read_bytes()
            )
    return [(name, "ct", f"s3://{world.bucket}/ct/{name}/") for name in names]


def configure(world: World, samples: list[tuple[str, str, str]]) -> None:
    """Working files removed after each upload (the default for S3 inputs)."""
    write_samples(world.workdir, samples)
    write_config(
        world.workdir,
        destination=f"s3://{world.bucket}/published",
        storage={"endpoint_url": world.endpoint, "region": "us-east-1"},
    )


def fetched_not_published(workdir: Path) -> set[str]:
    """Samples whose raw download is in results/: fetched and not yet published (an
    upload removes it before it ends)."""
    found = set()
    for folder in (workdir / "results" / "ct").glob("*/download"):
        try:
            if any(folder.iterdir()):
                found.add(folder.parent.name)
        except FileNotFoundError:  # removed by its upload while we looked
            pass
    return found


def test_the_samples_fetched_but_not_yet_published_stay_within_the_bound(world):
    names = [f"c{index}" for index in range(6)]
    configure(world, put_copies(world, names))
    most, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, len(fetched_not_published(world.workdir)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        world.run("--resources", "samples_in_progress=2")
    finally:
        stop.set()
        sampler.join()
    assert 1 <= most <= 2, f"{most} samples were fetched but not yet published at once"
    # what the bound said to each download when it let it through
    said = [
        int(match[1])
        for name in names
        if (
            match := re.search(
                r"run-ahead: (\d+) sample\(s\) fetched but not yet published \(at most 2\)",
                (world.workdir / "logs" / "download" / "ct" / f"{name}.log").read_text(),
            )
        )
    ]
    assert len(said) == len(names) and max(said) == 2
    assert fetched_not_published(world.workdir) == set()


def test_failed_samples_and_a_partial_run_do_not_hold_the_bound(world):
    samples = put_copies(world, ["c0", "c1", "c2"])
    world.s3.put_object(Bucket=world.bucket, Key="ct/broken/01.dcm", Body=b"not a DICOM file")
    samples.append(("broken", "ct", f"s3://{world.bucket}/ct/broken/"))
    configure(world, samples)
    # --until tile_ct: no upload in this run, so no sample is ever published
    run = world.run("--resources", "samples_in_progress=1", "--until", "tile_ct", check=False)
    assert {s for r, s in run.ran() if r == "tile_ct"} == {"c0", "c1", "c2"}
    # the broken sample fails in preprocess_ct for good; the others still get through one
    # at a time
    run = world.run("--resources", "samples_in_progress=1", check=False)
    assert run.returncode != 0
    assert {s for r, s in run.ran() if r == "upload"} == {"c0", "c1", "c2"}
    assert "medprep error: sample broken: " in run.stderr


@pytest.mark.parametrize(
    "stop,said",
    [(signal.SIGTERM, "the run is stopping"), (signal.SIGINT, "the run was interrupted")],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_a_run_stopped_while_downloads_wait_for_room_ends(world, stop, said):
    """Snakemake starts no more jobs and waits for the running ones; downloads waiting
    for run-ahead room would wait for uploads that never come, so they give up."""
    configure(world, put_copies(world, ["c0", "c1", "c2"]))
    process = subprocess.Popen(
        snakemake_command(world.workdir, "--resources", "samples_in_progress=1"),
        cwd=world.workdir,
        env={**os.environ, **world.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not list(world.workdir.glob("logs/preprocess_ct/*.log")):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(stop)  # a CPU job runs, the other downloads wait
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert f"download not started: {said}" in stderr


def test_a_transfer_that_fails_fails_only_its_sample_with_one_line(world):
    samples = put_copies(world, ["c0", "c1"])
    # an object key that would leave the sample's folder: refused by the download
    world.s3.put_object(Bucket=world.bucket, Key="ct/bad/../../outside.dcm", Body=b"x")
    world.s3.put_object(Bucket=world.bucket, Key="ct/bad/01.dcm", Body=b"x")
    samples.append(("bad", "ct", f"s3://{world.bucket}/ct/bad/"))
    configure(world, samples)
    run = world.run(check=False)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "medprep error: sample bad" in line]
    # one line per attempt (retries: 1; an input error ends the retry at once)
    assert len(lines) == 2 and "outside.dcm" in lines[0]
    assert "(input error, not retried)" in lines[1]
    assert {s for r, s in run.ran() if r == "upload"} == {"c0", "c1"}
    record = json.loads((world.workdir / "logs" / "failures" / "bad.download.json").read_text())
    assert record["message"] in lines[0]
    assert record["message"] in (world.workdir / "logs/download/ct/bad.log").read_text()
    workers = {
        match[1]
        for log in transfer_logs(world.workdir)
        if (match := WORKER_LINE.search(log.read_text()))
    }
    assert len(workers) <= 2, "a failed transfer ended its worker"
    assert_no_credentials_anywhere(world)


STEP_MANIFESTS = {
    "download": "download.json",
    "preprocess_ct": "preprocess.json",
    "tile_ct": "tile.json",
    "upload": "upload.json",
}


def test_a_run_killed_during_a_download_reruns_what_is_incomplete_only(world):
    """Killed (SIGKILL, the Snakemake process alone, as a crash) while the second sample
    is fetched, the first published: the rerun runs the other samples' chains, not the
    first's, and nothing half-fetched looked finished."""
    names = ["c0", "c1", "c2"]
    configure(world, put_copies(world, names))
    world.swap_proxy(latency_ms=300, latency_methods="GET")
    process = subprocess.Popen(
        snakemake_command(world.workdir, "--resources", "samples_in_progress=1"),
        cwd=world.workdir,
        env={**os.environ, **world.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = world.workdir / "results" / "ct"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            published = {n for n in names if (results / n / "upload.json").exists()}
            fetching = fetched_not_published(world.workdir) - published
            if published and fetching:
                break
            time.sleep(0.02)
        assert published and fetching, "no sample was fetched after one was published"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    done = {
        (rule, name)
        for name in names
        for rule, manifest in STEP_MANIFESTS.items()
        if (results / name / manifest).exists()
    }
    (sample,) = fetching
    assert ("download", sample) not in done, "a half-fetched sample looked fetched"
    log = (world.workdir / "logs" / "download" / "ct" / f"{sample}.log").read_text()
    worker = int(WORKER_LINE.search(log)[1])
    deadline = time.monotonic() + 10
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker), "the transfer worker outlived its Snakemake process"

    world.swap_proxy()
    world.run("--unlock")  # a killed snakemake leaves its lock, as after a power loss
    rerun = world.run()
    assert rerun.ran() == {(rule, n) for n in names for rule in STEP_MANIFESTS} - done
    manifest = json.loads((results / sample / "download.json").read_text())
    keys = {
        o["Key"].rsplit("/", 1)[1]: o["ETag"].strip('"')
        for o in world.s3.list_objects_v2(Bucket=world.bucket, Prefix=f"ct/{sample}/")["Contents"]
    }
    assert {f["key"]: f["etag"] for f in manifest["files"]} == keys
    assert world.run().ran() == set(), "everything was complete after the rerun"
