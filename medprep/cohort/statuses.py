"""Sample statuses shared by the cohort table, its HTML page and its plot."""

from __future__ import annotations

from collections import Counter
from typing import Any

OK = "ok"
FAILED = "failed"


def status_counts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(status, count), most frequent first; ties in order of first appearance."""
    return Counter(row["status"] for row in rows).most_common()
