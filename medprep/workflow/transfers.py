"""Transfer jobs (download, upload, annotation fetches) inside the Snakemake process.

The transfer rules are ``run:`` jobs. With ``--force-use-threads`` (profiles/default; on
a cluster Snakemake sets it itself) Snakemake runs them as threads of its own process:
no process starts per job and no core is held. Each thread hands its transfer to one of
``transfers`` warm worker processes (``python -m medprep.workflow.transfers``), which
keep their S3 client and connection pool from one job to the next; the Snakemake process
itself only waits. (Run as threads of the Snakemake process, transfers would spend its
one interpreter on boto3 and checksums, 0.5 s of CPU per 63 MB series, and its
scheduling would then keep a few cores fed only.)

A worker runs the step as a rule script would (``runner.execute_step``): its own log
file, the one line on failure, the failure record. A failed transfer fails its job and
sample only; a worker that dies fails the job it ran, and another takes its place.
Workers end with the Snakemake process, even when it is killed.

Run-ahead: downloads hold no core, so nothing in Snakemake's scheduling would keep them
from fetching samples far ahead of the CPU steps (Snakemake frees a job's ``disk_mb``
when the job ends). ``RunAhead`` bounds the samples fetched but not yet published: a
download waits until there are fewer than ``samples_in_progress`` of them (default
``cores + 2``) and their working sets fit in ``disk_mb`` (when there is a disk budget).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medprep.workflow.jobs import (
    Job,
    Named,
    StepFailed,
    exit_with_parent,
    print_among_snakemake_output,
    process_cpu,
    require_threads,
)

log = logging.getLogger(__name__)

# The global resource that caps the samples fetched but not yet published (--resources
# samples_in_progress=N); without it, cores + SPARE_SAMPLES.
IN_PROGRESS_RESOURCE = "samples_in_progress"
SPARE_SAMPLES = 2
# Transfer worker processes when the workflow registered no `transfers` resource.
DEFAULT_WORKERS = 2
WAIT_POLL_S = 0.5
# Only downloads waiting for run-ahead room running for this long: nothing will make room.
STALL_S = 10.0
EXIT_WORKER_LOST = 2


##### run-ahead: samples fetched but not yet published #####


class RunStopping(Exception):
    """The run ends (stopped, or stopping after a failed job): a waiting download gives up."""


@dataclass
class RunAhead:
    """Samples fetched but not yet published: fewer than ``most`` of them, and their
    working sets (MB) within ``budget_mb``; ``None`` bounds nothing.

    A download calls ``admit`` before it fetches and waits there until its sample fits;
    one sample is always let through when none is in progress (a sample larger than the
    budget then runs alone). ``published`` ends a sample. What the run tells, polled
    while downloads wait:

    - ``closed()``: samples that will not be published in this run (a job of theirs
      failed for good); they leave the count;
    - ``counted(sample)``: false for samples the run does not publish at all (a run of
      part of the workflow, ``--until tile_ct`` say); those are not counted, or the run
      would wait for them forever;
    - ``stopping()``: why the run starts no more jobs (stopped by a signal, or by a failed
      job without --keep-going), or None; waiting downloads then raise ``RunStopping``;
    - ``running()``: the jobs running, waiting downloads included. When none but the
      waiting downloads has run for ``stall_s``, nothing will make room (the jobs that
      would wait for resources the waiting downloads hold, memory say): one is let
      through beyond the bound, and says so.
    """

    most: int | None = None
    budget_mb: int | None = None
    counted: Callable[[str], bool] = lambda sample: True
    closed: Callable[[], Iterable[str]] = tuple
    stopping: Callable[[], str | None] = lambda: None
    running: Callable[[], int | None] = lambda: None
    poll_s: float = WAIT_POLL_S
    stall_s: float = STALL_S
    _held: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _waiting: int = field(default=0, init=False, repr=False)
    _condition: threading.Condition = field(
        default_factory=threading.Condition, init=False, repr=False
    )

    def admit(self, sample: str, mb: int) -> str | None:
        """Wait until ``sample`` (a working set of ``mb``) fits, then count it in.

        Returns what the bound said (for the job's log), or None for an uncounted sample.
        """
        if not self.counted(sample):
            return None
        with self._condition:
            self._held.pop(sample, None)  # a retried download counts its sample once
            self._drop_closed()
            stalled_since = None
            self._waiting += 1
            try:
                while not self._fits(mb):
                    if (reason := self.stopping()) is not None:
                        raise RunStopping(reason)
                    stalled_since = self._stalled(stalled_since)
                    if (
                        stalled_since is not None
                        and time.monotonic() - stalled_since >= self.stall_s
                    ):
                        self._held[sample] = mb
                        return (
                            f"{self._describe()}; let through beyond the bound: no other job "
                            f"ran for {self.stall_s:.0f} s"
                        )
                    self._condition.wait(self.poll_s)
                    self._drop_closed()
            finally:
                self._waiting -= 1
            self._held[sample] = mb
            return self._describe()

    def published(self, sample: str) -> None:
        with self._condition:
            if self._held.pop(sample, None) is not None:
                self._condition.notify_all()

    def in_progress(self) -> dict[str, int]:
        """The samples fetched (or being fetched) and not yet published, with their MB."""
        with self._condition:
            return dict(self._held)

    def _fits(self, mb: int) -> bool:
        if not self._held:
            return True
        if self.most is not None and len(self._held) >= self.most:
            return False
        return self.budget_mb is None or sum(self._held.values()) + mb <= self.budget_mb

    def _stalled(self, since: float | None) -> float | None:
        """Since when only waiting downloads run (None: other jobs run, or cannot tell)."""
        running = self.running()
        if running is None or running > self._waiting:
            return None
        return since if since is not None else time.monotonic()

    def _drop_closed(self) -> None:
        for sample in set(self.closed()) & set(self._held):
            del self._held[sample]

    def _describe(self) -> str:
        most = "no limit" if self.most is None else f"at most {self.most}"
        text = f"{len(self._held)} sample(s) fetched but not yet published ({most})"
        if self.budget_mb is not None:
            text += f", {sum(self._held.values())} of {self.budget_mb} MB of local disk"
        return text


##### the worker processes #####


class TransferPool:
    """Up to ``workers`` worker processes, each running one transfer at a time; started
    when transfers come, kept for the run."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()

    def run(self, step: str, job: Job) -> tuple[int, str | None]:
        """``execute_step`` of ``step`` in a worker: (0, None) or (exit code, its line)."""
        worker = self._take()
        try:
            code, line, printed = worker.run(step, job)
        except (OSError, EOFError, pickle.UnpicklingError):
            worker.stop()
            with self._lock:
                self._started -= 1
            line = (
                f"sample {job.sample}: {step} failed: its transfer worker process ended "
                f"(exit status {worker.process.poll()}; killed, out of memory?)"
            )
            print_among_snakemake_output(f"medprep error: {line}")
            return EXIT_WORKER_LOST, line
        self._idle.put(worker)
        if printed:
            print_among_snakemake_output(printed.rstrip("\n"))
        return code, line

    def close(self) -> None:
        """End the idle workers (the others end when their job has and Python exits)."""
        while not self._idle.empty():
            self._idle.get().close()

    def _take(self) -> _Worker:
        """An idle worker, a new one while fewer than ``workers`` run, or the next to be
        idle; a worker that died while idle (killed for memory, say) is replaced."""
        while True:
            with self._lock:
                start = self._idle.empty() and self._started < self.workers
                if start:
                    self._started += 1
            if start:
                try:
                    return _Worker()
                except BaseException:
                    with self._lock:
                        self._started -= 1
                    raise
            worker = self._idle.get()
            if worker.process.poll() is None:
                return worker
            with self._lock:
                self._started -= 1


class _Worker:
    """One ``python -m medprep.workflow.transfers`` process: (step, job) in on its stdin,
    (exit code, line) out on its stdout, both pickled."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medprep.workflow.transfers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests: IO[bytes] = self.process.stdin
        self.replies: IO[bytes] = self.process.stdout

    def run(self, step: str, job: Job) -> tuple[int, str | None, str]:
        """(exit code, the failure's line, what the step printed on stderr)."""
        # pickled whole before any byte is sent: a job that cannot be pickled must not
        # leave half a message in the worker's pipe
        message = pickle.dumps((step, job), protocol=pickle.HIGHEST_PROTOCOL)
        self.requests.write(message)
        self.requests.flush()
        return pickle.load(self.replies)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.requests.close()  # the worker's loop ends at the end of its input
        self.process.wait()
        self.replies.close()


def serve() -> None:
    """A worker: run the jobs that come on stdin until it closes (the Snakemake process
    ended)."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what a step prints must not end up in the channel
    # Ctrl-C reaches the whole process group: the transfer finishes, and Snakemake ends
    # the run after its running jobs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            step, job = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        pickle.dump(_run_in_worker(step, job), channel, protocol=pickle.HIGHEST_PROTOCOL)
        channel.flush()


def _run_in_worker(step: str, job: Job) -> tuple[int, str | None, str]:
    from medprep.workflow import runner, transfer_steps

    main = transfer_steps.STEPS[step]

    def in_worker(job: Job) -> None:
        started = process_cpu()
        log.info(
            "in transfer worker %d of the Snakemake process %d (%.2f s CPU before this job)",
            os.getpid(),
            job.snakemake_pid,
            started,
        )
        if job.admitted:
            log.info("run-ahead: %s", job.admitted)
        try:
            main(job)
        finally:
            # one job at a time per worker: the worker's CPU is this job's; its peak
            # memory is that of every job it ran so far
            log.info(
                "%s: %.2f s CPU; peak memory of the worker %.0f MB",
                step,
                process_cpu() - started,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )

    # what the step prints (its one line on failure, warnings) goes to the Snakemake
    # process, which prints it among its own output (print_among_snakemake_output)
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        code, line = runner.execute_step(job, in_worker)
    return code, line, printed.getvalue()


##### what the rules call #####


class Transfers:
    """The transfer jobs of one Snakemake process: its worker pool and run-ahead bound.

    The rules call ``download``, ``annotations`` and ``upload`` from their ``run:``
    blocks with the job's ``input, output, params, wildcards, resources, log, rule``;
    each raises ``StepFailed`` when its step failed.
    """

    def __init__(self, config: dict[str, Any], workers: int, run_ahead: RunAhead | None = None):
        self.config = config
        self.pool = TransferPool(workers)
        self.run_ahead = run_ahead
        self.interrupted: str | None = None

    def on_start(self, workflow: Any) -> None:
        """Before the first job (``onstart``, in the main thread): stop in one line without
        --force-use-threads (``require_threads``); note Ctrl-C, after which Snakemake waits
        for its running jobs, downloads waiting for run-ahead room among them."""
        require_threads(workflow)
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # ignored, or the default: Snakemake's own business
            return

        def interrupted(signum: int, frame: Any) -> None:
            self.interrupted = "the run was interrupted"
            previous(signum, frame)

        signal.signal(signal.SIGINT, interrupted)

    @classmethod
    def for_workflow(cls, workflow: Any, config: dict[str, Any]) -> Transfers:
        """Workers: the ``transfers`` resource; run-ahead: ``samples_in_progress`` (default
        cores + 2, or jobs + 2 on a cluster) and ``disk_mb`` (when set)."""
        resources = workflow.global_resources
        workers = _resource(resources, "transfers") or DEFAULT_WORKERS
        most = _resource(resources, IN_PROGRESS_RESOURCE)
        if most is None:
            slots = _resource(resources, "_nodes" if workflow.non_local_exec else "_cores")
            most = slots + SPARE_SAMPLES if slots and slots < sys.maxsize else None
        scheduler = SchedulerView(workflow)
        transfers = cls(config, workers)
        transfers.run_ahead = RunAhead(
            most=most,
            budget_mb=_resource(resources, "disk_mb"),
            counted=scheduler.publishes,
            closed=scheduler.failed_samples,
            stopping=lambda: transfers.interrupted or scheduler.stopping(),
            running=scheduler.running,
        )
        return transfers

    def download(self, *job: Any) -> None:
        self._run("download", self._job(*job))

    def annotations(self, *job: Any) -> None:
        self._run("annotations", self._job(*job))

    def upload(self, *names: Any) -> None:
        job = self._job(*names)
        self._run("upload", job)
        if self.run_ahead is not None:
            self.run_ahead.published(job.sample)

    def _job(
        self,
        input: Any,
        output: Any,
        params: Any,
        wildcards: Any,
        resources: Any,
        log: Any,
        rule: str,
    ) -> Job:
        return Job.of(rule, input, output, params, wildcards, 0, resources, log, self.config)

    def _run(self, step: str, job: Job) -> None:
        if step == "download" and self.run_ahead is not None:
            self._admit(job, self.run_ahead)
        code, line = self.pool.run(step, job)
        if code:
            raise StepFailed(line)

    def _admit(self, job: Job, run_ahead: RunAhead) -> None:
        """Wait for run-ahead room (``RunAhead``) before the download fetches."""
        need = int(job.resources.get("disk_need_mb") or 0)
        try:
            job.admitted = run_ahead.admit(job.sample, need)
        except RunStopping as stop:
            raise StepFailed(f"sample {job.sample}: download not started: {stop}") from None
        if run_ahead.budget_mb is not None:
            # what Snakemake's disk_mb would have granted: a working set larger than the
            # whole budget fails, or runs alone under the default budget
            # (runner.check_disk_budget)
            granted = min(need, run_ahead.budget_mb)
            job.resources = Named(job.resources, {**job.resources._names, "disk_mb": granted})


def _resource(resources: dict[str, Any], name: str) -> int | None:
    value = resources.get(name)
    value = getattr(value, "value", value)  # parsed resources carry their value
    return int(value) if isinstance(value, (int, float)) else None


class SchedulerView:
    """What the run-ahead bound asks Snakemake's scheduler and DAG while the run executes.

    These are attributes of Snakemake 9's ``JobScheduler`` (``running``, ``failed``,
    ``_user_kill``, ``_errors``, ``keepgoing``) and ``DAG`` (``needrun_jobs``), read only;
    tests/workflow/test_transfers_workflow.py runs what depends on each of them.
    """

    def __init__(self, workflow: Any):
        self.workflow = workflow
        self._published: set[str] | None = None
        self._lock = threading.Lock()

    @property
    def _scheduler(self) -> Any:
        return getattr(self.workflow, "scheduler", None)

    def publishes(self, sample: str) -> bool:
        """Whether the run publishes ``sample``: its upload job is in the DAG (asked once)."""
        with self._lock:
            if self._published is None:
                self._published = {
                    job.wildcards_dict.get("sample")
                    for job in self.workflow.dag.needrun_jobs(exclude_finished=False)
                    if job.rule.name == "upload"
                }
        return sample in self._published

    def failed_samples(self) -> set[str]:
        """Samples with a job that failed for good (no retry left) in this run."""
        failed = getattr(self._scheduler, "failed", ())
        return {job.wildcards_dict.get("sample") for job in list(failed)}

    def stopping(self) -> str | None:
        scheduler = self._scheduler
        if getattr(scheduler, "_user_kill", None):
            return "the run is stopping"
        if getattr(scheduler, "_errors", False) and not getattr(scheduler, "keepgoing", True):
            return "the run is stopping after a failed job (no --keep-going)"
        return None

    def running(self) -> int | None:
        running = getattr(self._scheduler, "running", None)
        return None if running is None else len(running)


if __name__ == "__main__":
    # the worker's classes and functions are those of the imported module (the jobs it
    # unpickles name them), not of this copy run as __main__
    from medprep.workflow.transfers import serve as serve_jobs

    serve_jobs()
