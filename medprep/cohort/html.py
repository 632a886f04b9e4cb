"""The cohort table as one self-contained HTML page: counts, failures with their causes,
then every sample."""

from __future__ import annotations

import html
import os
from typing import Any

from medprep.common import atomic
from medprep.common.statuses import FAILED, OK, status_counts

# (column, heading) of the full table, in order
HEADINGS = [
    ("sample", "Sample"),
    ("modality", "Modality"),
    ("status", "Status"),
    ("kept", "Tiles / patches kept"),
    ("tissue_area_mm2", "Tissue area (mm²)"),
    ("lung_volume_ml", "Lung volume (ml)"),
    ("resolution", "Resolution"),
    ("resolution_source", "Resolution from"),
    ("runtime_s", "Runtime (s)"),
    ("warnings", "Warnings"),
]
FAILURE_HEADINGS = [
    ("sample", "Sample"),
    ("modality", "Modality"),
    ("failed_step", "Step"),
    ("cause", "Cause"),
]

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1f2933; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; }
th, td { padding: .3em .6em; border-bottom: 1px solid #d9e2ec; vertical-align: top; }
th { text-align: left; background: #f0f4f8; position: sticky; top: 0; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.warnings, td.cause { max-width: 48em; }
td.sample { white-space: nowrap; font-weight: 600; }
.note { color: #627d98; }
tr:nth-child(even) td { background: #fafbfc; }
.status { display: inline-block; padding: 0 .5em; border-radius: .8em; white-space: nowrap; }
.status-ok { background: #d3f9d8; color: #1b5e20; }
.status-failed { background: #ffd8d8; color: #8a1c1c; }
.status-other { background: #fff3bf; color: #7a5300; }
.counts span { margin-right: .8em; }
"""


def _status_class(status: str) -> str:
    if status == OK:
        return "status-ok"
    return "status-failed" if status == FAILED else "status-other"


def _status_badge(status: str) -> str:
    return f'<span class="status {_status_class(status)}">{html.escape(status)}</span>'


def _cell(column: str, value: Any) -> str:
    if column == "status":
        return f"<td>{_status_badge(value)}</td>"
    if value is None:
        return "<td></td>"
    if isinstance(value, (int, float)):
        text = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"
        return f'<td class="number">{text}</td>'
    return f'<td class="{column}">{html.escape(str(value))}</td>'


def _table(rows: list[dict[str, Any]], headings: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in headings)
    body = "\n".join(
        "<tr>" + "".join(_cell(column, row[column]) for column, _ in headings) + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def render_html(rows: list[dict[str, Any]]) -> str:
    counts = " ".join(
        f"<span>{_status_badge(status)} {n}</span>" for status, n in status_counts(rows)
    )
    failures = [row for row in rows if row["status"] == FAILED]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>medprep cohort</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Cohort: {len(rows)} samples</h1>",
        f'<p class="counts">{counts}</p>',
    ]
    if failures:
        parts += [
            f"<h2>Failures ({len(failures)})</h2>",
            "<p>Each failed sample stopped at the step shown; the other samples are not"
            " affected. Fix the input (or the sample sheet) and run again: only these"
            " samples rerun.</p>",
            _table(failures, FAILURE_HEADINGS),
        ]
    parts += [
        "<h2>All samples</h2>",
        '<p class="note">Resolution: µm per pixel of the slide, or the scan\'s spacing in mm'
        " (z × y × x) before resampling. Runtime: the sample's jobs added up.</p>",
        _table(rows, HEADINGS),
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def write_html(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    atomic.write_text(path, render_html(rows))
