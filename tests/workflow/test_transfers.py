"""Transfer jobs in the Snakemake process: the run-ahead bound, and the worker processes
that run the transfers (real processes, a local input)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from workflow_support import process_alive

from medprep import storage
from medprep.common import settings as schema
from medprep.workflow.jobs import Job, Named
from medprep.workflow.transfers import RunAhead, RunStopping, TransferPool

WAIT_S = 10


def admit_in_thread(gate: RunAhead, sample: str, mb: int = 1) -> threading.Event:
    admitted = threading.Event()

    def admit() -> None:
        gate.admit(sample, mb)
        admitted.set()

    threading.Thread(target=admit, daemon=True).start()
    return admitted


def test_run_ahead_lets_in_at_most_most_samples_until_one_is_published():
    gate = RunAhead(most=2, poll_s=0.01)
    assert gate.admit("a", 1) == "1 sample(s) fetched but not yet published (at most 2)"
    gate.admit("b", 1)
    third = admit_in_thread(gate, "c")
    assert not third.wait(0.3), "a third sample got in while two were in progress"
    gate.published("a")
    assert third.wait(WAIT_S)
    assert set(gate.in_progress()) == {"b", "c"}


def test_run_ahead_keeps_the_working_sets_within_the_disk_budget():
    gate = RunAhead(budget_mb=100, poll_s=0.01)
    gate.admit("a", 60)
    second = admit_in_thread(gate, "b", 50)
    assert not second.wait(0.3)
    assert admit_in_thread(gate, "c", 40).wait(WAIT_S), "40 MB fit beside 60 MB"
    gate.published("a")
    assert second.wait(WAIT_S)
    assert gate.in_progress() == {"b": 50, "c": 40}


def test_a_sample_larger_than_the_budget_gets_in_alone():
    gate = RunAhead(most=1, budget_mb=10, poll_s=0.01)
    assert "20 of 10 MB" in gate.admit("big", 20)
    after = admit_in_thread(gate, "small", 1)
    assert not after.wait(0.3)
    gate.published("big")
    assert after.wait(WAIT_S)


def test_failed_samples_leave_the_count_and_unpublished_ones_never_enter_it():
    failed: set[str] = set()
    gate = RunAhead(
        most=1, poll_s=0.01, closed=lambda: failed, counted=lambda sample: sample != "partial"
    )
    gate.admit("a", 1)
    assert gate.admit("partial", 1) is None, "a sample the run does not publish is not counted"
    waiting = admit_in_thread(gate, "b")
    assert not waiting.wait(0.3)
    failed.add("a")  # a job of sample a failed for good: it will not be published
    assert waiting.wait(WAIT_S)
    assert set(gate.in_progress()) == {"b"}


def test_a_waiting_download_gives_up_when_the_run_stops():
    reason: list[str] = []
    gate = RunAhead(most=1, poll_s=0.01, stopping=lambda: reason[0] if reason else None)
    gate.admit("a", 1)
    failed = []

    def admit() -> None:
        try:
            gate.admit("b", 1)
        except RunStopping as stop:
            failed.append(str(stop))

    waiting = threading.Thread(target=admit)
    waiting.start()
    time.sleep(0.2)
    reason.append("the run is stopping")
    waiting.join(WAIT_S)
    assert failed == ["the run is stopping"] and set(gate.in_progress()) == {"a"}


def test_a_download_gets_through_when_nothing_else_runs():
    """Only waiting downloads run (the jobs that would make room wait for resources they
    hold, say): after stall_s one is let through beyond the bound, and says so."""
    others = [1]
    gate = RunAhead(most=1, poll_s=0.01, stall_s=0.3, running=lambda: others[0] + gate._waiting)
    gate.admit("a", 1)
    blocked = admit_in_thread(gate, "b")
    assert not blocked.wait(0.6), "let through while another job ran"
    others[0] = 0
    assert blocked.wait(WAIT_S)
    assert set(gate.in_progress()) == {"a", "b"}


def test_a_retried_download_counts_its_sample_once():
    gate = RunAhead(most=2, poll_s=0.01)
    gate.admit("a", 1)
    gate.admit("a", 1)
    assert gate.admit("b", 1) is not None
    assert gate.in_progress() == {"a": 1, "b": 1}


##### the worker processes #####


def download_job(tmp_path: Path, sample: str, source: Path) -> Job:
    """The download job of a local folder, as the rule passes it."""
    uri = str(source)
    return Job(
        rule="download",
        input=Named(),
        output=Named(
            [f"results/ct/{sample}/download.json"],
            {"manifest": f"results/ct/{sample}/download.json"},
        ),
        params=Named(
            names={
                "uri": uri,
                "target_dir": f"results/ct/{sample}/download",
                "fingerprint": storage.source_fingerprint(uri) if source.exists() else "-",
            }
        ),
        wildcards=Named([sample, "ct"], {"sample": sample, "modality": "ct"}),
        threads=0,
        resources=Named(),
        log=Named([f"logs/download/ct/{sample}.log"]),
        config={"storage": schema.config_defaults("storage")},
    )


def worker_of(workdir: Path, sample: str) -> int:
    text = (workdir / "logs" / "download" / "ct" / f"{sample}.log").read_text()
    return int(re.search(r"in transfer worker (\d+) of the Snakemake process (\d+)", text)[1])


@pytest.fixture
def pool():
    pool = TransferPool(workers=1)
    yield pool
    pool.close()


def test_a_worker_runs_jobs_one_after_another_and_outlives_a_failed_one(
    tmp_path, monkeypatch, pool
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in" / "s1").mkdir(parents=True)
    (tmp_path / "in" / "s1" / "a.dcm").write_bytes(b"x" * 100)

    assert pool.run("download", download_job(tmp_path, "s1", tmp_path / "in" / "s1")) == (0, None)
    manifest = json.loads((tmp_path / "results/ct/s1/download.json").read_text())
    assert [f["bytes"] for f in manifest["files"]] == [100]
    worker = worker_of(tmp_path, "s1")
    assert worker != os.getpid()

    code, line = pool.run("download", download_job(tmp_path, "s2", tmp_path / "in" / "gone"))
    assert code == 1 and line.startswith("sample s2: ") and "in/gone" in line
    record = json.loads((tmp_path / "logs/failures/s2.download.json").read_text())
    assert record["message"] == line
    assert line in (tmp_path / "logs/download/ct/s2.log").read_text()
    assert not (tmp_path / "results/ct/s2/download.json").exists()

    assert pool.run("download", download_job(tmp_path, "s3", tmp_path / "in" / "s1"))[0] == 0
    assert worker_of(tmp_path, "s3") == worker, "the warm worker ran the next job"


def test_a_worker_that_died_is_replaced(tmp_path, monkeypatch, pool):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")
    pool.run("download", download_job(tmp_path, "s1", tmp_path / "in"))
    first = worker_of(tmp_path, "s1")
    os.kill(first, signal.SIGKILL)  # killed while idle (for memory, say)
    time.sleep(0.2)
    assert pool.run("download", download_job(tmp_path, "s2", tmp_path / "in"))[0] == 0
    assert worker_of(tmp_path, "s2") != first


PARENT = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = {paths!r}
    from test_transfers import download_job
    from medprep.workflow.transfers import TransferPool
    from pathlib import Path
    pool = TransferPool(workers=1)
    pool.run("download", download_job(Path("."), "s1", Path("in")))
    print(open("logs/download/ct/s1.log").read(), flush=True)
    os.kill(os.getpid(), 9)  # as a killed Snakemake process: no clean-up
    """
)


def test_workers_end_with_the_snakemake_process(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(paths=[str(Path(__file__).parent), *sys.path]))
    parent = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    worker = int(re.search(r"in transfer worker (\d+) ", parent.stdout)[1])
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and process_alive(worker):
        time.sleep(0.1)
    assert not process_alive(worker), "the worker outlived its Snakemake process"


def test_named_reads_like_snakemakes_lists_after_a_round_trip():
    import pickle

    named = pickle.loads(pickle.dumps(Named(["a", "b", "c"], {"one": "a", "two": ["b", "c"]})))
    assert list(named) == ["a", "b", "c"] and named.two == ["b", "c"]
    assert named.get("one") == "a" and dict(named.items()) == {"one": "a", "two": ["b", "c"]}
    with pytest.raises(AttributeError):
        _ = named.three


def test_snakemake_still_has_what_the_run_ahead_bound_reads():
    """SchedulerView reads these (a missing one would quietly bound less, or stall)."""
    import inspect

    import snakemake.api  # noqa: F401 - imports the modules below in the order they need
    from snakemake.dag import DAG
    from snakemake.scheduling.job_scheduler import JobScheduler

    source = inspect.getsource(JobScheduler)
    for attribute in ("running", "failed", "_user_kill", "_errors", "keepgoing"):
        assert re.search(rf"self\.{attribute} = ", source), attribute
    assert "exclude_finished" in inspect.signature(DAG.needrun_jobs).parameters
