"""The ``ct:`` config section as frozen dataclasses (``CtSettings``).

Fields, defaults and limits are those of ``schemas/config.schema.yaml`` (see
``medprep.common.settings.settings_section``): a key added there is a field here, with its default,
without an edit. ``ct_settings`` fills in what a (partial) section leaves out and rejects
unknown keys in one line. The sections are also read-only mappings, so the engine reads
``cfg["patches"]["size_mm"]`` as it did the config's dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medprep.common.settings import Settings, settings_section


# declared before CtSettings, whose ``lung`` field it is; here rather than in lung.py so
# that reading settings does not import the mask's maths (scipy)
@settings_section("ct", "lung")
class LungSettings(Settings):
    """``ct.lung`` (fields and defaults from the schema: ``closing_radius_mm`` 0 disables
    pocket filling; ``fill_radius_mm`` is the ball that fills a found pocket, none when not
    larger than the closing's), plus what comes from the scan, not the config."""

    x_towards_left: bool = True  # array x (column) index grows towards the patient's left


@settings_section("ct")
class CtSettings(Settings):
    """``ct``: resampling, series choice, lung mask (``lung``: LungSettings), normalisation,
    crop, outputs, patches and PNG slices."""


DEFAULTS = CtSettings()


def ct_settings(settings: Mapping[str, Any] | None = None) -> CtSettings:
    """``settings`` (all or part of the ``ct:`` section) over the schema's defaults."""
    return CtSettings.from_config(settings)


def lung_settings(settings: Mapping[str, Any], **extra: Any) -> LungSettings:
    """``LungSettings`` from the ``ct.lung`` section of ``settings``, its numbers as floats,
    plus ``extra`` fields that come from the scan rather than the config
    (``x_towards_left``)."""
    lung = LungSettings.from_config(settings["lung"])
    numbers = {
        k: float(v)
        for k, v in lung.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return dataclasses.replace(lung, **numbers, **extra)
