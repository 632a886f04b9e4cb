"""The ``ct:`` config section as typed, frozen settings (``CtSettings``).

Defaults and limits are those of ``schemas/config.schema.yaml`` (see
``medprep.common.settings.settings_section``); the classes declare each field's type, and
a test checks them against the schema. ``ct_settings`` fills in what a (partial) section
leaves out and rejects unknown keys in one line. Read them as attributes:
``cfg.patches.size_mm``. Nested sections are declared before the section holding them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from medprep.common.settings import FROM_SCHEMA, Settings, settings_section


@settings_section("ct", "series")
class SeriesSettings(Settings):
    """``ct.series``: how the candidate series of a folder are ranked. Patterns are
    case-insensitive regular expressions searched in ConvolutionKernel (values joined
    with a backslash) or SeriesDescription."""

    prefer_kernels: tuple[str, ...] = FROM_SCHEMA
    avoid_kernels: tuple[str, ...] = FROM_SCHEMA
    prefer_descriptions: tuple[str, ...] = FROM_SCHEMA
    avoid_descriptions: tuple[str, ...] = FROM_SCHEMA
    slice_thickness: str = FROM_SCHEMA
    avoid_derived: bool = FROM_SCHEMA

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern in (
            *self.prefer_kernels,
            *self.avoid_kernels,
            *self.prefer_descriptions,
            *self.avoid_descriptions,
        ):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"ct.series: bad pattern {pattern!r}: {error}") from None


# here rather than in lung.py so that reading settings does not import the mask's maths
@settings_section("ct", "lung")
class LungSettings(Settings):
    """``ct.lung`` (``closing_radius_mm`` 0 disables pocket filling; ``fill_radius_mm`` is
    the ball that fills a found pocket, none when not larger than the closing's), plus what
    comes from the scan, not the config."""

    threshold_hu: float = FROM_SCHEMA
    dilation_mm: float = FROM_SCHEMA
    min_volume_ml: float = FROM_SCHEMA
    max_volume_ml: float = FROM_SCHEMA
    no_lungs_below_ml: float = FROM_SCHEMA
    second_lung_fraction: float = FROM_SCHEMA
    closing_radius_mm: float = FROM_SCHEMA
    fill_radius_mm: float = FROM_SCHEMA
    pocket_max_mm: float = FROM_SCHEMA
    grid_mm: float = FROM_SCHEMA
    x_towards_left: bool = True  # array x (column) index grows towards the patient's left


@settings_section("ct", "normalise")
class NormaliseSettings(Settings):
    """``ct.normalise``: HU window mapped to [0, 1], then ``mean`` subtracted."""

    min_hu: float = FROM_SCHEMA
    max_hu: float = FROM_SCHEMA
    mean: float = FROM_SCHEMA


@settings_section("ct", "crop")
class CropSettings(Settings):
    """``ct.crop``: crop the outputs to the lungs' box plus a margin."""

    enabled: bool = FROM_SCHEMA
    margin_mm: float = FROM_SCHEMA


@settings_section("ct", "outputs")
class OutputsSettings(Settings):
    """``ct.outputs``: optional extra outputs of preprocess."""

    npz: bool = FROM_SCHEMA


@settings_section("ct", "patches")
class PatchesSettings(Settings):
    """``ct.patches``: the 3D patch grid over the lungs and what is written of it."""

    size_mm: float = FROM_SCHEMA
    stride_mm: float = FROM_SCHEMA
    min_lung_fraction: float = FROM_SCHEMA
    materialise: str = FROM_SCHEMA
    window: tuple[float, float] = FROM_SCHEMA


@settings_section("ct", "slices_png")
class SlicesPngSettings(Settings):
    """``ct.slices_png``: optional PNG slices of the volume."""

    enabled: bool = FROM_SCHEMA
    window: tuple[float, float] = FROM_SCHEMA
    every_mm: float = FROM_SCHEMA


@settings_section("ct", "annotations")
class AnnotationsSettings(Settings):
    """``ct.annotations``: one LUNA16-style CSV of region labels for the cohort."""

    csv: str | None = FROM_SCHEMA


@settings_section("ct")
class CtSettings(Settings):
    """``ct``: resampling, series choice, lung mask, normalisation, crop, outputs, patches
    and PNG slices."""

    spacing: tuple[float, float, float] = FROM_SCHEMA
    interpolation_order: int = FROM_SCHEMA
    gantry_tilt: str = FROM_SCHEMA
    lossy_compression: str = FROM_SCHEMA
    series: SeriesSettings = FROM_SCHEMA
    lung: LungSettings = FROM_SCHEMA
    normalise: NormaliseSettings = FROM_SCHEMA
    crop: CropSettings = FROM_SCHEMA
    outputs: OutputsSettings = FROM_SCHEMA
    patches: PatchesSettings = FROM_SCHEMA
    slices_png: SlicesPngSettings = FROM_SCHEMA
    annotations: AnnotationsSettings = FROM_SCHEMA


DEFAULTS = CtSettings()


def ct_settings(settings: Mapping[str, Any] | CtSettings | None = None) -> CtSettings:
    """``settings`` (all or part of the ``ct:`` section) over the schema's defaults."""
    return CtSettings.from_config(settings)


def lung_settings(settings: CtSettings, **extra: Any) -> LungSettings:
    """The ``ct.lung`` settings of ``settings`` with its numbers as floats, plus ``extra``
    fields that come from the scan rather than the config (``x_towards_left``)."""
    lung = settings.lung
    numbers: dict[str, Any] = {
        key: float(value)
        for key, value in lung.as_dict().items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return dataclasses.replace(lung, **numbers, **extra)
