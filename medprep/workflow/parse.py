"""Helpers for ``rules/common.smk``: sample table, fingerprints, settings and memory formulas.

Kept in the package (not in the .smk files) so that they are unit-tested and cheap to call
at parse time: nothing here does per-sample I/O except ``source_fingerprint``, which
Snakemake calls once per download job while building the DAG.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from medprep import storage
from medprep.common import atomic, errors, settings
from medprep.workflow.sheet import read_sample_sheet

log = logging.getLogger(__name__)

SAMPLE_PATTERN = settings.sample_name_pattern()
PACKAGE_DIR = Path(__file__).resolve().parents[1]


##### samples #####


def demo_sheet_path(config: dict[str, Any]) -> str | None:
    demo_dir = config.get("demo_dir")
    return os.path.join(demo_dir, "samples.tsv") if demo_dir else None


def check_config_keys(config: dict[str, Any]) -> None:
    """Stop at parse time, one line per misspelt or unknown config key (its parent named)."""
    from medprep.common.settings import unknown_keys

    lines = unknown_keys(config)
    if lines:
        for line in lines:
            print(f"medprep error: config: {line}", file=sys.stderr)
        sys.exit(1)


def build_demo_if_requested(config: dict[str, Any]) -> None:
    """Build the demo dataset when ``samples`` is the demo sheet and it is missing."""
    sheet = demo_sheet_path(config)
    if sheet is None or os.path.normpath(config["samples"]) != os.path.normpath(sheet):
        return
    if os.path.exists(sheet):
        return
    from medprep import demo

    print(f"medprep: building the demo dataset in {config['demo_dir']}/ (first run only)")
    demo.build(config["demo_dir"])


def load_samples(config: dict[str, Any], schema: str | os.PathLike) -> pd.DataFrame:
    """The sample table: the sample sheet, validated, indexed by sample name."""
    return read_sample_sheet(config["samples"], schema)


##### runs: what one sample sheet owns #####


def run_name(config: dict[str, Any]) -> str:
    """The run's name: ``run_name`` if set, else the sample sheet's file stem.

    It scopes what belongs to one sheet (``results/cohort/{run}/``,
    ``results/dataset/{run}/``, ``{destination}/dataset/{run}/``, their logs), so runs of
    two sheets never overwrite each other's cohort. Stops at parse time, in one line, when
    the stem is not a safe name (letters, digits, ``.``, ``_``, ``-``).
    """
    import re

    name = config.get("run_name") or Path(str(config["samples"])).stem
    if not re.fullmatch(SAMPLE_PATTERN, name):
        print(
            f"medprep error: config: the run name {name!r} (from samples: "
            f"{config['samples']}) is not a safe name; set run_name to letters, digits, "
            "'.', '_' or '-'",
            file=sys.stderr,
        )
        sys.exit(1)
    return name


def cohort_outputs(run: str) -> dict[str, str]:
    """The cohort table, page and plot of run ``run``."""
    folder = f"results/cohort/{run}"
    return {
        "table": f"{folder}/cohort.csv",
        "html": f"{folder}/cohort.html",
        "plot": f"{folder}/cohort.png",
    }


def building_report(argv: list[str] | None = None) -> bool:
    """Whether this Snakemake process was asked for ``--report``."""
    argv = sys.argv if argv is None else argv
    return any(arg == "--report" or arg.startswith("--report=") for arg in argv)


def check_report_inputs(run: str, outputs: dict[str, str], argv: list[str] | None = None) -> None:
    """For ``snakemake --report``: stop in one line when run ``run`` has no cohort table.

    A report of a run that never ended (or of a sheet other than the run's: pass the same
    ``--config``/``--configfile``) would show no cohort, or another run's.
    """
    if not building_report(argv) or os.path.isfile(outputs["table"]):
        return
    others = sorted(p.parent.name for p in Path("results/cohort").glob("*/cohort.csv"))
    hint = f" (runs with a cohort: {', '.join(others)})" if others else ""
    print(
        f"medprep error: no cohort table for run {run!r} ({outputs['table']} is missing): "
        f"run the workflow with this sample sheet first, or pass the --config of the run "
        f"you want a report of{hint}",
        file=sys.stderr,
    )
    sys.exit(1)


DISCOVERED_CACHE = Path(".snakemake") / "medprep" / "discovered.json"


def with_discovered(
    samples: pd.DataFrame, config: dict[str, Any], *, main_process: bool
) -> pd.DataFrame:
    """The sample sheet plus the samples found under ``storage.discover`` prefixes.

    The main Snakemake process lists each prefix (one paginated listing, which also
    serves the fingerprints) and writes what it found to ``DISCOVERED_CACHE``; jobs
    (which re-parse the Snakefile, on a cluster too) read that file instead of listing.
    """
    entries = config["storage"].get("discover") or []
    if not entries:
        return samples
    if main_process:
        found = [
            s
            for entry in entries
            for s in storage.discover(entry["uri"], entry["modality"], config["storage"])
        ]
        atomic.write_json(DISCOVERED_CACHE, found)
    else:
        found = atomic.read_json(DISCOVERED_CACHE)
    clashes = sorted({s["sample"] for s in found} & set(samples.index))
    if clashes:
        raise ValueError(f"discovered samples also in the sample sheet: {clashes[:10]}")
    rows = pd.DataFrame.from_records(
        [{"sample": s["sample"], "modality": s["modality"], "uri": s["uri"]} for s in found],
        columns=["sample", "modality", "uri"],
    )
    rows["mpp"] = None
    rows["series_uid"] = None
    rows["annotations"] = None
    return pd.concat([samples, rows.set_index("sample", drop=False)])


def sample_records(samples: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Each sample's row as a plain dict (empty cells as None), by sample name.

    Input functions run once per job; a dict lookup costs microseconds where
    ``DataFrame.loc`` costs tens, which adds up over tens of thousands of jobs.
    """
    return {
        str(name): {column: optional_value(value) for column, value in row.items()}
        for name, row in zip(samples.index, samples.to_dict(orient="records"), strict=True)
    }


def optional_value(value: Any) -> Any:
    """``None`` for empty cells (NaN/None), the value otherwise, as a plain Python type."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def source_fingerprint(uri: str, storage_settings: dict[str, Any], sample: str = "") -> str:
    """The sample's input fingerprint (a parameter of its ``download`` job).

    Called by Snakemake for every sample while it builds the DAG, where an exception would
    stop the whole run. An error of the sample (a symbolic link loop in its folder, a
    hostile key, a bug) becomes a marker instead (``errors.defer``): that sample's download
    fails with the error's one line, and every other sample runs.

    An object store that cannot be reached at all still stops the run: that is no
    property of one sample, and a marker would change the fingerprint of every finished
    sample, so their downloads would rerun, fail and take their outputs with them.
    """
    try:
        return storage.source_fingerprint(uri, storage_settings)
    except Exception as error:  # noqa: BLE001 - one sample's problem, reported by its job
        if storage.is_s3(uri):
            from medprep.storage.s3 import StorageUnavailable

            if isinstance(error, StorageUnavailable):
                raise
        marker = errors.defer(error, path=uri)
        found = errors.undefer(marker, note="")
        log.warning("medprep: sample %s: %s (its download will fail)", sample, found)
        return marker


def join_uri(base: str, *parts: str) -> str:
    return storage.join(base, *parts)


def start_run() -> str:
    """A new run identity for the failure records (``medprep.workflow.runner.start_run``)."""
    from medprep.workflow import runner

    return runner.start_run()


##### publishing #####


def expect_published(samples: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    """Announce the published sample prefixes the check of ``upload`` lists (no I/O)."""
    storage.expect_sources(
        [
            join_uri(config["destination"], row["modality"], name) + "/"
            for name, row in samples.items()
        ],
        config["storage"],
    )


def published_generation(
    config: dict[str, Any], modality: str, sample: str, *, main_process: bool
) -> int:
    """The ``upload`` parameter that changes when a published file went missing or changed."""
    from medprep.storage import published

    return published.generation(
        join_uri(config["destination"], modality, sample),
        published.state_path(modality, sample),
        config["storage"],
        sample=sample,
        announce=main_process,
    )


def check_destination_or_exit(config: dict[str, Any]) -> None:
    """Stop the run, before any job, if results cannot be published (for ``onstart``)."""
    try:
        storage.check_destination(config["destination"], config["storage"])
    except storage.DestinationUnusable as error:
        print(f"medprep error: {error}", file=sys.stderr)
        sys.exit(1)


##### parameters #####


def settings_without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A copy of a config section without ``keys``, so a rule reruns only for what it uses."""
    return {k: v for k, v in settings.items() if k not in keys}


def settings_only(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: settings[k] for k in keys if k in settings}


# Code that no rule of an engine runs: editing it must not rerun any sample.
NOT_ENGINE_CODE = ("demo",)


def _imported_modules(path: Path) -> set[str]:
    """The ``medprep`` modules a source file imports (anywhere in it, lazily or not)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from medprep.x import y`: y may be a module of medprep.x or a name in it
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "medprep" or name.startswith("medprep.")}


def _module_files(name: str, package_dir: Path) -> list[Path]:
    """The files Python runs to import module ``name``: its package ``__init__`` files
    (not medprep's own, which holds the version) and the module itself, if they exist."""
    parts = name.split(".")[1:]
    if not parts or parts[0] in NOT_ENGINE_CODE:
        return []
    files = [package_dir.joinpath(*parts[:n], "__init__.py") for n in range(1, len(parts) + 1)]
    files.append(package_dir.joinpath(*parts).with_suffix(".py"))
    return [f for f in files if f.is_file()]


def engine_modules(engine: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The source files an engine's rules run: ``medprep/<engine>/`` and every medprep
    module those import, followed through the imports (the demo data generators are not
    engine code)."""
    todo = sorted((package_dir / engine).rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_modules(path):
            todo.extend(f for f in _module_files(name, package_dir) if f not in seen)
    return sorted(seen)


@functools.cache
def code_fingerprint(engine: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of the code an engine's rules run (``engine_modules``).

    Passed as a rule parameter so that changing that code reruns the rules that use it,
    as Snakemake already does for changes to the rule scripts themselves: the engine's
    own package, and the shared modules it imports (manifests, tables, atomic writes,
    storage, ...). Code the engine does not import (the cohort report, the demo data)
    reruns nothing.
    """
    digest = hashlib.sha256()
    for path in engine_modules(engine, package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
