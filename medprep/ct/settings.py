"""The ``ct:`` config section with its defaults (the same as in schemas/config.schema.yaml)."""

from __future__ import annotations

import copy
from typing import Any

DEFAULTS: dict[str, Any] = {
    "spacing": [1.0, 1.0, 1.0],
    "interpolation_order": 1,
    "gantry_tilt": "correct",
    "lung": {
        "threshold_hu": -320,
        "dilation_mm": 0,
        "min_volume_ml": 500,
        "max_volume_ml": 8000,
        "no_lungs_below_ml": 100,
        "second_lung_fraction": 0.2,
    },
    "normalise": {"min_hu": -1000, "max_hu": 400, "mean": 0.25},
    "crop": {"enabled": False, "margin_mm": 10},
    "outputs": {"npy": False},
    "patches": {"size_mm": 64, "stride_mm": 32, "min_lung_fraction": 0.1, "values": "normalised"},
    "slices_png": {"enabled": False, "window": [-1000, 400], "every_mm": 1},
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def ct_settings(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``settings`` (all or part of the ``ct:`` section) over the defaults."""
    merged = _merge(DEFAULTS, dict(settings or {}))
    if merged["gantry_tilt"] not in ("correct", "fail"):
        raise ValueError(
            f"ct.gantry_tilt must be 'correct' or 'fail', not {merged['gantry_tilt']!r}"
        )
    if int(merged["interpolation_order"]) not in (0, 1, 3):
        raise ValueError("ct.interpolation_order must be 0, 1 or 3")
    if merged["patches"]["values"] not in ("normalised", "hu"):
        raise ValueError("ct.patches.values must be 'normalised' or 'hu'")
    return merged


def lung_settings(settings: dict[str, Any]):
    from medprep.ct.lung import LungSettings

    lung = settings["lung"]
    return LungSettings(**{k: float(lung[k]) for k in LungSettings.__dataclass_fields__})
