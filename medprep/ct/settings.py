"""The ``ct:`` config section with its defaults (those of schemas/config.schema.yaml)."""

from __future__ import annotations

import copy
from typing import Any

from medprep.schema import config_defaults

DEFAULTS: dict[str, Any] = config_defaults("ct")


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
    if merged["patches"]["materialise"] not in ("none", "hu", "uint8", "normalised"):
        raise ValueError("ct.patches.materialise must be 'none', 'hu', 'uint8' or 'normalised'")
    return merged


def lung_settings(settings: dict[str, Any], **extra):
    """``LungSettings`` from the ``ct.lung`` section (numbers), plus ``extra`` fields that
    come from the scan rather than the config (``x_towards_left``)."""
    from medprep.ct.lung import LungSettings

    lung = settings["lung"]
    fields = LungSettings.__dataclass_fields__
    return LungSettings(**{k: float(v) for k, v in lung.items() if k in fields}, **extra)
