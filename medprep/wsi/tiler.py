"""Tile one slide: grid at the target resolution, candidates from the tissue mask, block
reads on a pool of workers, per-tile QC, pixels into a container, and the tile table.

Memory is bounded whatever the slide size: a worker holds one block (at most
``MAX_READ_SIDE`` pixels per side at the level read), at most ``2 x workers`` results are
in flight, and the table's columns are preallocated arrays of the candidate count.
Output depends only on the inputs and settings, never on the number of workers: blocks
and tiles are numbered before any work starts and results are consumed in that order.
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
from medprep.common.progress import Progress
from medprep.wsi import grid as grids
from medprep.wsi import labels, marks, qc
from medprep.wsi.settings import TileSettings
from medprep.wsi.slide import inspect_slide
from medprep.wsi.workers import (
    READ_ERROR,
    BlockTask,
    ReadErrors,
    TileJob,
    close_worker,
    init_worker,
    prereduce_factor,
    read_block,
    unread_block,
    worker_died,
)
from medprep.wsi.writers import EXTENSIONS, make_container, tile_key

log = logging.getLogger(__name__)

# Largest side, in pixels at the level read, of one block read (64 MiB of RGBA).
MAX_READ_SIDE = 4096
# Extra level pixels read around a block when resampling, per output pixel of reduction:
# the bicubic filter reaches 2 source pixels per output pixel on each side; after a
# pre-reduction by k the Lanczos filter reaches 3 averaged pixels (of k level pixels), and
# one averaged pixel more keeps the averaging cells at the block edges whole.
RESAMPLE_SUPPORT = 2
PREREDUCED_SUPPORT = 3


@dataclass(frozen=True)
class SlidePlan:
    """What preprocessing decided about a slide, as the tiler needs it."""

    slide_path: str
    dimensions: tuple[int, int]
    level: int
    level_downsample: float
    level_dimensions: tuple[int, int]
    scale_x: float  # level-0 pixels per output pixel
    scale_y: float
    resample: bool
    target_mpp: float
    tile_mpp: float
    tissue_mode: str
    tissue_threshold: float
    background: tuple[int, int, int]
    mask_downsample_x: float
    mask_downsample_y: float
    dark_level: float | None = None  # fluorescence: signal as dark as the slide's glass
    tolerance: float = 0.0  # wsi.resolution.tolerance (bounds the resampling pre-reduction)

    @property
    def prereduce(self) -> int:
        """The box pre-reduction of resampled blocks (``workers.prereduce_factor``)."""
        if not self.resample:
            return 1
        ratio = min(self.scale_x, self.scale_y) / self.level_downsample
        return prereduce_factor(ratio, self.tolerance)

    @classmethod
    def from_summary(cls, slide_path: str | os.PathLike, summary: dict[str, Any]) -> SlidePlan:
        """Build the plan from a preprocess ``summary.json``, checking the slide still matches."""
        info = inspect_slide(slide_path)
        if list(info.dimensions) != list(summary["dimensions"]):
            raise InputError(
                f"slide is {info.dimensions[0]} x {info.dimensions[1]} but preprocessing saw "
                f"{summary['dimensions'][0]} x {summary['dimensions'][1]}: rerun preprocess",
                path=info.path,
            )
        level = int(summary["level"])
        return cls(
            slide_path=info.path,
            dimensions=info.dimensions,
            level=level,
            level_downsample=float(info.level_downsamples[level]),
            level_dimensions=info.level_dimensions[level],
            scale_x=float(summary["scale"][0]),
            scale_y=float(summary["scale"][1]),
            resample=bool(summary["resample"]),
            target_mpp=float(summary["target_mpp"]),
            tile_mpp=float(summary["tile_mpp"][0]),
            tissue_mode=summary["tissue_mode"],
            tissue_threshold=float(summary["thresholds"]["threshold"]),
            background=tuple(summary["background"]),
            mask_downsample_x=float(summary["mask"]["downsample"][0]),
            mask_downsample_y=float(summary["mask"]["downsample"][1]),
            dark_level=summary["thresholds"].get("dark_level"),
            tolerance=float(summary.get("tolerance", 0.0)),
        )


@dataclass
class TileResult:
    table: dict[str, np.ndarray | list]  # columns of the tile table (writers.TABLE_COLUMNS)
    summary: dict[str, Any]
    pixel_files: list[str]  # files written into the pixels folder, in order
    kept_boxes: np.ndarray  # (n, 4) level-0 x, y, width, height of kept tiles
    rejected_boxes: np.ndarray  # the same for candidates rejected by QC filters
    warnings: list[str] = field(default_factory=list)


def read_margin(plan: SlidePlan) -> int:
    """Level pixels read around a block beyond its tiles' footprints: the reach of the
    resampling filter (0 without resampling)."""
    if not plan.resample:
        return 0
    ratio = max(plan.scale_x, plan.scale_y) / plan.level_downsample
    k = plan.prereduce
    support = PREREDUCED_SUPPORT if k > 1 else RESAMPLE_SUPPORT
    return math.ceil(support * max(ratio, k)) + k


def plan_blocks(
    plan: SlidePlan, grid: grids.Grid, selected: np.ndarray, block_tiles: int
) -> tuple[list[BlockTask], list[tuple[np.ndarray, np.ndarray]], int]:
    """Block tasks for the selected tiles, their grid indices, and the block side used."""
    ds = plan.level_downsample
    side = grids.block_side_for_read_limit(
        block_tiles, grid.size, grid.step, plan.scale_x / ds, MAX_READ_SIDE
    )
    k = plan.prereduce
    margin = read_margin(plan)
    level_w, level_h = plan.level_dimensions
    tasks: list[BlockTask] = []
    indices = []
    for block in grids.make_blocks(selected, side):
        xs = grid.xs[block.cols]
        ys = grid.ys[block.rows]
        # the block's extent at the level read, in whole pixels, plus the filter margin
        left = max(int(np.floor(xs.min() / ds)) - margin, 0)
        top = max(int(np.floor(ys.min() / ds)) - margin, 0)
        right = min(int(np.ceil((xs.max() + grid.width_l0) / ds)) + margin, level_w)
        bottom = min(int(np.ceil((ys.max() + grid.height_l0) / ds)) + margin, level_h)
        if k > 1:
            # averaging cells on one lattice of the level (every k-th pixel from 0), so a
            # tile's pixels do not depend on which block it is read with
            left, top = left // k * k, top // k * k
            right = min(left + -(-(right - left) // k) * k, level_w)
            bottom = min(top + -(-(bottom - top) // k) * k, level_h)
        right = max(right, left + 1)
        bottom = max(bottom, top + 1)
        read_x = round(left * ds)
        read_y = round(top * ds)
        tasks.append(
            BlockTask(
                index=len(tasks),
                read_x=read_x,
                read_y=read_y,
                read_width=right - left,
                read_height=bottom - top,
                xs=tuple(int(v) for v in xs),
                ys=tuple(int(v) for v in ys),
            )
        )
        indices.append((block.rows, block.cols))
    return tasks, indices, side


def tile_slide(
    plan: SlidePlan,
    mask: np.ndarray,
    settings: TileSettings | None = None,
    *,
    sample: str,
    pixels_dir: str | os.PathLike | None,
    workers: int = 1,
    flags: dict[str, np.ndarray] | None = None,
    annotations: labels.Annotations | None = None,
    stain_matrix: np.ndarray | None = None,
) -> TileResult:
    """Tile the slide of ``plan`` where ``mask`` (from preprocessing) has tissue.

    Pixels go into ``pixels_dir`` (a folder the caller stages; ignored for ``coords``).
    The table's ``file`` column is relative to the parent of ``pixels_dir``. ``flags``:
    artifact masks at mask resolution (``marks.FLAG_NAMES``; missing = none found),
    mapped to tiles as ``<name>_fraction`` columns and filtered by ``max_<name>_fraction``.
    ``annotations``: region labels (``medprep.wsi.labels``) as ``label`` columns; with
    ``settings.annotated_only`` the candidates labelled background are not read.
    ``stain_matrix``: a 3 x 3 OD matrix (``medprep.wsi.stain``) applied to the pixels
    written (after the QC scores, which stay those of the slide as scanned).
    """
    settings = settings or TileSettings()
    grid = grids.make_grid(
        plan.dimensions[0],
        plan.dimensions[1],
        plan.scale_x,
        plan.scale_y,
        settings.size,
        settings.step,
    )
    coverage = grids.mask_coverage(mask, grid, plan.mask_downsample_x, plan.mask_downsample_y)
    selected = coverage >= settings.min_tissue
    if settings.min_tissue <= 0:
        selected[:] = True
    region_labels, unannotated = None, 0
    if annotations is not None:
        region_labels = labels.label_grid(annotations, grid, selected, settings.labels.background)
        if settings.annotated_only:
            unannotated = region_labels.drop_unannotated(selected)
    flag_cover = marks.flag_coverage(
        flags or {}, grid, plan.mask_downsample_x, plan.mask_downsample_y, mask.shape
    )
    tasks, indices, side = plan_blocks(plan, grid, selected, settings.block_tiles)
    candidates = int(selected.sum())
    log.info(
        "tiling %s: grid %d x %d, %d candidates in %d blocks of up to %d x %d tiles, %d worker(s)",
        plan.slide_path,
        grid.shape[1],
        grid.shape[0],
        candidates,
        len(tasks),
        side,
        side,
        workers,
    )
    image_format = settings.image_format
    job = TileJob(
        slide_path=plan.slide_path,
        level=plan.level,
        level_downsample=plan.level_downsample,
        resample=plan.resample,
        size=settings.size,
        width_l0=grid.width_l0,
        height_l0=grid.height_l0,
        image_format=image_format,
        quality=settings.quality,
        tissue_mode=plan.tissue_mode,
        tissue_threshold=plan.tissue_threshold,
        background=plan.background,
        filters=settings.filters,
        dark_level=plan.dark_level,
        prereduce=plan.prereduce,
        margin_l0=read_margin(plan) * plan.level_downsample,
        stain_matrix=None
        if stain_matrix is None
        else tuple(tuple(float(v) for v in row) for row in np.asarray(stain_matrix)),
    )
    container = make_container(settings.container, pixels_dir, settings.shard_max_tiles)
    extension = EXTENSIONS[settings.format]

    n = candidates
    table: dict[str, Any] = {
        "x": np.zeros(n, np.int64),
        "y": np.zeros(n, np.int64),
        "mask_coverage": np.zeros(n, np.float64),
        **{name: np.zeros(n, np.float64) for name in qc.SCORE_NAMES},
        **{name: np.zeros(n, np.float64) for name in marks.FRACTION_NAMES},
        "file": [],
        "member": [],
        "offset": [],
        "nbytes": [],
    }
    rejected = {reason: 0 for reason in (*qc.REJECT_REASONS, *marks.REJECT_REASONS, READ_ERROR)}
    flagged = {name: 0 for name in marks.FLAG_NAMES}
    rejected_boxes: list[tuple[int, int]] = []
    read_errors = ReadErrors(settings.max_read_errors, plan.slide_path)
    kept = 0
    read_calls = 0
    direct_reads = 0
    progress = Progress("tiles", candidates)
    # coordinates only, no pixel filter: nothing needs the pixels, so none are read; the
    # pixel score columns are null (mask coverage and artifact fractions are mask-based)
    score_pixels = (
        settings.container != "coords"
        or settings.coords_scores
        or qc.pixel_filters_on(settings.filters)
    )
    try:
        if score_pixels:
            results = run_parallel(
                read_block,
                tasks,
                workers,
                init_worker,
                (plan.slide_path, job),
                max_in_flight=2 * max(workers, 1),
            )
        else:
            results = (unread_block(task) for task in tasks)
        for result in results:
            read_calls += score_pixels
            direct_reads += result.direct
            rows, cols = indices[result.index]
            task = tasks[result.index]
            progress.advance(len(task.xs))
            if result.error is not None:
                read_errors.add_region(result.error)
                rejected[READ_ERROR] += len(task.xs)
                log.warning("skipping %d tile(s): %s", len(task.xs), result.error)
                continue
            if result.damaged:
                read_errors.add_damaged(result.damaged)
                skipped = result.reasons.count(READ_ERROR)
                log.warning(
                    "skipping %d tile(s) over damaged slide data: %s",
                    skipped,
                    "; ".join(tile.describe() for tile in result.damaged),
                )
            for k in range(len(task.xs)):
                x, y = task.xs[k], task.ys[k]
                fractions = {name: cover[rows[k], cols[k]] for name, cover in flag_cover.items()}
                reason = result.reasons[k] or marks.rejection_reason(fractions, settings.filters)
                for name in marks.flagged(fractions):
                    flagged[name] += 1
                if reason is not None:
                    rejected[reason] += 1
                    rejected_boxes.append((x, y))
                    continue
                file, member, offset, nbytes = None, None, None, None
                data = result.encoded[k]
                if data is not None:
                    file, member = container.add(tile_key(sample, x, y), data, extension)
                    offset, nbytes = container.last_offset, len(data)
                table["x"][kept] = x
                table["y"][kept] = y
                table["mask_coverage"][kept] = coverage[rows[k], cols[k]]
                if score_pixels:
                    for name, value in zip(qc.SCORE_NAMES, result.scores[k], strict=True):
                        table[name][kept] = value
                for name, value in fractions.items():
                    table[f"{name}_fraction"][kept] = value
                table["file"].append(file)
                table["member"].append(member)
                table["offset"].append(offset)
                table["nbytes"].append(nbytes if file is not None else None)
                kept += 1
    except BrokenProcessPool:
        raise worker_died(plan.slide_path) from None
    finally:
        container.close()
        close_worker()
    progress.finish()

    for name in ("x", "y", "mask_coverage", *qc.SCORE_NAMES, *marks.FRACTION_NAMES):
        table[name] = table[name][:kept]
    if not score_pixels:
        table.update({name: [None] * kept for name in qc.SCORE_NAMES})
    table.update(
        tile_id=np.arange(kept, dtype=np.int64),
        sample=[sample] * kept,
        width_l0=np.full(kept, grid.width_l0),
        height_l0=np.full(kept, grid.height_l0),
        level=np.full(kept, plan.level, dtype=np.int32),
        target_mpp=np.full(kept, plan.target_mpp),
        mpp=np.full(kept, plan.tile_mpp),
        size=np.full(kept, settings.size, dtype=np.int32),
    )
    if region_labels is not None:
        kept_labels = region_labels.at(grid, table["x"], table["y"])
        table.update(kept_labels.columns(settings.labels.class_fractions))
    warnings = [
        f"skipped the tiles over slide data that cannot be read: {e}"
        for e in read_errors.found.values()
    ]
    status = statuses.OK if kept else statuses.NO_TILES
    if not kept:
        warnings.append(f"no tiles kept ({candidates} candidates of {grid.count} grid positions)")
    summary = {
        "status": status,
        "warnings": warnings,
        "tiles": kept,
        "candidates": candidates,
        "grid_positions": grid.count,
        "rejected": rejected,
        "flagged": flagged,
        "read_calls": read_calls,
        "direct_reads": direct_reads,
        "read_errors": len(read_errors),
        "pixel_scores": score_pixels,
        "target_mpp": plan.target_mpp,
        "tile_mpp": plan.tile_mpp,
        "level": plan.level,
        "resample": plan.resample,
        "resample_prereduce": plan.prereduce,
        "size": settings.size,
        "step": settings.step,
        "min_tissue": settings.min_tissue,
        "format": image_format,
        "quality": settings.quality if image_format == "jpeg" else None,
        "container": settings.container,
        "pixel_files": len(container.files),
        "block_tiles": side,
    }
    if region_labels is not None and annotations is not None:
        summary["labels"] = {
            "classes": list(annotations.classes),
            "background": settings.labels.background,
            "annotated_only": settings.annotated_only,
            "unannotated_dropped": unannotated,
            "tiles": kept_labels.counts(),
        }
    kept_boxes = (
        np.column_stack(
            [table["x"], table["y"], np.full(kept, grid.width_l0), np.full(kept, grid.height_l0)]
        )
        if kept
        else np.zeros((0, 4))
    )
    rejected_arr = np.array(
        [(x, y, grid.width_l0, grid.height_l0) for x, y in rejected_boxes], dtype=np.float64
    ).reshape(-1, 4)
    return TileResult(table, summary, list(container.files), kept_boxes, rejected_arr, warnings)


# Small thumbnails are enlarged (by a whole factor, at most 8) so tile outlines stay visible.
OVERLAY_MIN_SIDE = 1024
OVERLAY_MAX_ZOOM = 8


def draw_overlay(
    thumbnail: np.ndarray,
    kept_boxes: np.ndarray,
    rejected_boxes: np.ndarray,
    mask_downsample_x: float,
    mask_downsample_y: float,
    outlines: list[tuple[tuple[int, int, int], list[np.ndarray]]] | None = None,
) -> np.ndarray:
    """The thumbnail with kept tiles outlined in green and QC-rejected ones in red.

    Boxes are (x, y, width, height) in level-0 pixels; thumbnail pixels are
    ``mask_downsample_*`` level-0 pixels. ``outlines``: annotation rings (level-0 (n, 2)
    arrays) with their colours (``labels.outlines``), drawn over the boxes, 2 pixels wide.
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(thumbnail).convert("RGB")
    zoom = min(OVERLAY_MAX_ZOOM, max(1, -(-OVERLAY_MIN_SIDE // max(image.size))))
    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    sx = zoom / mask_downsample_x
    sy = zoom / mask_downsample_y
    draw = ImageDraw.Draw(image)
    for boxes, colour in ((rejected_boxes, (220, 30, 30)), (kept_boxes, (0, 170, 0))):
        for x, y, w, h in boxes:
            x0, y0 = round(x * sx), round(y * sy)
            x1 = max(round((x + w) * sx) - 1, x0)
            y1 = max(round((y + h) * sy) - 1, y0)
            draw.rectangle((x0, y0, x1, y1), outline=colour)
    for colour, rings in outlines or []:
        for ring in rings:
            points = [(float(x * sx), float(y * sy)) for x, y in ring[:, :2]]
            draw.line(points, fill=colour, width=2, joint="curve")
    return np.asarray(image)
