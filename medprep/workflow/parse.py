"""Helpers for ``rules/common.smk``: sample table, fingerprints, settings and memory formulas.

Kept in the package (not in the .smk files) so that they are unit-tested and cheap to call
at parse time: nothing here does per-sample I/O except ``source_fingerprint``, which
Snakemake calls once per download job while building the DAG.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medprep import storage
from medprep.common import atomic, errors, settings
from medprep.common.redact import redact
from medprep.workflow.sheet import SampleSheetError, read_sample_sheet

log = logging.getLogger(__name__)

SAMPLE_PATTERN = settings.sample_name_pattern()


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
    """The sample table: the sample sheet, validated, indexed by sample name.

    A problem in the sheet stops the run at parse time in one line (no traceback).
    """
    try:
        return read_sample_sheet(config["samples"], schema)
    except SampleSheetError as error:
        stop(str(error))


def stop(line: str) -> None:
    """Stop the run while the Snakefile is parsed: one line, no traceback."""
    print(f"medprep error: {line}", file=sys.stderr)
    sys.exit(1)


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
        try:
            found = [
                s
                for entry in entries
                for s in storage.discover(entry["uri"], entry["modality"], config["storage"])
            ]
        except errors.InputError as error:
            stop(f"storage.discover: {error}")
        atomic.write_json(DISCOVERED_CACHE, found)
    else:
        found = atomic.read_json(DISCOVERED_CACHE)
    clashes = sorted({s["sample"] for s in found} & set(samples.index))
    if clashes:
        stop(f"storage.discover: discovered samples also in the sample sheet: {clashes[:10]}")
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


# fingerprints the check for missing inputs computed, each handed on once (to the job's
# parameter): that listing is not made twice
_fingerprints_found: dict[str, str] = {}


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
    found = _fingerprints_found.pop(uri, None)
    return found if found is not None else _source_fingerprint(uri, storage_settings, sample)


def _source_fingerprint(uri: str, storage_settings: dict[str, Any], sample: str) -> str:
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


##### inputs that do not exist #####

MISSING_INPUTS_DIR = Path("logs") / "missing_inputs"
MISSING_SHOWN = 3  # samples named in the summary line
MISSING_COLUMNS = ("uri", "annotations")


def missing_inputs(
    samples: dict[str, dict[str, Any]], storage_settings: dict[str, Any]
) -> list[dict[str, str]]:
    """The inputs (sheet columns ``uri`` and ``annotations``) that do not exist, one dict
    each: sample, modality, column, path, cause.

    Local paths: one ``stat`` each. ``s3://`` URIs: the listing the fingerprints make
    anyway (one per common parent prefix, cached): no object there, or no such bucket.
    """
    found = []
    for name, row in samples.items():
        for column in MISSING_COLUMNS:
            value = row.get(column)
            if not value:
                continue
            if storage.is_s3(value):
                fingerprint = _source_fingerprint(value, storage_settings, name)
                _fingerprints_found[value] = fingerprint
                if fingerprint != storage.MISSING:
                    continue
                cause = "no object at this location (or no such bucket)"
            elif os.path.exists(value):
                continue
            else:
                cause = "does not exist"
            found.append(
                {
                    "sample": name,
                    "modality": row["modality"],
                    "column": column,
                    "path": redact(str(value)),
                    "cause": cause,
                }
            )
    return found


def skip_missing_inputs(
    samples: dict[str, dict[str, Any]], config: dict[str, Any], run: str, *, main_process: bool
) -> set[str]:
    """Find the samples whose inputs do not exist before any job (main process only).

    One summary line (a count and the first few), the whole list in
    ``logs/missing_inputs/{run}.tsv``. With ``missing_inputs: skip`` (default) those
    samples get no job: each gets a failure record of the step that reads the input
    (download; tile for an annotation file), so the cohort table lists it as failed with
    the cause, and the other samples run; the names are returned. With ``stop`` the run
    stops here.
    """
    if not main_process:
        return set()
    missing = missing_inputs(samples, config["storage"])
    listing = MISSING_INPUTS_DIR / f"{run}.tsv"
    if not missing:
        listing.unlink(missing_ok=True)  # the list of an earlier run of this sheet
        return set()
    lines = ["sample\tmodality\tcolumn\tpath\tcause"]
    lines += [
        "\t".join(m[k] for k in ("sample", "modality", "column", "path", "cause")) for m in missing
    ]
    atomic.write_text(listing, "\n".join(lines) + "\n")
    names = {m["sample"] for m in missing}
    shown = ", ".join(f"{m['sample']} ({m['column']} {m['path']})" for m in missing[:MISSING_SHOWN])
    more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
    summary = (
        f"{len(names)} of {len(samples)} samples name inputs that do not exist: "
        f"{shown}{more} (all of them: {listing})"
    )
    if config.get("missing_inputs", "skip") == "stop":
        stop(f"{summary}; nothing was run (missing_inputs: stop)")
    from medprep.workflow import runner

    for item in missing:
        runner.write_failure_record(
            item["sample"],
            item["modality"],
            # an annotation file is an input of the tile step (rule download_annotations)
            "download" if item["column"] == "uri" else "tile",
            path=item["path"],
            cause=f"{item['column']}: {item['cause']}",
            kind="input",
        )
    print(
        f"medprep: {summary}; they are not run and the cohort table lists them as failed, "
        f"the other {len(samples) - len(names)} run (missing_inputs: stop stops the run "
        "instead)",
        file=sys.stderr,
    )
    return names


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


@dataclass(frozen=True)
class PublicationState:
    """A sample's publication at DAG build: ``generation``, the ``upload`` parameter that
    changes when a published file went missing or changed; ``rebuild``, step -> the
    record (``results/{modality}/{sample}/rebuild/{step}-{n}.json``) that is an input of
    that step, so that it runs again when the destination lost what it made and its
    working files are gone too."""

    generation: int
    rebuild: dict[str, str]


REBUILD_STEPS = ("preprocess", "tile")
_publication_states: dict[tuple[str, str, str], PublicationState] = {}


def rebuild_record(modality: str, sample: str, step: str, number: int) -> str:
    return f"results/{modality}/{sample}/rebuild/{step}-{number}.json"


def publication_state(
    config: dict[str, Any], modality: str, sample: str, *, main_process: bool
) -> PublicationState:
    """The sample's publication compared with what its last upload published (once per
    process and sample; see ``medprep.storage.published``).

    When the destination lost a working file of a step (volume, mask, patches, tile
    shards: not kept locally after upload) and the local copy is gone, that step must
    make it again, from the source: it gets a rebuild record as an input (a new one, so
    Snakemake reruns it, and the steps after it). The newest record of each step stays
    an input afterwards, so the next run has nothing to do. The main process says so in
    one line per sample.
    """
    key = (config["destination"], modality, sample)
    if key in _publication_states:
        return _publication_states[key]
    from medprep.storage import published

    destination = join_uri(config["destination"], modality, sample)
    snapshot = published.state_path(modality, sample)
    found = published.check(
        destination, snapshot, config["storage"], sample=sample, announce=main_process
    )
    numbers = _rebuild_records(modality, sample)
    step = _step_to_rebuild(found, modality, sample) if found.changes else None
    if step is not None:
        numbers[step] = max(numbers.get(step, 0), found.generation)
    if main_process and found.changes:
        line = published.describe(found, destination, sample)
        if step is None:
            tail = "upload runs again"
        else:
            tail = (
                f"its working files are gone too: {step}_{modality} runs again from the "
                "source, then the steps after it"
            )
        print(f"medprep: {line}; {tail}", file=sys.stderr)
    state = PublicationState(
        found.generation,
        {name: rebuild_record(modality, sample, name, n) for name, n in numbers.items()},
    )
    _publication_states[key] = state
    return state


def _rebuild_records(modality: str, sample: str) -> dict[str, int]:
    """The newest rebuild record of each step of the sample, by its number."""
    folder = Path("results") / modality / sample / "rebuild"
    numbers: dict[str, int] = {}
    if not folder.is_dir():
        return numbers
    for entry in os.scandir(folder):
        step, _, number = entry.name.removesuffix(".json").rpartition("-")
        if step in REBUILD_STEPS and number.isdigit() and entry.name.endswith(".json"):
            numbers[step] = max(numbers.get(step, 0), int(number))
    return numbers


def _step_to_rebuild(found: Any, modality: str, sample: str) -> str | None:
    """The first step with a file that the destination lost and that is gone here too
    (a working file, removed after upload): only that step can make it again."""
    lost = found.lost_names()
    for step in REBUILD_STEPS:
        try:
            manifest = atomic.read_json(f"results/{modality}/{sample}/{step}.json")
            local = {a["name"]: a["path"] for a in manifest.get("artifacts", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # not made yet (or unreadable): Snakemake runs that step anyway
        if any(not os.path.exists(path) for name, path in local.items() if name in lost):
            return step
    return None


def published_generation(
    config: dict[str, Any], modality: str, sample: str, *, main_process: bool
) -> int:
    """The ``upload`` parameter that changes when a published file went missing or changed."""
    return publication_state(config, modality, sample, main_process=main_process).generation


def rebuild_inputs(
    config: dict[str, Any], modality: str, sample: str, step: str, *, main_process: bool
) -> dict[str, str]:
    """``{"rebuild": record}`` for a step that must make its working files again, else {}."""
    state = publication_state(config, modality, sample, main_process=main_process)
    return {"rebuild": state.rebuild[step]} if step in state.rebuild else {}


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
