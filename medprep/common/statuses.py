"""The ``status`` of a step summary and of a sample in the cohort table: ``OK``, one of the
documented outcomes that are not failures (no lungs, no tissue, no tiles), or ``FAILED``
(only in the cohort table: a failed step writes no summary)."""

from __future__ import annotations

from collections import Counter
from typing import Any

OK = "ok"
NO_LUNGS = "no_lungs"
NO_TISSUE = "no_tissue"
NO_TILES = "no_tiles"
FAILED = "failed"


def status_counts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(status, count), most frequent first; ties in order of first appearance."""
    return Counter(row["status"] for row in rows).most_common()
