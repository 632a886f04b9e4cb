"""CPU jobs (preprocess_ct, tile_ct, preprocess_wsi, tile_wsi) forked from a warm process.

The CPU rules are ``run:`` jobs. With ``--force-use-threads`` (profiles/default) Snakemake
runs them as threads of its own process; they keep their ``threads`` and ``resources``, so
Snakemake still reserves the cores and memory their steps use. Each thread hands its step
to the step server: one process per run (``python -m medprep.workflow.step_server``),
started with the first CPU job, that keeps the imports of the steps it ran. For each job
the server forks a child, which

- sets the job up as Snakemake would have for a rule script: the working directory, the
  Snakemake process's environment with OMP/MKL/OpenBLAS thread counts and TMPDIR set
  from the job, native thread pools sized to the job's threads;
- runs the rule script's ``main(job)`` through ``runner.execute_step`` (its log file,
  the one line on failure, the failure record), the script imported as a module;
- exits with the step's code.

The server reaps the child (``os.wait4``: exit status and resource usage) and reports
back; the job's thread prints what the step printed through Snakemake's logger and
writes the job's record in Snakemake's benchmark format. So a CPU job costs what the
step costs in a warm process: no interpreter start, no script preamble, no imports but
the first job of each step's (the server then imports what that child imported).

Fork safety: the server runs no thread and no native thread pool before it forks (BLAS
and OpenMP pinned to one thread in its environment, its loop single-threaded, child exits
found through SIGCHLD); pools of worker processes (``medprep.common.parallel``) are made
in the child.

Failures: a step that fails fails its job with its one line, as a rule script's would.
A child that dies by a signal (OpenSlide crashing on a damaged slide, the kernel killing
it for memory) fails its job with one line naming the sample and the signal; the server
goes on. A server that died is replaced by the next job; the jobs it was running fail
(and are retried). The server and its children end with the Snakemake process, even when
it is killed: the server at the end of its input, the children when their server has
gone.

Where the job runs in a process of its own anyway (a cluster job), the step runs in that
process directly, and the record measures that process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import hashlib
import importlib
import importlib.util
import itertools
import logging
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from medprep.common.parallel import NATIVE_THREAD_VARIABLES, pin_native_threads
from medprep.workflow.jobs import (
    PARENT_POLL_S,
    Job,
    StepFailed,
    Usage,
    benchmark_record_path,
    exit_with_parent,
    print_among_snakemake_output,
    process_cpu,
    write_benchmark_record,
)

log = logging.getLogger(__name__)

# native thread pools of the server (its environment): forking is safe with one thread
SERVER_NATIVE_THREADS = 1
# a child that could not run its step (it never returns into the server's loop)
EXIT_CHILD_FAILED = 70
# signals that end a step without saying anything about its input: a retry may succeed
# (SIGKILL: the kernel's out-of-memory killer, retried with more memory)
RETRIED_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
TMPDIR_VARIABLES = ("TMPDIR", "TMP", "TEMPDIR", "TEMP")


@dataclass
class Request:
    """A CPU job for the server: the job, its rule script, the environment and the
    working directory its process gets."""

    job: Job
    script: str
    environment: dict[str, str]
    cwd: str


@dataclass
class WarmUp:
    """Import, before the first job, what the steps of these rule scripts may import:
    sent when the run starts, so that the first jobs do not each import it again while
    the first downloads still run."""

    scripts: list[str]


@dataclass
class Outcome:
    """How a job's process ended.

    ``code``: the step's exit code (0: done), None when the process was killed by
    ``signal`` or the server was lost (``lost``: why); ``line``: the one line the step
    printed for its failure; ``printed``: what the process wrote on stdout and stderr.
    """

    code: int | None
    line: str | None = None
    printed: str = ""
    signal: int | None = None
    usage: Usage | None = None
    pid: int | None = None
    server_pid: int | None = None
    # CPU seconds the server spent forking the child
    fork_cpu_s: float = 0.0
    lost: str | None = None


##### the server process #####


def serve() -> None:
    """The server: fork a child per request on stdin, reply on stdout, until stdin ends
    (the Snakemake process ended)."""
    requests = Connection(0, writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # what the server or a child prints must not end up in the channel
    # Ctrl-C reaches the whole process group: the server goes on, the children stop
    # their steps (as rule scripts would) and report it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    # a handler, not SIG_IGN (with which the kernel would reap the children itself): a
    # child's end makes select return through the wake-up pipe
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    _Server(requests, replies, wake_read, wake_write).loop()


@dataclass
class _Running:
    job_id: int
    result: IO[bytes]
    output: IO[bytes]
    started: float
    fork_cpu_s: float


class _Server:
    def __init__(self, requests: Connection, replies: Connection, wake_read: int, wake_write: int):
        self.requests, self.replies = requests, replies
        self.wake_read, self.wake_write = wake_read, wake_write
        self.parent = os.getppid()
        self.running: dict[int, _Running] = {}
        # modules a child imported that this process has not: imported before the next fork
        self.to_import: set[str] = set()
        self.tried: set[str] = set()
        self.frozen_modules = 0

    def loop(self) -> None:
        try:
            while True:
                ready, _, _ = select.select(
                    [self.requests.fileno(), self.wake_read], [], [], PARENT_POLL_S
                )
                if self.wake_read in ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_read, 512):
                            pass
                self.reap()
                if self.requests.fileno() in ready:
                    try:
                        job_id, request = self.requests.recv()
                    except EOFError:
                        return
                    if isinstance(request, WarmUp):
                        self.warm_up(request.scripts)
                    else:
                        self.start(job_id, request)
                if os.getppid() != self.parent:
                    return
        finally:
            self.end()

    def start(self, job_id: int, request: Request) -> None:
        """Fork the job's child, with the step's script and what earlier children of the
        step imported already imported here."""
        with contextlib.suppress(Exception):  # the child imports it again, and reports
            load_script(request.script)
        self.import_learned()
        self.freeze_heap()
        # closed when the child is reaped (_Server.outcome)
        result = tempfile.TemporaryFile()  # noqa: SIM115
        output = tempfile.TemporaryFile()  # noqa: SIM115
        sys.stdout.flush()
        sys.stderr.flush()
        before = process_cpu()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                close = [self.requests.fileno(), self.replies.fileno()]
                _run_child(request, result, output, close + [self.wake_read, self.wake_write])
            finally:
                os._exit(EXIT_CHILD_FAILED)
        self.running[pid] = _Running(job_id, result, output, started, process_cpu() - before)

    def reap(self) -> None:
        while self.running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running = self.running.pop(pid, None)
            if running is None:
                continue
            self.replies.send((running.job_id, self.outcome(pid, status, usage, running)))

    def outcome(self, pid: int, status: int, usage: Any, running: _Running) -> Outcome:
        wall = time.monotonic() - running.started
        result: dict[str, Any] = {}
        with running.result, running.output:
            running.result.seek(0)
            with contextlib.suppress(EOFError, pickle.UnpicklingError):
                result = pickle.load(running.result)
            running.output.seek(0)
            printed = running.output.read().decode("utf-8", errors="replace")
        self.to_import.update(result.get("imported", ()))
        signalled = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return Outcome(
            code=None if signalled else os.WEXITSTATUS(status),
            line=result.get("line"),
            printed=printed,
            signal=signalled,
            usage=Usage.of(wall, [usage]),
            pid=pid,
            server_pid=os.getpid(),
            fork_cpu_s=running.fork_cpu_s,
        )

    def warm_up(self, scripts: list[str]) -> None:
        """Import the rule scripts and the medprep modules they may import, lazily or not
        (``medprep.workflow.code.step_modules``), with the libraries those import at their
        top. One failing import (an optional library) stops nothing: the child that needs
        it imports it again, and reports."""
        from medprep.workflow.code import step_modules

        for script in scripts:
            with contextlib.suppress(Exception):
                load_script(script)
            with contextlib.suppress(Exception):
                for name in step_modules(script):
                    with contextlib.suppress(Exception):
                        importlib.import_module(name)

    def freeze_heap(self) -> None:
        """Move what the server holds out of the garbage collector's reach (after new
        imports): a child's collections then do not walk, and so copy, the pages of the
        objects it inherited."""
        if len(sys.modules) != self.frozen_modules:
            gc.collect()
            gc.freeze()
            self.frozen_modules = len(sys.modules)

    def import_learned(self) -> None:
        """Import what earlier children imported (once, in their order): the next child
        of that step starts with it."""
        for name in sorted(self.to_import - self.tried):
            self.tried.add(name)
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        self.to_import.clear()

    def end(self) -> None:
        """The Snakemake process ended (or stopped listening): the children end too."""
        for pid in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.running):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.running.clear()


_SCRIPTS: dict[str, ModuleType] = {}


def load_script(path: str) -> ModuleType:
    """The rule script at ``path`` as a module (imported once per process): its
    ``main(smk)`` is the step; its ``run_step`` at the end runs only as ``__main__``."""
    module = _SCRIPTS.get(path)
    if module is None:
        digest = hashlib.sha256(path.encode()).hexdigest()[:12]
        name = f"_medprep_rule_script_{Path(path).stem}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no rule script at {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        _SCRIPTS[path] = module
    return module


def _run_child(request: Request, result: IO[bytes], output: IO[bytes], close: list[int]) -> None:
    """In the forked child: set the job up, run its step, record the outcome, exit."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = os.getppid()
    for fd in close:
        os.close(fd)  # the Snakemake process sees the server's end when the server ends
    with open(os.devnull, "rb") as null:
        os.dup2(null.fileno(), 0)
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    threading.Thread(target=exit_with_parent, args=(server,), daemon=True).start()
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.environment)
    tempfile.tempdir = None  # TMPDIR is the job's
    if request.job.threads != SERVER_NATIVE_THREADS:
        pin_native_threads(max(1, request.job.threads))
    imported = set(sys.modules)
    started = process_cpu()
    code = EXIT_CHILD_FAILED
    line: str | None = None
    try:
        from medprep.workflow import runner

        code, line = runner.execute_step(request.job, _step_in_child(request, started))
    except KeyboardInterrupt:  # Ctrl-C: the step stops, as a rule script would
        line = f"sample {request.job.sample}: {request.job.rule} interrupted"
        code = 130
    finally:
        with contextlib.suppress(Exception):
            pickle.dump(
                {"line": line, "imported": sorted(set(sys.modules) - imported)},
                result,
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            result.flush()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _step_in_child(request: Request, started: float) -> Any:
    def step(job: Job) -> None:
        log.info(
            "in process %d, forked by the step server %d of the Snakemake process %d "
            "(%.0f ms CPU in the process before the step)",
            os.getpid(),
            os.getppid(),
            job.snakemake_pid,
            (process_cpu() - started) * 1000,
        )
        if len(job.log):
            # a crash (a signal) leaves the Python stack in the job's log
            faulthandler.enable(open(job.log[0], "a"))  # noqa: SIM115 - open until exit
        load_script(request.script).main(job)

    return step


##### in the Snakemake process #####


class StepServer:
    """The step server of this Snakemake process: started with the first job, replaced
    when it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: _ServerProcess | None = None

    def run(self, request: Request) -> Outcome:
        for _ in range(2):
            with self._lock:
                waiting = self._live_process().submit(request)
            if waiting is not None:
                return waiting.result()
            # the server died between the check and the request: a new one takes it
        return Outcome(code=None, lost="it ended before it could take the job")

    def warm_up(self, scripts: list[str]) -> None:
        """Start the server now and have it import what these scripts' steps use."""
        with self._lock:
            self._live_process().send(WarmUp(scripts))

    def _live_process(self) -> _ServerProcess:
        """The running server; a new one if there is none or it died (under the lock)."""
        if self._process is None or not self._process.alive():
            self._process = _ServerProcess()
        return self._process

    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.process.pid

    def close(self) -> None:
        """End the server (its running children with it)."""
        with self._lock:
            if self._process is not None:
                self._process.close()
                self._process = None


class _ServerProcess:
    """One ``python -m medprep.workflow.step_server``: requests on its stdin, outcomes on
    its stdout (each tagged with the request's number), read by a thread."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        environment = {**os.environ, "PYTHONPATH": path}
        environment.update(dict.fromkeys(NATIVE_THREAD_VARIABLES, str(SERVER_NATIVE_THREADS)))
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medprep.workflow.step_server"],
                stdin=request_read,
                stdout=reply_write,
                env=environment,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self.requests = Connection(request_write, readable=False)
        self.replies = Connection(reply_read, writable=False)
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._waiting: dict[int, Future[Outcome]] = {}
        self._ended: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def alive(self) -> bool:
        return self._ended is None and self.process.poll() is None

    def submit(self, request: Request) -> Future[Outcome] | None:
        """Send the request; its outcome comes in the future. None: the server had ended."""
        waiting: Future[Outcome] = Future()
        with self._lock:
            if self._ended is not None:
                return None
            number = next(self._numbers)
            self._waiting[number] = waiting
            try:
                # pickled whole before a byte is sent (Connection.send): a request that
                # cannot be pickled leaves nothing half-written in the pipe
                self.requests.send((number, request))
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as error:
                del self._waiting[number]
                if isinstance(error, OSError):
                    self._ended = f"its pipe broke ({error})"
                    return None
                raise
        return waiting

    def send(self, message: WarmUp) -> None:
        """A message that has no reply (a server that has ended ignores it)."""
        with self._lock:
            if self._ended is None:
                with contextlib.suppress(OSError):
                    self.requests.send((None, message))

    def _read(self) -> None:
        try:
            while True:
                number, outcome = self.replies.recv()
                with self._lock:
                    waiting = self._waiting.pop(number)
                waiting.set_result(outcome)
        except (EOFError, OSError):
            pass
        status = self.process.wait()
        with self._lock:
            self._ended = f"exit status {status}" if status >= 0 else _signal_name(-status)
            waiting_jobs, self._waiting = self._waiting, {}
        for waiting in waiting_jobs.values():
            waiting.set_result(Outcome(code=None, lost=self._ended, server_pid=self.process.pid))

    def close(self) -> None:
        self.requests.close()  # the server's loop ends at the end of its input
        self.process.wait()


##### what the rules call #####


class CpuSteps:
    """The CPU jobs of one Snakemake process: each rule's ``run:`` block calls ``run``
    with the job's ``rule, input, output, params, wildcards, threads, resources, log``;
    it raises ``StepFailed`` when the step failed."""

    def __init__(self, config: dict[str, Any], scripts: Path, here: bool = False):
        self.config = config
        self.scripts = Path(scripts)
        # the job runs in a process of its own (a cluster job): no server
        self.here = here
        self.server = StepServer()

    @classmethod
    def for_workflow(cls, workflow: Any, config: dict[str, Any]) -> CpuSteps:
        return cls(config, Path(workflow.basedir) / "scripts", here=not workflow.is_main_process)

    def on_start(self, workflow: Any, modalities: set[str]) -> None:
        """When the run starts (``onstart``): start the step server, which imports what
        the CPU steps of these modalities use while the first downloads run. Not where
        the CPU jobs run elsewhere (cluster jobs)."""
        if self.here or workflow.non_local_exec:
            return
        rules = sorted(f"{step}_{m}" for m in modalities for step in ("preprocess", "tile"))
        scripts = [str(self.scripts / f"{rule}.py") for rule in rules]
        self.server.warm_up([s for s in scripts if Path(s).is_file()])

    def run(
        self,
        rule: str,
        input: Any,
        output: Any,
        params: Any,
        wildcards: Any,
        threads: int,
        resources: Any,
        log: Any,
    ) -> None:
        job = Job.of(rule, input, output, params, wildcards, threads, resources, log, self.config)
        request = Request(
            job,
            str(self.scripts / f"{rule}.py"),
            job_environment(job),
            os.getcwd(),
        )
        record = benchmark_record_path(rule, job.sample)
        record.unlink(missing_ok=True)  # a failed job leaves none, as with Snakemake's
        outcome = run_here(request) if self.here else self.server.run(request)
        if outcome.printed:
            print_among_snakemake_output(outcome.printed.rstrip("\n"))
        if outcome.code == 0:
            if outcome.usage is not None:
                write_benchmark_record(record, outcome.usage)
            return
        if outcome.line is not None:  # the step failed, and printed its line
            raise StepFailed(outcome.line)
        raise StepFailed(record_death(job, outcome))


def job_environment(job: Job) -> dict[str, str]:
    """The environment a rule script of ``job`` would have had: this process's, with the
    native thread counts and the temporary folder Snakemake sets from the job."""
    environment = dict(os.environ)
    environment.update(dict.fromkeys(NATIVE_THREAD_VARIABLES, str(max(1, job.threads))))
    tmpdir = job.resources.get("tmpdir")
    if tmpdir:
        environment.update(dict.fromkeys(TMPDIR_VARIABLES, str(tmpdir)))
    return environment


def record_death(job: Job, outcome: Outcome) -> str:
    """The one line of a job whose process ended without its step's line (killed by a
    signal, or its server lost), printed, in the job's log and in its failure record; a
    crash (a signal other than a kill) is not retried within the run."""
    from medprep.workflow import runner

    kind = "internal"
    if outcome.signal is not None:
        cause = f"its process was killed by {_signal_name(outcome.signal)}"
        if outcome.signal == signal.SIGKILL:
            cause += " (out of memory?)"
        elif outcome.signal not in RETRIED_SIGNALS:
            kind = "crash"
    elif outcome.lost is not None:
        cause = f"the step server process ended ({outcome.lost}; killed, out of memory?)"
    else:
        cause = f"its process ended with exit status {outcome.code} before the step ran"
    line, text = runner.record_failure(job, cause, kind=kind)
    print_among_snakemake_output(text)
    return line


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def run_here(request: Request) -> Outcome:
    """The step in this process (a cluster job's own): the record measures this process
    and its children."""
    from medprep.workflow import runner

    os.environ.update(request.environment)
    tempfile.tempdir = None
    pin_native_threads(max(1, request.job.threads))
    started = time.monotonic()
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

    def step(job: Job) -> None:
        log.info("in the job's own process %d (a cluster job: no step server)", os.getpid())
        load_script(request.script).main(job)

    code, line = runner.execute_step(request.job, step)
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    usage = Usage.of(time.monotonic() - started, after, before)
    return Outcome(code=code, line=line, usage=usage, pid=os.getpid())


if __name__ == "__main__":
    # the server's classes and functions are those of the imported module (the requests
    # it unpickles name them), not of this copy run as __main__
    from medprep.workflow.step_server import serve as serve_requests

    serve_requests()
