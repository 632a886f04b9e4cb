"""Run a rule script: log to the rule's log file, turn bad input into one clear line.

Every script under ``scripts/`` ends with ``run_step(snakemake, main)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medprep.common import atomic, settings
from medprep.common.errors import InputError
from medprep.common.redact import RedactingFilter, redact

log = logging.getLogger("medprep")

FAILURES_DIR = Path("logs") / "failures"
EXIT_INPUT_ERROR = 1
EXIT_INTERNAL_ERROR = 2
# set by the workflow when it chose the disk budget itself (medprep.workflow)
DEFAULT_DISK_BUDGET_ENV = "MEDPREP_DEFAULT_DISK_MB"
# Steps whose input manifests list working files they read (restored when removed after
# upload); the cohort and dataset rules read manifests and tables, which always stay.
SCRATCH_STEPS = frozenset({"preprocess", "tile", "upload"})


def failure_record_path(sample: str, step: str) -> Path:
    return FAILURES_DIR / f"{sample}.{step}.json"


def configure_logging(log_path: str | os.PathLike | None, level: int = logging.INFO) -> None:
    """Send all log records to ``log_path`` (the rule's log file), credentials redacted."""
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
        previous.close()  # a transfer worker configures logging once per job
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


# The step whose failure record a rule writes, where it is not the rule's first word: an
# annotation file is fetched for the tile step, which cannot run without it (and the
# sample's own download job, which removes its record when it starts, must not clear it).
RULE_STEPS = {"download_annotations": "tile", "download_annotations_cohort": "tile"}


def _step_identity(smk: Any) -> tuple[str, str, str]:
    wildcards = dict(smk.wildcards.items()) if hasattr(smk.wildcards, "items") else {}
    sample = wildcards.get("sample", "-")
    rule = smk.rule
    modality = wildcards.get("modality") or (rule.rsplit("_", 1)[1] if "_" in rule else "-")
    step = RULE_STEPS.get(rule, rule.split("_", 1)[0])
    return sample, modality, step


def run_step(smk: Any, main: Callable[[Any], None]) -> None:
    """Call ``main(smk)`` with logging set up; exit non-zero with one clear line on failure.

    Call it under ``if __name__ == "__main__":``. Pool workers started with "spawn"
    re-run the rule script from its original path, without Snakemake's preamble that
    defines ``snakemake``; the guard keeps them from running the step.
    """
    code, _ = execute_step(smk, main)
    if code:
        sys.exit(code)


def execute_step(smk: Any, main: Callable[[Any], None]) -> tuple[int, str | None]:
    """``run_step`` without exiting: (0, None), or the exit code and the one line printed.

    For steps that run in a long-lived process (``medprep.workflow.transfers``) or in a
    process forked for the job (``medprep.workflow.step_server``), where ``sys.exit``
    would end the process instead of the job, or skip the job's own ending.
    """
    log_path = smk.log[0] if len(smk.log) else None
    configure_logging(log_path)
    sample, modality, step = _step_identity(smk)
    record = failure_record_path(sample, step)
    attempt = attempt_identity(smk)
    if (repeated := repeated_input_error(record, attempt)) is not None:
        # Snakemake retries every failure (`retries:`); bad input fails the same way again
        line, kind = repeated
        line = f"{line} ({NOT_RETRIED[kind]}, not retried)"
        _print_line(line, log_path)
        return EXIT_INPUT_ERROR, line
    record.unlink(missing_ok=True)
    started = time.monotonic()
    subject = f"sample {sample}" if sample != "-" else "all samples"
    log.info("%s %s: %s %s with %d thread(s)", step, modality, smk.rule, subject, smk.threads)
    try:
        remove_leftovers(_output_paths(smk))
        check_disk_budget(smk)
        if step in SCRATCH_STEPS and "destination" in getattr(smk, "config", {}):
            from medprep.workflow import working_files as scratch

            scratch.restore_inputs(smk)
        # the job's settings come from the workflow's config, validated when it was read
        with settings.config_validated():
            main(smk)
    except InputError as error:
        error.with_context(sample=sample)
        # bad input (or a full destination) fails a retry the same way: recorded so that
        # a retry does not redo it
        kind = "transient" if error.retryable else error.kind
        line = _fail(
            record,
            sample,
            modality,
            step,
            error.path,
            error.cause,
            str(error),
            log_path,
            kind=kind,
            attempt=attempt,
        )
        return EXIT_INPUT_ERROR, line
    # every failure must end as one clear line; SystemExit too, which in a long-lived
    # process would end every later job
    except (Exception, SystemExit) as error:  # noqa: BLE001
        log.error("traceback:\n%s", redact(traceback.format_exc()))
        cause = f"unexpected {type(error).__name__}: {error}"
        line = f"sample {sample}: {step} failed: {cause}"
        line = _fail(
            record,
            sample,
            modality,
            step,
            None,
            cause,
            line,
            log_path,
            kind="internal",
            attempt=attempt,
        )
        return EXIT_INTERNAL_ERROR, line
    log.info("%s finished in %.1f s", step, time.monotonic() - started)
    return 0, None


def console_line(text: str) -> None:
    """``text`` on the console (stderr) as one line written at once: jobs running side by
    side share Snakemake's stderr, and print's separate write of the newline let two
    jobs' lines run into one."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def error_text(line: str, log_path: str | None) -> str:
    """What the console shows for a failure's line."""
    where = f" (log: {log_path})" if log_path else ""
    return f"medprep error: {line}{where}"


def _print_line(line: str, log_path: str | None) -> None:
    log.error("%s", line)
    console_line(error_text(line, log_path))


def record_failure(smk: Any, cause: str, *, kind: str) -> tuple[str, str]:
    """A job's failure met outside its step (its process killed by a signal, say): its
    one line, added to the job's log, and its failure record (``kind`` as in
    ``write_failure_record``). Returns the line and its console text, for the caller to
    print."""
    log_path = smk.log[0] if len(smk.log) else None
    sample, modality, step = _step_identity(smk)
    line = redact(f"sample {sample}: {step} failed: {cause}")
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR medprep: {line}\n")
    write_failure_record(
        sample,
        modality,
        step,
        path=None,
        cause=cause,
        kind=kind,
        message=line,
        log_path=log_path,
        attempt=attempt_identity(smk),
    )
    return line, error_text(line, log_path)


##### bad input costs one attempt #####

# Written by the main Snakemake process when it parses the workflow (`start_run`), read by
# every job of that run (locally or on a cluster node sharing the working directory).
RUN_ID_PATH = Path(".snakemake") / "medprep" / "run-id"


def start_run(path: Path = RUN_ID_PATH) -> str:
    """Give this workflow run a new identity; failure records remember it."""
    run_id = uuid.uuid4().hex
    atomic.write_json(path, {"run": run_id})
    return run_id


def current_run(path: Path = RUN_ID_PATH) -> str | None:
    try:
        return str(atomic.read_json(path)["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attempt_identity(smk: Any) -> dict[str, str | None]:
    """What makes two attempts of a job the same: the run, and the job's inputs and params.

    Inputs count by path, size and modification time (cheap: no reading).
    """
    digest = hashlib.sha256(str(getattr(smk, "rule", "")).encode())
    for path in sorted(str(p) for p in _named_values(getattr(smk, "input", ()))):
        try:
            info = os.stat(path)
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    params = getattr(smk, "params", ())
    items = params.items() if hasattr(params, "items") else enumerate(params)
    for name, value in sorted((str(k), repr(v)) for k, v in items):
        digest.update(f"{name}={value}\n".encode())
    return {"run": current_run(), "inputs": digest.hexdigest()[:32]}


# Failure kinds a retry in the same run does not redo, and how the retry names them. A
# crash (the step's process killed by a signal other than a kill: OpenSlide on a damaged
# slide, say) happens again on the same input.
NOT_RETRIED = {"input": "input error", "destination": "destination full", "crash": "crashed"}


def repeated_input_error(record: Path, attempt: dict[str, str | None]) -> tuple[str, str] | None:
    """The one line (and kind) of an input error that an earlier attempt of this job met.

    A retry (Snakemake's ``retries:``, given for memory, killed jobs and transient storage
    errors) of a job that failed on bad input would fail the same way: same run, same
    inputs and parameters. Such a retry ends at once with the earlier line. So does a
    retry of an upload that found its destination full. A new run (e.g. after the input
    was fixed, a library installed or space freed) always tries again.
    """
    if attempt.get("run") is None:
        return None
    try:
        previous = atomic.read_json(record)
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict) or previous.get("kind") not in NOT_RETRIED:
        return None
    if all(previous.get(key) == attempt[key] for key in ("run", "inputs")):
        return str(previous.get("message")), str(previous["kind"])
    return None


def _named_values(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        return list(values)
    if hasattr(values, "items"):
        return [v for _, v in values.items()]
    return []


def check_disk_budget(smk: Any) -> None:
    """Fail when the job's working set is more than the whole disk budget.

    Snakemake caps a job's ``disk_mb`` at ``--resources disk_mb=N`` and runs it anyway;
    ``disk_need_mb`` is the uncapped estimate (rules/common.smk).
    """
    resources = getattr(smk, "resources", None)
    need = getattr(resources, "disk_need_mb", None)
    granted = getattr(resources, "disk_mb", None)
    if not (isinstance(need, int) and isinstance(granted, int) and need > granted):
        return
    if os.environ.get(DEFAULT_DISK_BUDGET_ENV) == str(granted):
        # the workflow's default budget, sized from the downloads before any output was
        # known: the job holds all of it, so it runs alone
        log.warning(
            "needs %d MB of local disk, more than the default budget of %d MB: runs alone "
            "(--resources disk_mb=N sets a budget)",
            need,
            granted,
        )
        return
    raise InputError(
        f"needs {need} MB of local disk for its working set, more than the whole "
        f"disk budget of {granted} MB (--resources disk_mb=N): raise the budget or "
        "free disk space"
    )


def _output_paths(smk: Any) -> list[str]:
    outputs = getattr(smk, "output", ())
    if isinstance(outputs, (list, tuple)):  # Snakemake's Namedlist is a list
        return [str(path) for path in outputs]
    return [str(path) for _, path in outputs.items()]


def remove_leftovers(outputs: list[str]) -> int:
    """Delete temporaries that a killed earlier attempt of this job left next to its outputs.

    Snakemake reruns the outputs of a killed job but does not know the temporary files
    and folders (``.name.tmp-*``, possibly gigabytes of tiles) our writers had started.
    Only this job writes in its output folders while it runs.
    """
    folders = sorted({Path(path).parent for path in outputs})
    removed = sum(atomic.remove_stale_temporaries(folder) for folder in folders)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted earlier run", removed)
    return removed


def _fail(
    record: Path,
    sample: str,
    modality: str,
    step: str,
    path: str | None,
    cause: str,
    line: str,
    log_path: str | None,
    *,
    kind: str,
    attempt: dict[str, str | None],
) -> str:
    line = redact(line)
    _print_line(line, log_path)
    write_failure_record(
        sample,
        modality,
        step,
        path=path,
        cause=cause,
        kind=kind,
        message=line,
        log_path=log_path,
        attempt=attempt,
        record=record,
    )
    return line


def write_failure_record(
    sample: str,
    modality: str,
    step: str,
    *,
    path: str | None,
    cause: str,
    kind: str,
    message: str | None = None,
    log_path: str | None = None,
    attempt: dict[str, str | None] | None = None,
    record: Path | None = None,
) -> None:
    """The failure record of a sample's step (``logs/failures/{sample}.{step}.json``),
    which the cohort table reads; also for failures found before any job runs."""
    if message is None:
        message = str(InputError(cause, path=path, sample=sample))
    atomic.write_json(
        record or failure_record_path(sample, step),
        {
            # input: bad input, destination: no room to publish, and crash: the step's
            # process killed by a signal such as SIGSEGV, not retried within this run (see
            # repeated_input_error); transient or internal: a retry may succeed
            "kind": kind,
            **(attempt or {"run": current_run(), "inputs": None}),
            "sample": sample,
            "modality": modality,
            "step": step,
            "file": redact(path) if path else None,
            "cause": redact(cause),
            "message": redact(message),
            "log": log_path,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
