"""The workflow on a real one-node SLURM cluster, through profiles/slurm.

One run of the tiny dataset: every CPU job must run as a SLURM job asking for the rule's
threads and memory, the transfers in the Snakemake process itself (localrules: compute
nodes need no network), the outputs must equal a local run's, and a job that SLURM kills
for exceeding its memory must be resubmitted with more and succeed. Skips (with the
reason) where SLURM cannot be started: not root, slurm-wlm/munge missing, daemons fail.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SAMPLES
from slurm_support import (
    JobEvent,
    SlurmCluster,
    SlurmUnavailable,
    job_events,
    own_lines,
    start_cluster,
    stop_cluster,
)
from workflow_support import REPO, Run, run_snakemake, tree_digest, write_config, write_samples

from medprep.workflow.resources import CLUSTER_JOB_OVERHEAD_MB

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm"
CPU_JOBS = {
    (rule, sample)
    for sample, modality, _ in TINY_SAMPLES
    for rule in (f"preprocess_{modality}", f"tile_{modality}")
}
TRANSFER_RULES = ("download", "upload")
WORKER_LINE = re.compile(r"in transfer worker (\d+) of the Snakemake process (\d+)")
# tile_ct's first attempt gets 100 MB, less than the Snakemake process running the job
# step holds (about 180 MB) for the whole step, so SLURM's memory enforcement kills it;
# the second attempt gets 800 MB, enough.
KILLED_RULE = "tile_ct"
MEM_BY_ATTEMPT = "100*attempt**3"


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    try:
        cluster = start_cluster()
    except SlurmUnavailable as reason:
        pytest.skip(str(reason))
    yield cluster
    stop_cluster(cluster)


def tiny_workdir(tmp_path_factory, tiny_data, name: str) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    shutil.copytree(tiny_data, workdir / "data")
    write_samples(workdir, TINY_SAMPLES)
    write_config(workdir)
    return workdir


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory, tiny_data) -> tuple[Path, Run]:
    workdir = tiny_workdir(tmp_path_factory, tiny_data, "slurm")
    run = run_snakemake(
        workdir,
        "--profile",
        str(PROFILE),
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--set-resources",
        f"{KILLED_RULE}:mem_mb={MEM_BY_ATTEMPT}",
        cores=min(cluster.cpus, 2),
        env=cluster.env,
    )
    (workdir / "snakemake.log").write_text(run.stderr)  # to read when a test fails
    return workdir, run


@pytest.fixture(scope="module")
def submissions(slurm_run, cluster) -> list[tuple[JobEvent, dict[str, str]]]:
    """Each SLURM submission: what Snakemake printed about the job, and SLURM's record."""
    events = job_events(slurm_run[1].stderr)
    submitted = []
    for index, event in enumerate(events):
        if event.kind == "submit":
            job = next(
                e for e in reversed(events[:index]) if e.kind == "start" and e.jobid == event.jobid
            )
            submitted.append((job, cluster.job(event.slurm_jobid)))
    return submitted


def test_every_cpu_job_ran_as_a_slurm_job_on_the_node(submissions, slurm_run, cluster):
    assert {(job.rule, job.wildcards["sample"]) for job, _ in submissions} == CPU_JOBS
    for job, record in submissions:
        assert record["NodeList"] == cluster.node
        assert record["Comment"].startswith(f"rule_{job.rule}_wildcards_")
        assert record["WorkDir"] == str(slurm_run[0])
    # The run-wide rules (all, cohort) and the transfers ran in the Snakemake process.
    ran_here = {
        match["rule"]
        for line in own_lines(slurm_run[1].stderr)
        if (match := re.match(r"^localrule (?P<rule>\w+):", line))
    }
    assert {"all", *TRANSFER_RULES} <= ran_here
    assert not ran_here & {rule for rule, _ in CPU_JOBS}


def test_transfers_ran_in_workers_of_the_snakemake_process(slurm_run):
    """Not as SLURM jobs: in warm worker processes of the Snakemake process on the node
    where it runs (the login node), at most `transfers` (2) of them for every transfer."""
    logs = [log for rule in TRANSFER_RULES for log in (slurm_run[0] / "logs" / rule).rglob("*.log")]
    assert len(logs) == 2 * len(TINY_SAMPLES)
    ran_in = {tuple(map(int, WORKER_LINE.search(log.read_text()).groups())) for log in logs}
    workers, snakemake = {w for w, _ in ran_in}, {p for _, p in ran_in}
    assert len(snakemake) == 1 and 1 <= len(workers) <= 2 and not workers & snakemake


def test_cpu_steps_ran_in_the_slurm_jobs_own_process_with_their_records(slurm_run):
    """A SLURM job is a process of its own: its step runs there, without a step server."""
    workdir = slurm_run[0]
    for rule, sample in CPU_JOBS:
        log = (workdir / "logs" / rule / f"{sample}.log").read_text()
        assert "in the job's own process" in log and "forked by the step server" not in log
        header, values = (
            (workdir / "logs" / "benchmarks" / rule / f"{sample}.tsv").read_text().splitlines()
        )
        record = dict(zip(header.split("\t"), values.split("\t"), strict=True))
        assert float(record["s"]) > 0 and float(record["cpu_time"]) > 0, record


def test_slurm_jobs_ask_for_the_rules_threads_and_memory(submissions):
    for job, record in submissions:
        assert int(record["CPUs/Task"]) == max(1, job.threads), (job.rule, record)
        assert f"mem={job.mem_mb}M" in record["TRES"].split(","), (job.rule, job.mem_mb, record)


def test_jobs_of_rules_without_overrides_reserve_the_cluster_overhead(submissions):
    for job, _ in submissions:
        if job.rule != KILLED_RULE:
            assert job.mem_mb > CLUSTER_JOB_OVERHEAD_MB, (job.rule, job.mem_mb)


def test_a_job_killed_for_memory_is_resubmitted_with_more_and_succeeds(submissions):
    killed = [(job, record) for job, record in submissions if job.rule == KILLED_RULE]
    assert {job.wildcards["sample"] for job, _ in killed} == {
        s for r, s in CPU_JOBS if r == KILLED_RULE
    }
    for sample in {job.wildcards["sample"] for job, _ in killed}:
        attempts = [(job, record) for job, record in killed if job.wildcards["sample"] == sample]
        assert len(attempts) >= 2, f"{sample}: submitted once"
        (first, first_record), (last, last_record) = attempts[0], attempts[-1]
        assert first_record["JobState"] == "FAILED"
        assert "exceeded memory limit" in Path(first_record["StdOut"]).read_text()
        assert last_record["JobState"] == "COMPLETED"
        assert last.mem_mb > first.mem_mb


def test_every_final_attempt_completed(submissions):
    final = {}
    for job, record in submissions:
        final[(job.rule, job.wildcards["sample"])] = record["JobState"]
    assert set(final.values()) == {"COMPLETED"}


def test_outputs_equal_a_local_run(slurm_run, tmp_path_factory, tiny_data):
    local = tiny_workdir(tmp_path_factory, tiny_data, "local")
    run_snakemake(local)
    published = tree_digest(slurm_run[0] / "published")
    assert published and published == tree_digest(local / "published")
