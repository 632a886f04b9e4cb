"""The cohort table: one row per sample with its status, key numbers and failure cause.

Built from the step manifests under ``results/`` and the failure records under
``logs/failures/``, so it can be made after a run that failed for some samples: the
``cohort`` rule writes it after a complete run, the Snakefile's ``onerror`` handler after a
run with failures (``write_cohort`` in both cases). ``python -m medprep.cohort.table`` prints the
short text summary that ``make run`` ends with.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprep import storage
from medprep.common import atomic
from medprep.common.statuses import FAILED, OK, status_counts
from medprep.workflow.runner import FAILURES_DIR

STEPS = ("download", "preprocess", "tile", "upload")
BENCHMARK_RULES = {
    "ct": ("download/ct", "preprocess_ct", "tile_ct", "upload/ct"),
    "wsi": ("download/wsi", "preprocess_wsi", "tile_wsi", "upload/wsi"),
}
COLUMNS = [
    "sample",
    "modality",
    "status",
    "failed_step",
    "cause",
    "kept",
    "tissue_area_mm2",
    "lung_volume_ml",
    "resolution",
    "resolution_source",
    "warnings",
    "runtime_s",
    "published",
]
# A table written after a failed run is dated back to this time (2000-01-01), so that
# Snakemake sees every finished sample as newer and the next run rebuilds it.
STALE_MTIME = 946_684_800
# `make run` lists every sample of a cohort up to this size, else only the problems.
LIST_ALL_UP_TO = 20


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return atomic.read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _runtime_seconds(sample: str, modality: str, logs: Path) -> float | None:
    total, found = 0.0, False
    for rule in BENCHMARK_RULES[modality]:
        path = logs / "benchmarks" / rule / f"{sample}.tsv"
        try:
            with open(path, encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
        except FileNotFoundError:
            continue
        if rows:
            total += float(rows[-1]["s"])
            found = True
    return round(total, 2) if found else None


def latest_failure(sample: str, logs: Path) -> tuple[dict[str, Any], float] | None:
    """The newest failure record of ``sample`` and its time, if any.

    A step removes its own record when it starts again, but a record of another step can
    outlive a later run that failed elsewhere: the newest one is the current cause.
    """
    found = []
    for step in STEPS:
        path = logs / FAILURES_DIR.name / f"{sample}.{step}.json"
        record = _read_json(path)
        mtime = _mtime(path)
        if record is not None and mtime is not None:
            found.append((mtime, record))
    if not found:
        return None
    mtime, record = max(found, key=lambda item: item[0])
    return record, mtime


def sample_row(sample: str, modality: str, results: Path, logs: Path) -> dict[str, Any]:
    """The cohort row of one sample from whatever its steps left behind."""
    folder = results / modality / sample
    manifests = {step: _read_json(folder / f"{step}.json") for step in STEPS}
    row: dict[str, Any] = {column: None for column in COLUMNS}
    row.update(sample=sample, modality=modality)

    failure = latest_failure(sample, logs)
    uploaded = _mtime(folder / "upload.json")
    # A failure newer than the last upload is the current state of the sample (a receipt
    # is then from an earlier run that succeeded).
    if failure is not None and (uploaded is None or failure[1] >= uploaded):
        record = failure[0]
        row.update(status=FAILED, failed_step=record.get("step"), cause=record.get("message"))
        if row["failed_step"] in STEPS:
            # manifests of the failed step and after are from an earlier run: not shown
            for step in STEPS[STEPS.index(row["failed_step"]) :]:
                manifests[step] = None
    elif manifests["upload"] is not None:
        row["published"] = manifests["upload"].get("destination")
    _add_numbers(row, manifests)
    if row["status"] is None:
        if manifests["upload"] is not None:
            row["status"] = _outcome(*(m.get("summary", {}) for m in manifests.values() if m))
        else:
            done = [step for step in STEPS if manifests[step] is not None]
            row["status"] = f"incomplete (after {done[-1]})" if done else "not run"
    row["runtime_s"] = _runtime_seconds(sample, modality, logs)
    return row


def _add_numbers(row: dict[str, Any], manifests: dict[str, dict[str, Any] | None]) -> None:
    preprocess = (manifests["preprocess"] or {}).get("summary", {})
    tile = (manifests["tile"] or {}).get("summary", {})
    if row["modality"] == "wsi":
        row["kept"] = tile.get("tiles")
        row["tissue_area_mm2"] = preprocess.get("tissue_area_mm2")
        row["resolution"] = preprocess.get("mpp")
        row["resolution_source"] = preprocess.get("mpp_source")
    else:
        row["kept"] = tile.get("patches")
        row["lung_volume_ml"] = preprocess.get("lung_volume_ml")
        spacing = preprocess.get("spacing_in")
        row["resolution"] = "x".join(f"{s:g}" for s in spacing) if spacing else None
        row["resolution_source"] = "dicom" if spacing else None
    warnings = [
        w for m in manifests.values() if m for w in m.get("summary", {}).get("warnings", [])
    ]
    row["warnings"] = "; ".join(warnings) or None


@dataclass(frozen=True)
class QcPicture:
    """Where a modality's QC picture is, and how the report shows it."""

    pattern: str  # with {sample}
    category: str
    caption: Any  # as given to Snakemake's report()


def qc_pictures(
    samples: list[tuple[str, str]], pictures: dict[str, QcPicture], report: Callable[..., Any]
) -> list[Any]:
    """Every sample's QC picture for the ``cohort`` rule's input, marked with Snakemake's
    ``report()`` (passed in) when the picture exists.

    Marked only when it exists: ``snakemake --report`` stops at a marked file that is
    missing, and a failed sample has no picture; the pictures are marked here rather than
    in the rules that draw them for that reason. A report builds its DAG anew, after the
    run, so it registers every picture that the run drew.
    """
    inputs = []
    for sample, modality in samples:
        picture = pictures[modality]
        path = picture.pattern.format(sample=sample)
        if os.path.exists(path):
            path = report(
                path,
                caption=picture.caption,
                category=picture.category,
                labels={"sample": sample},
            )
        inputs.append(path)
    return inputs


def mem_mb(samples: int, attempt: int = 1) -> int:
    """Memory of the ``cohort`` job: Python, numpy and Pillow, plus the rows."""
    return (200 + samples // 500) * attempt


def _outcome(*summaries: dict[str, Any]) -> str:
    for summary in summaries:
        status = summary.get("status", OK)
        if status != OK:
            return status
    return OK


def cohort_table(
    samples: list[tuple[str, str]],
    results: str | os.PathLike = "results",
    logs: str | os.PathLike = "logs",
    sheet: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows for ``samples`` (pairs of sample name and modality), in that order.

    ``sheet`` (sample -> label, patient, meta_* values) adds those columns at the end.
    """
    rows = [sample_row(s, m, Path(results), Path(logs)) for s, m in samples]
    if sheet:
        extra = sheet_columns(sheet)
        for row in rows:
            values = sheet.get(row["sample"], {})
            row.update({column: values.get(column) for column in extra})
    return rows


def sheet_columns(sheet: dict[str, dict[str, Any]]) -> list[str]:
    """label, patient and the meta_* columns of ``sheet``, in that order."""
    meta = sorted({k for values in sheet.values() for k in values if k.startswith("meta_")})
    return ["label", "patient", *meta]


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    extra = [c for c in (rows[0] if rows else {}) if c not in COLUMNS]
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra)
        writer.writeheader()
        writer.writerows(rows)


def write_cohort(
    samples: list[tuple[str, str]],
    *,
    table: str | os.PathLike,
    html: str | os.PathLike,
    plot: str | os.PathLike,
    results: str | os.PathLike = "results",
    logs: str | os.PathLike = "logs",
    sheet: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Write the cohort table as CSV and HTML and the cohort plot; return the rows."""
    # imported here: numpy and Pillow are not needed where the Snakefile is parsed
    from medprep.cohort import html as cohort_html
    from medprep.cohort import plot as cohort_plot

    rows = cohort_table(samples, results, logs, sheet)
    write_csv(rows, table)
    cohort_html.write_html(rows, html)
    cohort_plot.write_plot(rows, plot)
    return rows


def write_after_failure(
    samples: list[tuple[str, str]],
    outputs: dict[str, str],
    sheet: dict[str, dict[str, Any]] | None = None,
) -> None:
    """The cohort table of a run with failed samples (the Snakefile's ``onerror``).

    The ``cohort`` rule does not run when a sample failed (its inputs are missing): this
    writes its outputs (``table``, ``html``, ``plot``), listing the failures and their
    causes, and dates them back so that the next run rebuilds them with the rule.
    """
    try:
        write_cohort(samples, **outputs, sheet=sheet)
        date_back(list(outputs.values()))
    except Exception as error:  # noqa: BLE001 - must not hide the run's own error
        print(f"medprep: could not write the cohort table: {error}", file=sys.stderr)
        return
    print_summary(outputs)
    print(
        f"medprep: some samples failed; cohort table with their causes: {outputs['html']}",
        file=sys.stderr,
    )


def print_summary(outputs: dict[str, str]) -> None:
    """Print the cohort summary at the end of a run (the Snakefile's ``onsuccess`` and
    ``onerror``): counts by status and one line per sample (or per problem)."""
    table = Path(outputs["table"])
    if not table.is_file():  # a run with other targets than the cohort
        return
    try:
        rows = read_csv(table)
    except (OSError, ValueError, csv.Error) as error:
        print(f"medprep: could not read the cohort table {table}: {error}", file=sys.stderr)
        return
    html = Path(outputs["html"])
    print(text_summary(rows, table=(html if html.is_file() else table).resolve()), flush=True)


def date_back(paths: list[str | os.PathLike]) -> None:
    """Make ``paths`` older than any sample's outputs, so that Snakemake rebuilds them.

    For the table written by the ``onerror`` handler: it has no Snakemake metadata, and
    without this a later run whose samples are all already finished (say, after the
    failed sample was removed from the sheet) would keep it as it is.
    """
    for path in paths:
        os.utime(path, (STALE_MTIME, STALE_MTIME))


def text_summary(
    rows: list[dict[str, Any]],
    *,
    table: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
) -> str:
    """Counts by status, the samples (all of a small cohort, else only the problems), and
    where the table and the report are."""
    lines = [
        f"{len(rows)} samples: " + ", ".join(f"{n} {status}" for status, n in status_counts(rows))
    ]
    listed = rows if len(rows) <= LIST_ALL_UP_TO else [r for r in rows if r["status"] != OK]
    for row in listed[:LIST_ALL_UP_TO]:
        lines.append(
            f"  {row['sample']:<24} {row['modality']:<4} {row['status']:<12} {_detail(row)}"
        )
    if len(listed) > LIST_ALL_UP_TO:
        lines.append(f"  ... and {len(listed) - LIST_ALL_UP_TO} more (see the cohort table)")
    # a sample's folder is {destination}/{modality}/{sample}: two levels up (s3:// kept)
    published = sorted({storage.parent(r["published"], 2) for r in rows if r["published"]})
    if published:
        lines.append("published to: " + ", ".join(published))
    if table is not None:
        lines.append(f"cohort table: {table}")
    if report is not None:
        lines.append(f"report: {report}")
    return "\n".join(lines)


def _detail(row: dict[str, Any]) -> str:
    if row["cause"]:
        return f"{row['failed_step']}: {row['cause']}"
    if row["kept"] is None:
        return ""
    return f"{row['kept']} {'tiles' if row['modality'] == 'wsi' else 'patches'}"


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a cohort table written by ``write_csv`` (empty cells as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _read_config(config_path: str) -> dict[str, Any]:
    import yaml

    with open(config_path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _samples_from_config(config_path: str) -> list[tuple[str, str]]:
    from medprep.common.settings import SAMPLES_SCHEMA
    from medprep.workflow.sheet import read_sample_sheet

    sheet = read_sample_sheet(_read_config(config_path)["samples"], SAMPLES_SCHEMA)
    return list(zip(sheet["sample"], sheet["modality"], strict=True))


def _run_table(config_path: str) -> str:
    """The cohort table of the run of the config at ``config_path``."""
    from medprep.workflow.parse import cohort_outputs, run_name

    return cohort_outputs(run_name(_read_config(config_path)))["table"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the cohort summary of a medprep run.")
    parser.add_argument(
        "--table",
        help="the cohort table the workflow wrote (read when it exists); default: that of "
        "the run of --config (results/cohort/{run}/cohort.csv)",
    )
    parser.add_argument("--report", help="the report of the run, named if it exists")
    parser.add_argument("--results", default="results")
    parser.add_argument("--logs", default="logs")
    parser.add_argument(
        "--config", default="config.yaml", help="without a table: the samples of this config"
    )
    args = parser.parse_args(argv)
    table = Path(args.table or _run_table(args.config))
    if table.is_file():
        rows = read_csv(table)
        shown = table.with_suffix(".html") if table.with_suffix(".html").is_file() else table
    else:
        rows = cohort_table(_samples_from_config(args.config), args.results, args.logs)
        shown = None
    report = Path(args.report) if args.report else None
    print(
        text_summary(
            rows,
            table=shown.resolve() if shown is not None else None,
            report=report.resolve() if report is not None and report.is_file() else None,
        )
    )
    print(f"results: {Path(args.results).resolve()}/{{ct,wsi}}/<sample>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
