"""The cohort table: one row per sample with its status, key numbers and failure cause.

Built from the step manifests under ``results/`` and the failure records under
``logs/failures/``, so it can be made after a run that failed for some samples.
``python -m medprep.cohort`` prints the short text summary that ``make run`` ends with.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from medprep import atomic
from medprep.step import FAILURES_DIR

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


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return atomic.read_json(path)
    except (FileNotFoundError, ValueError):
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


def sample_row(sample: str, modality: str, results: Path, logs: Path) -> dict[str, Any]:
    """The cohort row of one sample from whatever its steps left behind."""
    folder = results / modality / sample
    manifests = {step: _read_manifest(folder / f"{step}.json") for step in STEPS}
    row: dict[str, Any] = {column: None for column in COLUMNS}
    row.update(sample=sample, modality=modality)
    preprocess = (manifests["preprocess"] or {}).get("summary", {})
    tile = (manifests["tile"] or {}).get("summary", {})
    warnings = [
        w for m in manifests.values() if m for w in m.get("summary", {}).get("warnings", [])
    ]
    if modality == "wsi":
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
    row["warnings"] = "; ".join(warnings) or None
    row["runtime_s"] = _runtime_seconds(sample, modality, logs)

    failure = next(
        (
            record
            for step in STEPS
            if (record := _read_manifest(logs / FAILURES_DIR.name / f"{sample}.{step}.json"))
        ),
        None,
    )
    if manifests["upload"] is not None:
        row["status"] = _outcome(preprocess, tile)
        row["published"] = manifests["upload"].get("destination")
    elif failure is not None:
        row["status"] = "failed"
        row["failed_step"] = failure.get("step")
        row["cause"] = failure.get("message")
    else:
        done = [step for step in STEPS if manifests[step] is not None]
        row["status"] = f"incomplete (after {done[-1]})" if done else "not run"
    return row


def _outcome(*summaries: dict[str, Any]) -> str:
    for summary in summaries:
        status = summary.get("status", "ok")
        if status != "ok":
            return status
    return "ok"


def cohort_table(
    samples: list[tuple[str, str]],
    results: str | os.PathLike = "results",
    logs: str | os.PathLike = "logs",
) -> list[dict[str, Any]]:
    """Rows for ``samples`` (pairs of sample name and modality), in that order."""
    return [sample_row(s, m, Path(results), Path(logs)) for s, m in samples]


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def text_summary(rows: list[dict[str, Any]]) -> str:
    counts = Counter(row["status"] for row in rows)
    lines = [
        f"{len(rows)} samples: " + ", ".join(f"{n} {status}" for status, n in counts.most_common())
    ]
    for row in rows:
        kept = (
            ""
            if row["kept"] is None
            else f"{row['kept']} {'tiles' if row['modality'] == 'wsi' else 'patches'}"
        )
        detail = row["cause"] or kept
        lines.append(f"  {row['sample']:<24} {row['modality']:<4} {row['status']:<12} {detail}")
    published = sorted({str(Path(r["published"]).parent.parent) for r in rows if r["published"]})
    if published:
        lines.append("published to: " + ", ".join(published))
    return "\n".join(lines)


def _samples_from_config(config_path: str) -> list[tuple[str, str]]:
    import yaml

    from medprep.sheet import read_sample_sheet

    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    schema = Path(__file__).resolve().parent.parent / "schemas" / "samples.schema.yaml"
    sheet = read_sample_sheet(config["samples"], schema)
    return list(zip(sheet["sample"], sheet["modality"], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the cohort summary of a medprep run.")
    parser.add_argument("--results", default="results")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--csv", help="also write the cohort table to this CSV file")
    args = parser.parse_args(argv)
    rows = cohort_table(_samples_from_config(args.config), args.results, args.logs)
    if args.csv:
        write_csv(rows, args.csv)
    print(text_summary(rows))
    print(f"results: {Path(args.results).resolve()}/{{ct,wsi}}/<sample>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
