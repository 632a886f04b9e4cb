"""Deterministic patient-level splits: a patient's split is a function of the patient alone.

Each patient (the sheet's ``patient``, or the sample name when it has none) gets a
number ``u`` in [0, 1) from SHA-256 of the seed and the patient; the split is the first
one whose cumulative fraction exceeds ``u`` (splits in the order configured). So:

- all samples of a patient share one split (the key is the patient, not the sample);
- adding or removing samples, or other patients, never moves a patient; nor does
  relabelling (the label is not part of the key); changing the seed or the fractions does;
- splits are stratified by label in expectation: ``u`` does not depend on the label, so the
  patients of each label fall into the splits as an independent sample with the configured
  fractions. For a label with ``n`` patients, the share of split ``p`` is Binomial(n, p)/n:
  its deviation from ``p`` stays within ``3.3 * sqrt(p (1 - p) / n)`` with probability
  0.999 (e.g. n = 1,000, p = 0.1: +-0.031). Exact per-label quotas would need a
  rank-based assignment that moves patients when others are added; this design keeps
  stability and reports the achieved per-label shares in the dataset's manifest.json.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

from medprep.common.settings import FROM_SCHEMA, Settings, settings_section


@settings_section("dataset")
class DatasetSettings(Settings):
    """``dataset``: the split names and fractions of patients, and the seed of the hash."""

    splits: dict[str, float] = FROM_SCHEMA
    seed: int = FROM_SCHEMA


FRACTION_SUM_TOLERANCE = 1e-6


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """The split fractions as a plain dict; ValueError unless they are >= 0 and sum to 1."""
    fractions = {str(k): float(v) for k, v in fractions.items()}
    if not fractions:
        raise ValueError("dataset.splits: at least one split is needed")
    if any(v < 0 or math.isnan(v) for v in fractions.values()):
        raise ValueError(f"dataset.splits: fractions must be >= 0, got {fractions}")
    total = sum(fractions.values())
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(f"dataset.splits: fractions must sum to 1, they sum to {total:g}")
    return fractions


def patient_key(patient: str | None, sample: str) -> str:
    """The grouping key: the patient, or the sample itself when no patient is given."""
    return patient if patient not in (None, "") else sample


def unit_hash(patient: str, seed: int) -> float:
    """A number in [0, 1) from SHA-256 of ``seed`` and ``patient`` (53 bits)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{patient}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def split_of(patient: str, fractions: Mapping[str, float], seed: int) -> str:
    """The split of ``patient`` (fractions as checked by ``check_fractions``)."""
    u = unit_hash(patient, seed)
    cumulative = 0.0
    last = ""  # check_fractions guarantees a split with a fraction above 0
    for name, fraction in fractions.items():
        cumulative += fraction
        if fraction > 0:
            last = name
            if u < cumulative:
                return name
    return last  # u within rounding of 1.0


def assign(patients: Iterable[str], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """The split of each distinct patient."""
    fractions = check_fractions(fractions)
    return {p: split_of(p, fractions, seed) for p in dict.fromkeys(patients)}


def tolerance(n: int, fraction: float, z: float = 3.3) -> float:
    """The deviation of a label's share of a split that is exceeded with probability
    about 0.001 (``z`` = 3.3) for ``n`` patients of that label."""
    if n <= 0:
        return 1.0
    return z * math.sqrt(fraction * (1.0 - fraction) / n)


def balance(
    rows: Iterable[tuple[str, str | None, str]], fractions: Mapping[str, float]
) -> dict[str, dict]:
    """Per label: patients, patients per split, achieved share and its deviation.

    ``rows`` are (patient, label, split), one per patient (a patient with several labels
    counts under the label of its first row).
    """
    seen: dict[str, tuple[str, str]] = {}
    for patient, label, split in rows:
        seen.setdefault(patient, ("" if label is None else str(label), split))
    out: dict[str, dict] = {}
    for label in sorted({label for label, _ in seen.values()}):
        splits = [s for lab, s in seen.values() if lab == label]
        n = len(splits)
        counts = {name: splits.count(name) for name in fractions}
        out[label or "(none)"] = {
            "patients": n,
            "per_split": counts,
            "share": {k: round(v / n, 4) for k, v in counts.items()},
            "max_deviation": round(max(abs(counts[k] / n - f) for k, f in fractions.items()), 4),
            "tolerance_p999": {k: round(tolerance(n, f), 4) for k, f in fractions.items()},
        }
    return out
