"""Physical resolution: where a slide's microns per pixel come from, and which level to read.

Pure functions on numbers; the OpenSlide side is in ``slide.py``.

Conventions: ``mpp`` is microns per level-0 pixel; a *scale* is level-0 pixels per output
pixel (``target_mpp / mpp``); a level's *downsample* is level-0 pixels per level pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medprep.common.errors import InputError
from medprep.wsi.settings import ResolutionSettings

MPP_SOURCES = ("metadata", "sample_sheet", "config_fallback")

# Scanners write 0.1-20 um/px; a value outside this range is a placeholder such as a
# default 72 dpi TIFF resolution (352.8 um/px), not a scan resolution.
PLAUSIBLE_MPP = (0.02, 50.0)

# Relative difference between x and y mpp above which a warning is recorded.
ANISOTROPY_WARNING = 0.01

HOW_TO_SET_MPP = (
    "set the `mpp` column for this sample in the sample sheet, "
    "or `wsi.resolution.mpp_fallback` in the config"
)


@dataclass(frozen=True)
class Mpp:
    """Microns per level-0 pixel along x and y, and where the values came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def plausible_mpp(value: float | None) -> bool:
    return (
        value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]
    )


def resolve_mpp(
    metadata: tuple[float | None, float | None],
    sample_sheet: float | None = None,
    fallback: float | None = None,
) -> tuple[Mpp, list[str]]:
    """The slide's mpp: the sample sheet's value, else the slide's metadata, else the fallback.

    The sample sheet wins because it is an explicit, per-sample statement by the user (a
    correction of wrong metadata, say). Raises ``InputError`` (without a path; the caller
    adds it) when none is available, saying how to supply one. Returns warnings too.
    """
    warnings: list[str] = []
    meta_x, meta_y = metadata
    if meta_x is not None and meta_y is None:
        meta_y = meta_x
    if meta_y is not None and meta_x is None:
        meta_x = meta_y
    metadata_ok = plausible_mpp(meta_x) and plausible_mpp(meta_y)

    if sample_sheet is not None:
        if not plausible_mpp(sample_sheet):
            raise InputError(
                f"the sample sheet's mpp {sample_sheet} um/px is outside the plausible range "
                f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}"
            )
        if metadata_ok and abs(meta_x - sample_sheet) > 0.01 * sample_sheet:  # type: ignore[operator]
            warnings.append(
                f"sample sheet mpp {sample_sheet} overrides slide metadata mpp {meta_x:.4g}"
            )
        return Mpp(float(sample_sheet), float(sample_sheet), "sample_sheet"), warnings

    if metadata_ok:
        mpp = Mpp(float(meta_x), float(meta_y), "metadata")  # type: ignore[arg-type]
        if abs(mpp.x - mpp.y) > ANISOTROPY_WARNING * mpp.x:
            warnings.append(f"pixels are not square: mpp x {mpp.x:.4g}, y {mpp.y:.4g}")
        return mpp, warnings

    implausible = ""
    if meta_x is not None:
        implausible = (
            f" (its metadata says {meta_x:.4g} um/px, which is not a plausible scan "
            "resolution, e.g. a default 72-dpi TIFF resolution)"
        )
    if fallback is not None:
        warnings.append(
            f"slide has no usable resolution metadata{implausible}; "
            f"using wsi.resolution.mpp_fallback = {fallback}"
        )
        return Mpp(float(fallback), float(fallback), "config_fallback"), warnings

    raise InputError(
        f"no resolution (microns per pixel) in the slide metadata{implausible}; {HOW_TO_SET_MPP}"
    )


@dataclass(frozen=True)
class Target:
    """The resolution tiles are cut at, and how it was asked for."""

    mpp: float
    mode: str  # "mpp", "magnification" or "level"
    requested: float | int


def target_resolution(
    settings: ResolutionSettings, mpp: Mpp, level_downsamples: Sequence[float]
) -> Target:
    """Apply the precedence level > magnification > mpp of ``wsi.resolution``."""
    if settings.level is not None:
        if settings.level >= len(level_downsamples):
            raise InputError(
                f"wsi.resolution.level is {settings.level} but the slide has only "
                f"{len(level_downsamples)} level(s) (0-{len(level_downsamples) - 1})"
            )
        return Target(mpp.mean * level_downsamples[settings.level], "level", settings.level)
    if settings.magnification is not None:
        return Target(10.0 / settings.magnification, "magnification", settings.magnification)
    return Target(float(settings.mpp), "mpp", settings.mpp)


def choose_level(level_downsamples: Sequence[float], scale: float, tolerance: float = 0.0) -> int:
    """The level with the largest downsample that is still at or finer than ``scale``.

    ``scale`` is level-0 pixels per output pixel. A level coarser than the target by at
    most ``tolerance`` (relative) also counts, so 2.0005 serves a target of 2.0. With a
    target finer than level 0 the answer is level 0 (and the caller upsamples).
    """
    limit = scale * (1 + max(tolerance, 1e-9))
    best = 0
    for index, downsample in enumerate(level_downsamples):
        if downsample <= limit and downsample > level_downsamples[best]:
            best = index
    return best


@dataclass(frozen=True)
class ReadPlan:
    """How to produce pixels at a target resolution from a slide."""

    level: int
    level_downsample: float  # level-0 pixels per pixel of ``level``
    scale_x: float  # level-0 pixels per output pixel
    scale_y: float
    resample: bool  # False: output pixels are the level's pixels (no resizing)


def plan_read(
    level_downsamples: Sequence[float],
    mpp: Mpp,
    target_mpp: float,
    tolerance: float = 0.0,
) -> ReadPlan:
    """Pick the level for ``target_mpp`` and decide whether its pixels need resampling.

    With ``tolerance`` > 0 a level within that relative difference of the target is used
    without resampling; the output resolution is then that level's (recorded by the caller).
    So is a level averaged over k x k pixels (k whole) that lands within the tolerance, as
    a scanner's own pyramid level would: a 0.2527 um/px scan without a 0.5 level gives
    0.5054 um/px for a 0.5 target, each output pixel the mean of 2 x 2 level pixels, with
    no further resizing (``workers.resample_tiles`` then only averages and cuts).
    """
    scale_x = target_mpp / mpp.x
    scale_y = target_mpp / mpp.y
    level = choose_level(level_downsamples, min(scale_x, scale_y), tolerance)
    downsample = float(level_downsamples[level])
    exact = math.isclose(scale_x, downsample, rel_tol=1e-9) and math.isclose(
        scale_y, downsample, rel_tol=1e-9
    )
    near = (
        abs(scale_x - downsample) <= tolerance * scale_x
        and abs(scale_y - downsample) <= tolerance * scale_y
    )
    if exact or (tolerance > 0 and near):
        return ReadPlan(level, downsample, downsample, downsample, resample=False)
    k = round(min(scale_x, scale_y) / downsample)
    averaged = k * downsample
    if k >= 2 and all(abs(s - averaged) <= tolerance * s for s in (scale_x, scale_y)):
        return ReadPlan(level, downsample, averaged, averaged, resample=True)
    return ReadPlan(level, downsample, scale_x, scale_y, resample=True)


def upsampling_factor(plan: ReadPlan) -> float:
    """How much level-0 pixels are enlarged by ``plan`` (1.0 = not at all)."""
    return max(1.0, 1.0 / min(plan.scale_x, plan.scale_y))


def check_upsampling(plan: ReadPlan, mpp: Mpp, target_mpp: float, max_upsample: float) -> None:
    """Refuse a plan that would enlarge level-0 pixels by more than ``max_upsample``.

    A level used as it is (within the tolerance) is never upsampled. Raises ``InputError``
    (the caller adds the path) naming the finest resolution, the target and the options.
    """
    factor = upsampling_factor(plan)
    if not plan.resample or factor <= max_upsample * (1 + 1e-9):
        return
    finest = max(mpp.x, mpp.y)
    raise InputError(
        f"target {target_mpp:.4g} um/px is finer than the slide's finest level "
        f"({finest:.4g} um/px, mpp from {mpp.source}): tiles would be upsampled "
        f"{factor:.3g}x, above wsi.resolution.max_upsample = {max_upsample:g}; use a coarser "
        f"target (wsi.resolution.mpp >= {finest:.4g}), set the sample sheet's `mpp` if the "
        "slide's resolution metadata is wrong, or raise wsi.resolution.max_upsample"
    )
