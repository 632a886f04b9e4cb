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

from medprep.common.settings import Settings, settings_section


@settings_section("ct", "series")
class SeriesSettings(Settings):
    """``ct.series``: how the candidate series of a folder are ranked. Patterns are
    case-insensitive regular expressions searched in ConvolutionKernel (values joined
    with a backslash) or SeriesDescription."""

    prefer_kernels: tuple[str, ...]
    avoid_kernels: tuple[str, ...]
    prefer_descriptions: tuple[str, ...]
    avoid_descriptions: tuple[str, ...]
    slice_thickness: str
    avoid_derived: bool

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

    threshold_hu: float
    dilation_mm: float
    min_volume_ml: float
    max_volume_ml: float
    no_lungs_below_ml: float
    second_lung_fraction: float
    closing_radius_mm: float
    fill_radius_mm: float
    pocket_max_mm: float
    grid_mm: float
    x_towards_left: bool = True  # array x (column) index grows towards the patient's left


@settings_section("ct", "normalise")
class NormaliseSettings(Settings):
    """``ct.normalise``: HU window mapped to [0, 1], then ``mean`` subtracted."""

    min_hu: float
    max_hu: float
    mean: float


@settings_section("ct", "crop")
class CropSettings(Settings):
    """``ct.crop``: crop the outputs to the lungs' box plus a margin."""

    enabled: bool
    margin_mm: float


@settings_section("ct", "outputs")
class OutputsSettings(Settings):
    """``ct.outputs``: optional extra outputs of preprocess."""

    npz: bool


@settings_section("ct", "patches")
class PatchesSettings(Settings):
    """``ct.patches``: the 3D patch grid over the lungs and what is written of it."""

    size_mm: float
    stride_mm: float
    min_lung_fraction: float
    materialise: str
    window: tuple[float, float]


@settings_section("ct", "slices_png")
class SlicesPngSettings(Settings):
    """``ct.slices_png``: optional PNG slices of the volume."""

    enabled: bool
    window: tuple[float, float]
    every_mm: float


@settings_section("ct", "annotations")
class AnnotationsSettings(Settings):
    """``ct.annotations``: one LUNA16-style CSV of region labels for the cohort."""

    csv: str | None


@settings_section("ct")
class CtSettings(Settings):
    """``ct``: resampling, series choice, lung mask, normalisation, crop, outputs, patches
    and PNG slices."""

    spacing: tuple[float, float, float]
    interpolation_order: int
    gantry_tilt: str
    lossy_compression: str
    series: SeriesSettings
    lung: LungSettings
    normalise: NormaliseSettings
    crop: CropSettings
    outputs: OutputsSettings
    patches: PatchesSettings
    slices_png: SlicesPngSettings
    annotations: AnnotationsSettings


DEFAULTS = CtSettings()


def ct_settings(settings: Mapping[str, Any] | CtSettings | None = None) -> CtSettings:
    """``settings`` (all or part of the ``ct:`` section) over the schema's defaults."""
    return CtSettings.from_config(settings)


def lung_settings(settings: CtSettings, **extra: Any) -> LungSettings:
    """The ``ct.lung`` settings of ``settings`` with its numbers as floats, plus ``extra``
    fields that come from the scan rather than the config (``x_towards_left``)."""
    lung = settings.lung
    numbers = {
        key: float(value)
        for key, value in lung.as_dict().items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return dataclasses.replace(lung, **numbers, **extra)
