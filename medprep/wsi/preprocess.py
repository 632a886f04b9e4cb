"""Preprocess one slide: resolution, the level to tile from, tissue mask and thumbnail.

The mask is computed on a low-resolution image at ``wsi.tissue.mask_mpp`` microns per
pixel, built from the coarsest pyramid level that is at least that fine, read in chunks
of bounded size and reduced by area averaging, so memory follows the mask's size (set by
the slide's physical size), never the size of a pyramid level.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medprep.common import statuses
from medprep.common.errors import InputError
from medprep.common.parallel import run_parallel
from medprep.wsi import guard, qc, stain, vendors
from medprep.wsi import resolution as res
from medprep.wsi.marks import autocontrast
from medprep.wsi.settings import ResolutionSettings, TissueSettings
from medprep.wsi.slide import RegionReadError, SlideInfo, SlideReader, inspect_slide, make_opaque
from medprep.wsi.tissue import TissueResult, detect_tissue, max_channel
from medprep.wsi.workers import (
    ChunkTask,
    ReadErrors,
    close_worker,
    init_worker,
    read_chunk,
    worker_died,
)

log = logging.getLogger(__name__)

# A mask (and thumbnail) larger than this is refused: 2**26 pixels is 65 x 65 mm at 8 um/px,
# more than the scan area of any glass slide. A header claiming more is damaged or hostile.
MAX_MASK_PIXELS = 2**26
# Largest region side (pixels at the level read) of one read; bounds worker memory.
MAX_READ_SIDE = 4096
# Below this many chunks the mask is read in this process (a pool costs more to start).
MIN_CHUNKS_FOR_POOL = 8

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# Relative amount by which the target may be finer than level 0 before it is worth a warning.
UPSAMPLING_WARNING = 0.01

# Stain vectors (brightfield) come from this many tissue regions of STAIN_REGION_SIDE
# pixels at the tiles' resolution, centred on random tissue-mask pixels (2.1 M pixels at
# most). At mask resolution each pixel averages nuclei and stroma: the vectors come out
# closer together and the strengths weaker than in the tiles (CMU-1 at 8 um/px: 32
# degrees between H and E, strengths 1.68 / 1.44; from the regions: 41 degrees,
# 2.77 / 2.25; benchmarks/results/stain.txt), so normalising tiles with them would be wrong.
STAIN_REGIONS = 32
STAIN_REGION_SIDE = 256


@dataclass(frozen=True)
class MaskGeometry:
    """How mask pixels map to level 0: pixel (i, j) covers [j*dx, (j+1)*dx) x [i*dy, (i+1)*dy)."""

    width: int
    height: int
    downsample_x: float
    downsample_y: float
    level: int  # pyramid level the mask was computed from

    @classmethod
    def for_slide(cls, info: SlideInfo, mpp: res.Mpp, mask_mpp: float) -> MaskGeometry:
        dx = mask_mpp / mpp.x
        dy = mask_mpp / mpp.y
        width = max(1, math.ceil(info.dimensions[0] / dx - 1e-9))
        height = max(1, math.ceil(info.dimensions[1] / dy - 1e-9))
        if width * height > MAX_MASK_PIXELS:
            raise InputError(
                f"slide is {info.dimensions[0]} x {info.dimensions[1]} pixels at "
                f"{mpp.x:.4g} um/px ({info.dimensions[0] * mpp.x / 1000:.0f} x "
                f"{info.dimensions[1] * mpp.y / 1000:.0f} mm), too large for a tissue mask at "
                f"{mask_mpp} um/px ({width} x {height} > {MAX_MASK_PIXELS} pixels); "
                "the header is probably damaged (or raise wsi.tissue.mask_mpp)",
                path=info.path,
            )
        level = res.choose_level(info.level_downsamples, min(dx, dy))
        return cls(width, height, dx, dy, level)


@dataclass
class PreprocessResult:
    mask: np.ndarray  # bool, mask resolution
    thumbnail: np.ndarray  # uint8 RGB, same size as the mask
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def chunk_tasks(
    info: SlideInfo, geometry: MaskGeometry, max_read_side: int = MAX_READ_SIDE
) -> list[ChunkTask]:
    """Tasks that together produce the whole mask-resolution image, each read bounded.

    Output pixel ``i`` covers level-0 ``[i*d, (i+1)*d)``, i.e. ``[i*r, (i+1)*r)`` at the
    level read (``r`` = level pixels per output pixel); each task reads the whole level
    pixels around its piece and resizes the exact fractional box.
    """
    level = geometry.level
    ds = info.level_downsamples[level]
    ratio_x = geometry.downsample_x / ds
    ratio_y = geometry.downsample_y / ds
    step_x = max(1, int((max_read_side - 2) / ratio_x))
    step_y = max(1, int((max_read_side - 2) / ratio_y))
    tasks: list[ChunkTask] = []
    for oy in range(0, geometry.height, step_y):
        oy1 = min(oy + step_y, geometry.height)
        for ox in range(0, geometry.width, step_x):
            ox1 = min(ox + step_x, geometry.width)
            a_x, b_x = ox * ratio_x, ox1 * ratio_x
            a_y, b_y = oy * ratio_y, oy1 * ratio_y
            left, top = math.floor(a_x), math.floor(a_y)
            right, bottom = max(math.ceil(b_x), left + 1), max(math.ceil(b_y), top + 1)
            tasks.append(
                ChunkTask(
                    index=len(tasks),
                    level=level,
                    read_x=round(left * ds),
                    read_y=round(top * ds),
                    read_width=right - left,
                    read_height=bottom - top,
                    box=(a_x - left, a_y - top, b_x - left, b_y - top),
                    out_x=ox,
                    out_y=oy,
                    out_width=ox1 - ox,
                    out_height=oy1 - oy,
                )
            )
    return tasks


def read_low_resolution(
    info: SlideInfo,
    geometry: MaskGeometry,
    workers: int = 1,
    max_read_side: int = MAX_READ_SIDE,
    read_errors: ReadErrors | None = None,
) -> np.ndarray:
    """The whole slide as an RGBA image at mask resolution (alpha 0 = not scanned).

    Slide tiles that cannot be decoded are left out (alpha 0, as if not scanned) and
    counted in ``read_errors`` (default: none allowed, the first fails the slide).
    """
    tasks = chunk_tasks(info, geometry, max_read_side)
    image = np.zeros((geometry.height, geometry.width, 4), dtype=np.uint8)
    pool_workers = workers if len(tasks) >= MIN_CHUNKS_FOR_POOL else 1
    read_errors = read_errors if read_errors is not None else ReadErrors(0, info.path)
    try:
        for index, chunk, damaged in run_parallel(
            read_chunk, tasks, pool_workers, init_worker, (info.path,)
        ):
            if isinstance(chunk, str):
                raise InputError(chunk, path=info.path)
            read_errors.add_damaged(damaged)
            task = tasks[index]
            image[
                task.out_y : task.out_y + task.out_height, task.out_x : task.out_x + task.out_width
            ] = chunk
    except BrokenProcessPool:
        raise worker_died(info.path) from None
    finally:
        close_worker()
    return image


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Split a low-resolution RGBA image into RGB on ``background`` and a scanned mask."""
    from medprep.wsi.slide import rgba_to_rgb

    scanned = rgba[..., 3] >= 128
    return rgba_to_rgb(rgba, background), scanned


def background_for(info: SlideInfo, tissue_mode: str) -> tuple[int, int, int]:
    """Colour of unscanned areas: the format's own if it has one, else by stain type."""
    if info.background is not None:
        return info.background
    return BLACK if tissue_mode == "fluorescence" else WHITE


@dataclass(frozen=True)
class StainRegion:
    """A region read for the stain estimate: level-0 origin, size at ``level``."""

    x: int
    y: int
    width: int
    height: int


def stain_regions(
    mask: np.ndarray,
    geometry: MaskGeometry,
    dimensions: tuple[int, int],
    plan: res.ReadPlan,
    count: int = STAIN_REGIONS,
    side: int = STAIN_REGION_SIDE,
    seed: int = 0,
) -> list[StainRegion]:
    """Regions of ``side`` tile pixels (``plan``'s scale) centred on up to ``count``
    random tissue pixels of ``mask`` (drawn with ``seed``), inside the slide; sizes in
    pixels of ``plan.level``."""
    extent_x, extent_y = side * plan.scale_x, side * plan.scale_y  # level 0
    rows, cols = stain.sample_tissue_pixels(mask, count, seed)
    regions = []
    for row, col in zip(rows, cols, strict=True):
        x = (col + 0.5) * geometry.downsample_x - extent_x / 2
        y = (row + 0.5) * geometry.downsample_y - extent_y / 2
        x = int(round(min(max(x, 0.0), max(dimensions[0] - extent_x, 0.0))))
        y = int(round(min(max(y, 0.0), max(dimensions[1] - extent_y, 0.0))))
        width = max(1, math.ceil(min(extent_x, dimensions[0] - x) / plan.level_downsample))
        height = max(1, math.ceil(min(extent_y, dimensions[1] - y) / plan.level_downsample))
        regions.append(StainRegion(x, y, width, height))
    return regions


def read_stain_pixels(
    path: str,
    regions: list[StainRegion],
    plan: res.ReadPlan,
    background: tuple[int, int, int],
    side: int = STAIN_REGION_SIDE,
) -> tuple[np.ndarray, list[str]]:
    """The regions' RGB pixels at about the tiles' resolution (area-averaged from
    ``plan.level``), as one N x 3 uint8 array; and one warning per distinct read error
    (a damaged slide tile under several regions is named once)."""
    from PIL import Image

    pixels = []
    skipped: dict[str, int] = {}
    reader = SlideReader(path)
    try:
        for region in regions:
            try:
                rgba = reader.read_rgba(plan.level, region.x, region.y, region.width, region.height)
            except RegionReadError as error:
                skipped[str(error)] = skipped.get(str(error), 0) + 1
                continue
            image = Image.fromarray(make_opaque(rgba, background)[..., :3])
            target = (
                max(1, round(region.width * plan.level_downsample / plan.scale_x)),
                max(1, round(region.height * plan.level_downsample / plan.scale_y)),
            )
            if target != image.size and max(target) <= side:
                image = image.resize(target, Image.Resampling.BOX)
            pixels.append(np.asarray(image).reshape(-1, 3))
    finally:
        reader.close()
    errors = [
        f"stain estimate: skipped {n} region(s) over slide data that cannot be read: {cause}"
        for cause, n in skipped.items()
    ]
    if not pixels:
        return np.zeros((0, 3), np.uint8), errors
    return np.concatenate(pixels), errors


def estimate_stain(
    info: SlideInfo,
    mask: np.ndarray,
    geometry: MaskGeometry,
    plan: res.ReadPlan,
    background: tuple[int, int, int],
    tile_mpp: float,
) -> tuple[dict[str, Any], list[str]]:
    """The slide's stain record (``stain.StainEstimate.summary``) from tissue regions;
    never raises on the data (no tissue or one stain: no vectors, and why)."""
    regions = stain_regions(mask, geometry, info.dimensions, plan)
    pixels, warnings = read_stain_pixels(info.path, regions, plan, background)
    estimate = stain.estimate_rgb(pixels)
    if not regions:
        estimate = stain.StainEstimate(None, 0, "no tissue")
    record = estimate.summary(
        regions=len(regions) - len(warnings), region_side=STAIN_REGION_SIDE, mpp=tile_mpp
    )
    return record, warnings


def preprocess_slide(
    path: str | os.PathLike,
    resolution: ResolutionSettings | None = None,
    tissue: TissueSettings | None = None,
    *,
    mpp_override: float | None = None,
    workers: int = 1,
    limits: guard.Limits | None = None,
    max_read_errors: int = 0,
) -> PreprocessResult:
    """Resolution, level choice, tissue mask and thumbnail of the slide at ``path``.

    ``max_read_errors`` (``wsi.tile.max_read_errors``): slide tiles of the level read that
    may fail to decode; they are left out of the mask and thumbnail, with a warning each.
    """
    resolution = resolution or ResolutionSettings()
    tissue = tissue or TissueSettings()
    limits = limits or guard.Limits()
    if os.path.isfile(path):
        guard.check_tiff(path, limits)  # before OpenSlide plans anything on the claims
        vendors.check_supported(path)
    info = inspect_slide(path)
    guard.check_pixels(*info.dimensions, limits, info.path)
    try:
        mpp, warnings = res.resolve_mpp(
            (info.mpp_x, info.mpp_y), mpp_override, resolution.mpp_fallback
        )
        target = res.target_resolution(resolution, mpp, info.level_downsamples)
    except InputError as error:
        raise error.with_context(path=info.path) from None
    plan = res.plan_read(info.level_downsamples, mpp, target.mpp, resolution.tolerance)
    # a damaged header (a physical size no glass slide has) is the first thing to report
    geometry = MaskGeometry.for_slide(info, mpp, tissue.mask_mpp)
    try:
        res.check_upsampling(plan, mpp, target.mpp, resolution.max_upsample)
    except InputError as error:
        raise error.with_context(path=info.path) from None
    if plan.resample and res.upsampling_factor(plan) > 1 + UPSAMPLING_WARNING:
        warnings.append(
            f"target {target.mpp:.4g} um/px is finer than the slide's {mpp.x:.4g} um/px: "
            f"tiles are upsampled {res.upsampling_factor(plan):.3g}x "
            "(allowed by wsi.resolution.max_upsample)"
        )
    tile_mpp_x = plan.scale_x * mpp.x
    tile_mpp_y = plan.scale_y * mpp.y

    log.info(
        "slide %s: %s, %d x %d, %d level(s), mpp %.4g (%s); mask %d x %d from level %d",
        info.path,
        info.vendor,
        *info.dimensions,
        info.level_count,
        mpp.x,
        mpp.source,
        geometry.width,
        geometry.height,
        geometry.level,
    )
    read_errors = ReadErrors(max_read_errors, info.path)
    rgba = read_low_resolution(info, geometry, workers, read_errors=read_errors)
    warnings += [
        f"left out of the mask and thumbnail, slide data that cannot be read: {e}"
        for e in read_errors.found.values()
    ]
    scanned = rgba[..., 3] >= 128
    # mode detection and thresholds look only at scanned pixels, so the colour used for
    # unscanned ones here does not matter; the thumbnail is recomposited below
    rgb, _ = composite(rgba, WHITE)
    result: TissueResult = detect_tissue(rgb, tissue, tissue.mask_mpp, scanned)
    background = background_for(info, result.mode)
    thumbnail, _ = composite(rgba, background)
    dark = None
    if result.mode == "fluorescence":
        glass = scanned & ~result.mask
        glass_brightness = float(np.median(max_channel(rgb[glass]))) if glass.any() else None
        dark = qc.dark_level(glass_brightness, result.threshold)
        # nearly black otherwise: stretched so tissue and mask can be judged by eye
        thumbnail = autocontrast(thumbnail, scanned)
    del rgba, rgb

    stain_record = None  # fluorescence: no stains to estimate
    if result.mode == "brightfield":
        stain_record, stain_warnings = estimate_stain(
            info, result.mask, geometry, plan, background, (tile_mpp_x + tile_mpp_y) / 2
        )
        warnings.extend(stain_warnings)

    mask_pixel_mm2 = (geometry.downsample_x * mpp.x) * (geometry.downsample_y * mpp.y) / 1e6
    tissue_area_mm2 = float(result.mask.sum()) * mask_pixel_mm2
    status = statuses.OK
    if not result.mask.any():
        status = statuses.NO_TISSUE
        warnings.append(
            f"no tissue found ({result.mode}, threshold {result.threshold:.1f}); "
            "check wsi.tissue.mode and wsi.tissue.threshold"
        )
    summary: dict[str, Any] = {
        "status": status,
        "warnings": warnings,
        "vendor": info.vendor,
        "dimensions": list(info.dimensions),
        "levels": info.levels(),
        "objective_power": info.objective_power,
        "mpp": round(mpp.mean, 6),
        "mpp_x": mpp.x,
        "mpp_y": mpp.y,
        "mpp_source": mpp.source,
        "metadata_mpp": [info.mpp_x, info.mpp_y] if info.mpp_x is not None else None,
        "target_mpp": target.mpp,
        "target_mode": target.mode,
        "target_requested": target.requested,
        "level": plan.level,
        "level_downsample": plan.level_downsample,
        "scale": [plan.scale_x, plan.scale_y],
        "resample": plan.resample,
        "tolerance": resolution.tolerance,  # the tiler's pre-reduction bound (workers.py)
        "tile_mpp": [tile_mpp_x, tile_mpp_y],
        "achieved_mpp": round((tile_mpp_x + tile_mpp_y) / 2, 6),
        "upsample": round(res.upsampling_factor(plan), 6),
        "tissue_mode": result.mode,
        "tissue_mode_detected": result.mode_detected,
        "tissue_area_mm2": round(tissue_area_mm2, 4),
        "tissue_fraction": round(result.tissue_fraction, 6),
        "background": list(background),
        "mask": {
            "mpp": tissue.mask_mpp,
            "level": geometry.level,
            "width": geometry.width,
            "height": geometry.height,
            "downsample": [geometry.downsample_x, geometry.downsample_y],
        },
        "thresholds": {
            "threshold": result.threshold,
            "otsu_threshold": result.otsu_threshold,
            "fixed_threshold": tissue.threshold,
            "min_threshold": tissue.min_threshold,
            "closing_um": tissue.closing_um,
            "min_object_um2": tissue.min_object_um2,
            "fill_holes": tissue.fill_holes,
            "dark_level": dark,
        },
        "thumbnail_autocontrast": result.mode == "fluorescence",
        "stain": stain_record,
    }
    return PreprocessResult(result.mask, thumbnail, summary, warnings)


# Keys of the preprocess summary that go into the step manifest (ARCHITECTURE.md).
MANIFEST_SUMMARY_KEYS = (
    "status",
    "warnings",
    "mpp",
    "mpp_source",
    "target_mpp",
    "achieved_mpp",
    "level",
    "tissue_area_mm2",
    "tissue_mode",
    "dimensions",
    "vendor",
    "stain",
)


def manifest_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in MANIFEST_SUMMARY_KEYS}
