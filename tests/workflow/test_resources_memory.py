"""Memory-aware scheduling: mem_mb from each job's input, and --resources mem_mb=N obeyed.

A job killed for exceeding its memory on a cluster is retried with more: see test_slurm.py,
where SLURM itself kills the job.
"""

from __future__ import annotations

import csv
import re
from datetime import datetime
from pathlib import Path

import pytest
from conftest import TINY_SAMPLES
from slurm_support import JobEvent, job_events
from workflow_support import copy_workdir, run_snakemake

from medprep.workflow import resources as mw

pytestmark = pytest.mark.slow

CT_SAMPLES = [sample for sample, modality, _ in TINY_SAMPLES if modality == "ct"]
# Two 2-thread jobs fit in these cores together: only memory can keep them apart.
CORES = 4


@pytest.fixture
def downloaded(workdir) -> Path:
    """The tiny dataset with the CT samples downloaded: both preprocess_ct jobs are ready."""
    run_snakemake(workdir, *(f"results/ct/{s}/download.json" for s in CT_SAMPLES))
    return workdir


def preprocess_targets() -> list[str]:
    return [f"results/ct/{sample}/preprocess.json" for sample in CT_SAMPLES]


def started(events: list[JobEvent], rule: str) -> list[JobEvent]:
    return [e for e in events if e.kind == "start" and e.rule == rule]


def test_jobs_that_do_not_fit_the_memory_budget_together_run_one_after_the_other(downloaded):
    planned = started(
        job_events(run_snakemake(downloaded, "-n", *preprocess_targets()).stdout), "preprocess_ct"
    )
    mems = sorted(job.mem_mb for job in planned)
    budget = mems[-1]
    assert len(mems) == 2 and mems[0] > budget / 2, (
        f"each job must need over half of {budget}: {mems}"
    )
    control = copy_workdir(downloaded, downloaded.parent / "control")

    run = run_snakemake(
        downloaded, f"--resources=mem_mb={budget}", *preprocess_targets(), cores=CORES
    )

    events = job_events(run.stderr)
    first, second = started(events, "preprocess_ct")
    assert log_index(events, "finish", first.jobid) < log_index(events, "start", second.jobid)
    intervals = sorted(step_interval(downloaded, "preprocess_ct", s) for s in CT_SAMPLES)
    assert intervals[0][1] <= intervals[1][0], f"the jobs overlapped: {intervals}"

    # Without the budget the same two jobs are started together.
    unbounded = job_events(run_snakemake(control, *preprocess_targets(), cores=CORES).stderr)
    first, second = started(unbounded, "preprocess_ct")
    assert log_index(unbounded, "start", second.jobid) < log_index(unbounded, "finish", first.jobid)


def test_a_plain_run_is_bounded_by_the_memory_the_machine_has(downloaded):
    """`snakemake --cores N` with no --resources: the budget is the memory available."""
    # Two jobs of 70 % of the available memory each: together they do not fit.
    big = int(0.7 * mw.available_memory_mb())
    run = run_snakemake(
        downloaded,
        f"--set-resources=preprocess_ct:mem_mb={big}",
        *preprocess_targets(),
        cores=CORES,
    )
    assert re.search(r"Provided resources: .*mem_mb=", run.stderr), "no default memory budget"
    events = job_events(run.stderr)
    first, second = started(events, "preprocess_ct")
    assert first.mem_mb == second.mem_mb == big
    assert log_index(events, "finish", first.jobid) < log_index(events, "start", second.jobid)


def log_index(events: list[JobEvent], kind: str, jobid: str) -> int:
    return next(i for i, e in enumerate(events) if e.kind == kind and e.jobid == jobid)


def step_interval(workdir: Path, rule: str, sample: str) -> tuple[datetime, datetime]:
    """When the job's script logged its first and its last line (the step's own clock)."""
    stamps = [
        datetime.strptime(match.group(0), "%Y-%m-%d %H:%M:%S,%f")
        for line in (workdir / "logs" / rule / f"{sample}.log").read_text().splitlines()
        if (match := re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line))
    ]
    return stamps[0], stamps[-1]


def test_every_job_reserves_at_least_its_measured_peak(workdir):
    run = run_snakemake(workdir)
    chain = ("download", "preprocess_ct", "preprocess_wsi", "tile_ct", "tile_wsi", "upload")
    jobs = [job for job in job_events(run.stderr) if job.kind == "start" and job.rule in chain]
    assert len(jobs) == 4 * len(TINY_SAMPLES)
    for job in jobs:
        peak = benchmark_max_rss(workdir, job)
        assert peak is None or peak <= job.mem_mb, f"{job.rule} {job.wildcards}: {peak} MB"


def benchmark_max_rss(workdir: Path, job: JobEvent) -> float | None:
    """Peak RSS (MB) the job's benchmark file recorded (sampled: None if none was taken);
    for a transfer, the peak its worker process had reached by the job's end (its log)."""
    if job.rule in ("download", "upload"):
        log = (
            workdir
            / "logs"
            / job.rule
            / job.wildcards["modality"]
            / f"{job.wildcards['sample']}.log"
        )
        return float(re.search(r"peak memory of the worker (\d+) MB", log.read_text())[1])
    folder = workdir / "logs" / "benchmarks" / job.rule
    if "modality" in job.wildcards:
        folder /= job.wildcards["modality"]
    with open(folder / f"{job.wildcards['sample']}.tsv") as f:
        value = list(csv.DictReader(f, delimiter="\t"))[-1]["max_rss"]
    return None if value in ("NA", "-") else float(value)


@pytest.mark.parametrize("step", ["download", "upload", "tile_wsi"])
def test_a_retried_job_asks_for_more_memory(step, tmp_path):
    inputs = step_inputs(step, tmp_path)
    first = mw.mem_mb(step, threads=2, attempt=1, **inputs)
    assert mw.mem_mb(step, threads=2, attempt=2, **inputs) >= 2 * first - 1
    assert mw.mem_mb(step, threads=2, attempt=1, on_cluster=True, **inputs) > first


def step_inputs(step: str, tmp_path: Path) -> dict:
    """What the rule's memory function passes for ``step`` (inputs it needs, made up)."""
    if step == "upload":
        return {"destination": "s3://bucket/out", "part_size_mb": 32}
    if step == "tile_wsi":
        manifest = tmp_path / "preprocess.json"
        manifest.write_text('{"summary": {"tissue_area_mm2": 50.0, "target_mpp": 0.5}}')
        tile = {"size": 256, "stride": None, "block_tiles": 8, "format": "jpeg", "container": "tar"}
        return {"preprocess_manifest": str(manifest), "tile_settings": tile}
    return {}
