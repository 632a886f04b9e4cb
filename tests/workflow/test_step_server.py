"""CPU jobs forked from the step server (real processes): each job runs in a child of the
server with the job's environment and working directory, a crashing step fails only its
job, a dead server is replaced, the server and its children end with the process that
started them, and each job's benchmark record holds its child's numbers."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from workflow_support import process_alive

from medprep.workflow import runner
from medprep.workflow.jobs import BENCHMARK_HEADER, Named, StepFailed
from medprep.workflow.step_server import CpuSteps

WAIT_S = 10
CHILD_LINE = re.compile(
    r"in process (\d+), forked by the step server (\d+) of the Snakemake process (\d+)"
)

# A rule script as the server imports it: main(smk) is the step. What the step does is
# chosen by the sample's name.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from medprep.workflow.runner import run_step

    def main(smk):
        sample = smk.wildcards.sample
        facts = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "tmpdir": os.environ.get("TMPDIR"),
            "numpy_before": "numpy" in sys.modules,
        }
        import numpy  # a lazy import: the server imports it after this child
        with open(smk.output.facts, "w") as f:
            json.dump(facts, f)
        if sample.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if sample.startswith("slow"):
            time.sleep(60)
        if sample.startswith("work"):
            held = numpy.ones(200 * 2**20 // 8)  # 200 MB, touched
            deadline = time.process_time() + 0.5
            while time.process_time() < deadline:
                held.sum()
        if sample.startswith("bad"):
            from medprep.common.errors import InputError
            raise InputError("not a CT series", path="in/bad")
        print("a warning the step printed", file=sys.stderr)

    if __name__ == "__main__":
        run_step(snakemake, main)
    """
)


@pytest.fixture
def steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tile_ct.py").write_text(SCRIPT)
    runner.start_run()  # this run's identity, as the workflow writes it
    steps = CpuSteps({}, tmp_path / "scripts")
    yield steps
    steps.server.close()


def run_job(steps: CpuSteps, sample: str, threads: int = 1, tmpdir: str | None = None) -> dict:
    """The job of ``sample`` as a rule's run: block passes it; the facts its step wrote."""
    facts = f"results/ct/{sample}/facts.json"
    Path(facts).parent.mkdir(parents=True, exist_ok=True)
    resources = {"mem_mb": 1000, **({"tmpdir": tmpdir} if tmpdir else {})}
    steps.run(
        "tile_ct",
        Named(),
        Named([facts], {"facts": facts}),
        Named(),
        Named([sample], {"sample": sample}),
        threads,
        Named(resources.values(), resources),
        Named([f"logs/tile_ct/{sample}.log"]),
    )
    return json.loads(Path(facts).read_text())


def child_of(sample: str) -> tuple[int, int, int]:
    """(child, server, Snakemake process) from the job's log."""
    return tuple(
        map(int, CHILD_LINE.search(Path(f"logs/tile_ct/{sample}.log").read_text()).groups())
    )


def record(sample: str) -> dict[str, str]:
    with open(f"logs/benchmarks/tile_ct/{sample}.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 1
    return rows[0]


def test_each_job_runs_in_a_child_of_one_warm_server_set_up_as_the_job(steps, tmp_path):
    first = run_job(steps, "s1", threads=1)
    second = run_job(steps, "s2", threads=2, tmpdir=str(tmp_path / "scratch"))
    server = steps.server.pid()
    assert server not in (None, os.getpid())
    for sample, facts in (("s1", first), ("s2", second)):
        assert facts["ppid"] == server and facts["pid"] != server
        assert child_of(sample) == (facts["pid"], server, os.getpid())
    assert first["cwd"] == second["cwd"] == str(tmp_path)
    assert (first["omp"], second["omp"]) == ("1", "2")
    assert second["tmpdir"] == str(tmp_path / "scratch")
    # the server imported what the first child imported: the second started with it
    assert (first["numpy_before"], second["numpy_before"]) == (False, True)
    # fork-safe: the server runs no other thread (no native thread pool) when it forks
    assert len(os.listdir(f"/proc/{server}/task")) == 1


def printed(caplog) -> list[str]:
    """What the jobs printed through Snakemake's logger."""
    return [r.getMessage() for r in caplog.records if r.name == "snakemake.logging"]


def test_a_step_that_crashes_fails_only_its_job_with_one_line(steps, caplog):
    run_job(steps, "s1")
    server = steps.server.pid()
    with pytest.raises(StepFailed) as failed:
        run_job(steps, "crash1")
    line = str(failed.value)
    assert line == "sample crash1: tile failed: its process was killed by signal 11 (SIGSEGV)"
    errors = [message for message in printed(caplog) if "medprep error" in message]
    assert errors == [f"medprep error: {line} (log: logs/tile_ct/crash1.log)"]
    record_ = json.loads(Path("logs/failures/crash1.tile.json").read_text())
    assert (record_["kind"], record_["message"]) == ("crash", line)
    log = Path("logs/tile_ct/crash1.log").read_text()
    assert line in log and "Fatal Python error: Segmentation fault" in log
    assert not Path("logs/benchmarks/tile_ct/crash1.tsv").exists()
    # a retry in the same run ends at once with the same line; the server went on
    with pytest.raises(StepFailed, match=r"\(crashed, not retried\)$"):
        run_job(steps, "crash1")
    run_job(steps, "s2")
    assert steps.server.pid() == server


def test_a_failing_step_fails_its_job_with_its_line_and_what_it_printed_is_shown(steps, caplog):
    with pytest.raises(StepFailed) as failed:
        run_job(steps, "bad1")
    assert str(failed.value) == "sample bad1: file in/bad: not a CT series"
    run_job(steps, "s1")
    assert printed(caplog) == [
        "medprep error: sample bad1: file in/bad: not a CT series (log: logs/tile_ct/bad1.log)",
        "a warning the step printed",
    ]


def test_a_dead_server_is_replaced(steps):
    run_job(steps, "s1")
    first = steps.server.pid()
    os.kill(first, signal.SIGKILL)  # killed while idle (for memory, say)
    time.sleep(0.2)
    facts = run_job(steps, "s2")
    assert facts["ppid"] == steps.server.pid() != first


def test_a_job_whose_server_dies_fails_and_its_child_ends(steps, tmp_path):
    run_job(steps, "s1")
    server = steps.server.pid()
    facts = tmp_path / "results" / "ct" / "slow1" / "facts.json"

    def kill_the_server_when_the_step_runs() -> None:
        deadline = time.monotonic() + WAIT_S
        while not facts.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(server, signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_the_server_when_the_step_runs)
    killer.start()
    with pytest.raises(StepFailed, match="the step server process ended"):
        run_job(steps, "slow1")
    killer.join()
    child = json.loads(facts.read_text())["pid"]
    deadline = time.monotonic() + WAIT_S
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(child), "the step's child outlived its server"
    assert json.loads(Path("logs/failures/slow1.tile.json").read_text())["kind"] == "internal"


def test_the_benchmark_record_holds_the_childs_numbers(steps):
    run_job(steps, "s1")
    run_job(steps, "work1")
    row = record("work1")
    assert list(row) == list(BENCHMARK_HEADER)
    # the child's own CPU (0.5 s of busy work) and peak memory (200 MB held)
    assert 0.45 <= float(row["cpu_time"]) <= float(row["s"]) + 0.1
    assert 200 <= float(row["max_rss"]) <= 600
    assert row["max_vms"] == row["max_uss"] == row["max_pss"] == "NA"
    assert float(record("s1")["max_rss"]) < float(row["max_rss"]) - 150


PARENT = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path[:0] = {paths!r}
    from test_step_server import run_job, CpuSteps
    from medprep.workflow import runner
    from pathlib import Path
    runner.start_run()
    steps = CpuSteps({{}}, Path("scripts"))
    threading.Thread(target=run_job, args=(steps, "slow1"), daemon=True).start()
    while not Path("results/ct/slow1/facts.json").exists():
        time.sleep(0.02)
    print(steps.server.pid(), open("results/ct/slow1/facts.json").read(), flush=True)
    os.kill(os.getpid(), 9)  # as a killed Snakemake process: no clean-up
    """
)


def test_the_server_and_its_children_end_with_the_snakemake_process(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tile_ct.py").write_text(SCRIPT)
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(paths=[str(Path(__file__).parent), *sys.path]))
    parent = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    server, facts = parent.stdout.split(" ", 1)
    processes = [int(server), json.loads(facts)["pid"]]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and any(map(process_alive, processes)):
        time.sleep(0.1)
    assert not any(map(process_alive, processes)), "the server or its child outlived Snakemake"


WARMED_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main(smk):
        facts = {"before": [m in sys.modules for m in ("medprep.ct.lung", "scipy.ndimage")]}
        from medprep.ct import lung  # the step's lazy import
        with open(smk.output.facts, "w") as f:
            json.dump(facts, f)
    """
)


def test_the_server_warmed_up_at_the_start_holds_what_the_steps_import(steps, tmp_path):
    """Warmed up when the run starts, the server imports what a script's steps may
    import, lazily too (medprep modules through the import graph, and the libraries they
    import): the first job's child starts with them, and the server still runs one thread."""
    (tmp_path / "scripts" / "tile_ct.py").write_text(WARMED_SCRIPT)
    steps.server.warm_up([str(tmp_path / "scripts" / "tile_ct.py")])
    facts = run_job(steps, "first")
    assert facts["before"] == [True, True]
    assert len(os.listdir(f"/proc/{steps.server.pid()}/task")) == 1


def test_without_warm_up_the_first_child_imports_its_step_itself(steps, tmp_path):
    (tmp_path / "scripts" / "tile_ct.py").write_text(WARMED_SCRIPT)
    assert run_job(steps, "first")["before"] == [False, False]
