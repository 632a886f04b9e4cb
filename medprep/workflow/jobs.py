"""Jobs that run as threads of the Snakemake process (``run:`` rules): what they share.

Transfer jobs (``medprep.workflow.transfers``) and CPU jobs (``medprep.workflow.step_server``)
hand their step to another process. What crosses is ``Job``, the attributes a rule
script's ``snakemake`` object has, as plain data. What the step printed comes back and
is printed through Snakemake's logger (``print_among_snakemake_output``). CPU jobs leave
a record in Snakemake's benchmark format (``write_benchmark_record``), which Snakemake's
own ``benchmark:`` cannot give for a job run inside its process.
"""

from __future__ import annotations

import datetime
import os
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprep.common import atomic

PARENT_POLL_S = 0.5
BENCHMARKS_DIR = Path("logs") / "benchmarks"
# Snakemake's benchmark header (snakemake.benchmark.BenchmarkRecord.get_header)
BENCHMARK_HEADER = (
    "s",
    "h:m:s",
    "max_rss",
    "max_vms",
    "max_uss",
    "max_pss",
    "io_in",
    "io_out",
    "mean_load",
    "cpu_time",
)


class StepFailed(Exception):
    """A job's step failed; ``str()`` is the one line already printed for it."""


##### the job, as plain data another process can read #####


class Named(list):
    """Snakemake's ``input``, ``output``, ``params``, ``wildcards``, ``resources`` or
    ``log`` as plain data: a list whose items are also reached by name."""

    def __init__(self, items: Iterable[Any] = (), names: dict[str, Any] | None = None):
        super().__init__(items)
        self._names = dict(names or {})

    @classmethod
    def of(cls, snakemake_list: Any) -> Named:
        return cls(snakemake_list, dict(snakemake_list.items()))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_names"][name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._names.get(name, default)

    def items(self):
        return self._names.items()


@dataclass
class Job:
    """A job as its step sees it: what a rule script's ``snakemake`` object has."""

    rule: str
    input: Named
    output: Named
    params: Named
    wildcards: Named
    threads: int
    resources: Named
    log: Named
    config: dict[str, Any]
    # what the run-ahead bound said when a download was let through (for its log)
    admitted: str | None = None
    snakemake_pid: int = field(default_factory=os.getpid)

    @classmethod
    def of(
        cls,
        rule: str,
        input: Any,
        output: Any,
        params: Any,
        wildcards: Any,
        threads: int,
        resources: Any,
        log: Any,
        config: dict[str, Any],
    ) -> Job:
        """The job of a ``run:`` block, from the names Snakemake gives it."""
        return cls(
            rule,
            Named.of(input),
            Named.of(output),
            Named.of(params),
            Named.of(wildcards),
            int(threads),
            Named.of(resources),
            Named.of(log),
            config,
        )

    @property
    def sample(self) -> str:
        return self.wildcards.get("sample", "-")


##### what runs in the Snakemake process #####


def print_among_snakemake_output(text: str) -> None:
    """Print ``text`` on the Snakemake process's stderr through Snakemake's logger.

    Snakemake writes a message and its line end apart (under its logger's lock): a line
    written by another process, or without that lock, can land in the middle of one of
    its lines."""
    from snakemake.logging import logger

    for line in text.splitlines():
        (logger.error if line.startswith("medprep error") else logger.warning)(line)


def require_threads(workflow: Any) -> None:
    """Stop in one line when jobs would each start a whole Snakemake process.

    Without ``--force-use-threads`` a local ``run:`` job (transfers, CPU steps) is not a
    thread but a new Snakemake process that parses the workflow again: about 1.2 s of
    CPU per job. Called by ``onstart`` (the execution settings are not known while the
    workflow is parsed).
    """
    if not workflow.is_main_process or getattr(workflow, "execution_settings", None) is None:
        return
    if workflow.use_threads:
        return
    print(
        "medprep error: jobs run as threads of the Snakemake process: add "
        "--force-use-threads (profiles/default sets it; a --workflow-profile other than "
        "profiles/default must set it too)",
        file=sys.stderr,
    )
    sys.exit(1)


def end_of_run() -> None:
    """Cancel the re-evaluation timers Snakemake's scheduler left (``onsuccess`` and
    ``onerror``: the run has ended).

    After each scheduling round that started jobs, the scheduler starts a
    ``threading.Timer`` of its rate limit's timespan (``--max-jobs-per-timespan``,
    default 1 s) to schedule again; the timers are not daemons, so the Snakemake process
    waited up to a second for them after its last job, on every run.
    """
    import threading

    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        code = getattr(function, "__code__", None)
        if (
            isinstance(thread, threading.Timer)
            and code is not None
            and Path(code.co_filename).match("snakemake/scheduling/*.py")
        ):
            thread.cancel()


##### what runs in the processes the jobs hand their steps to #####


def exit_with_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process when ``parent`` has (a thread's target). A worker must not
    outlive the process it works for (killed with SIGKILL, say): an orphan finishing a
    step would race the next run's attempt at it."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def process_cpu() -> float:
    """CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


##### per-job records in Snakemake's benchmark format #####


@dataclass(frozen=True)
class Usage:
    """What a job's process used, from its resource usage (``os.wait4``, ``getrusage``).

    ``max_rss_mb``: the peak resident memory of the process or of the largest of its
    waited-for children; ``io_in_mb``/``io_out_mb``: block I/O (512-byte blocks counted
    by the kernel; reads served from the page cache are not I/O).
    """

    wall_s: float
    cpu_s: float
    max_rss_mb: float
    io_in_mb: float
    io_out_mb: float

    @classmethod
    def of(cls, wall_s: float, usages: Sequence[Any], before: Sequence[Any] = ()) -> Usage:
        """From ``resource.struct_rusage`` records: a reaped child's (``os.wait4``), or a
        process's own and its children's since ``before`` (CPU and I/O added, the larger
        peak)."""
        spent = [(u.ru_utime + u.ru_stime, u.ru_inblock, u.ru_oublock) for u in usages]
        for index, earlier in enumerate(before):
            cpu, blocks_in, blocks_out = spent[index]
            spent[index] = (
                cpu - earlier.ru_utime - earlier.ru_stime,
                blocks_in - earlier.ru_inblock,
                blocks_out - earlier.ru_oublock,
            )
        return cls(
            wall_s=wall_s,
            cpu_s=sum(cpu for cpu, _, _ in spent),
            max_rss_mb=max(u.ru_maxrss for u in usages) / 1024,  # KiB on Linux
            io_in_mb=sum(blocks for _, blocks, _ in spent) * 512 / 2**20,
            io_out_mb=sum(blocks for _, _, blocks in spent) * 512 / 2**20,
        )


def benchmark_record_path(rule: str, sample: str) -> Path:
    return BENCHMARKS_DIR / rule / f"{sample}.tsv"


def write_benchmark_record(path: str | os.PathLike, usage: Usage) -> None:
    """Snakemake's benchmark TSV (its header and number format) of one job: what the
    resource usage gives; ``mean_load`` is CPU time over wall time in percent, as
    Snakemake's; NA for what it does not give (virtual, unique and proportional memory)."""
    values = [
        f"{round(usage.wall_s, 4):.2f}",
        str(datetime.timedelta(seconds=int(usage.wall_s))),  # "0:01:05", "1 day, 0:00:00"
        f"{usage.max_rss_mb:.2f}",
        "NA",
        "NA",
        "NA",
        f"{usage.io_in_mb:.2f}",
        f"{usage.io_out_mb:.2f}",
        f"{100 * usage.cpu_s / usage.wall_s if usage.wall_s > 0 else 0.0:.2f}",
        f"{usage.cpu_s:.2f}",
    ]
    atomic.write_text(path, "\t".join(BENCHMARK_HEADER) + "\n" + "\t".join(values) + "\n")
