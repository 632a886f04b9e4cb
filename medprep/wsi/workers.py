"""What runs inside pool workers: one slide handle per worker, opened by the initializer.

OpenSlide handles cannot be pickled and are costly to open, so each worker opens the
slide once in ``init_worker`` (run by ``medprep.common.parallel`` under fork or spawn; with one
worker it runs in the calling process). Tasks and results are small picklable dataclasses;
a failed read comes back as a result carrying the error, so the caller decides whether
the sample fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medprep.wsi import qc, stain
from medprep.wsi.settings import FilterSettings
from medprep.wsi.slide import RegionReadError, SlideReader, make_opaque
from medprep.wsi.tiff_read import DamagedTile
from medprep.wsi.writers import encode_tile


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs to turn a block read into scored, encoded tiles."""

    slide_path: str
    level: int
    level_downsample: float
    resample: bool
    size: int
    width_l0: float  # level-0 extent of a tile
    height_l0: float
    image_format: str | None  # None = score only (coordinates container)
    quality: int
    tissue_mode: str
    tissue_threshold: float
    background: tuple[int, int, int]
    filters: FilterSettings = field(default_factory=FilterSettings)
    dark_level: float | None = None  # fluorescence: the slide's glass level (qc.dark_level)
    # resampling: the block is first averaged over ``prereduce`` x ``prereduce`` level
    # pixels (``prereduce_factor``), then resized to the tiles with ``RESAMPLE_FILTER``
    prereduce: int = 1
    # how far (level-0 pixels) beyond a tile's footprint its pixels reach when resampled
    # (the filter's support): a damaged slide tile that close spoils the tile
    margin_l0: float = 0.0
    # OD matrix applied to the pixels written (``stain.apply_od_matrix``), or None
    stain_matrix: tuple[tuple[float, ...], ...] | None = None


@dataclass(frozen=True)
class BlockTask:
    index: int
    read_x: int  # level-0 origin of the region read
    read_y: int
    read_width: int  # size at ``TileJob.level``
    read_height: int
    xs: tuple[int, ...]  # level-0 origins of the block's tiles
    ys: tuple[int, ...]


@dataclass
class BlockResult:
    index: int
    scores: list[tuple[float, ...]]
    reasons: list[str | None]
    encoded: list[bytes | None]
    error: str | None = None
    direct: bool = False  # read from the stored tiles (tiff_read), not through OpenSlide
    # slide tiles of the block that cannot be decoded; the block's tiles they touch have
    # the reason ``READ_ERROR``
    damaged: tuple[DamagedTile, ...] = ()


# The reason of a tile that could not be scored because slide data under it is damaged.
READ_ERROR = "read_error"


def touches_damage(job: TileJob, x: int, y: int, damaged: tuple[DamagedTile, ...]) -> bool:
    """Whether the tile at level-0 (x, y), with its resampling reach, overlaps a damaged
    slide tile."""
    m = job.margin_l0
    left, top, right, bottom = x - m, y - m, x + job.width_l0 + m, y + job.height_l0 + m
    for tile in damaged:
        d_left, d_top, d_right, d_bottom = tile.box_l0()
        if left < d_right and d_left < right and top < d_bottom and d_top < bottom:
            return True
    return False


class ReadErrors:
    """The unreadable parts of a slide a step met, each counted once (a damaged tile can
    lie under two blocks), against ``wsi.tile.max_read_errors``: one more than the limit
    raises ``InputError`` naming it."""

    def __init__(self, limit: int, slide_path: str):
        self.limit = limit
        self.slide_path = slide_path
        self.found: dict[object, str] = {}

    def __len__(self) -> int:
        return len(self.found)

    def add(self, key: object, description: str) -> None:
        if key in self.found:
            return
        self.found[key] = description
        if len(self.found) > self.limit:
            from medprep.common.errors import InputError

            raise InputError(
                f"{description} ({len(self.found)} unreadable slide tile(s), more than "
                f"wsi.tile.max_read_errors = {self.limit})",
                path=self.slide_path,
            )

    def add_damaged(self, damaged: tuple[DamagedTile, ...]) -> None:
        for tile in damaged:
            self.add(tile.key, tile.describe())

    def add_region(self, message: str) -> None:
        self.add(("region", len(self.found)), message)


@dataclass(frozen=True)
class ChunkTask:
    """A piece of a downsampled whole-slide image: read a region, resize it exactly."""

    index: int
    level: int
    read_x: int  # level-0 origin
    read_y: int
    read_width: int  # at ``level``
    read_height: int
    box: tuple[float, float, float, float]  # source box inside the region read
    out_x: int  # where the piece goes in the output image
    out_y: int
    out_width: int
    out_height: int


@dataclass
class _WorkerState:
    reader: SlideReader
    job: TileJob | None


_STATE: _WorkerState | None = None

# PIL's bicubic resampling widens its support when reducing, so downsampling is antialiased.
RESAMPLE_FILTER = "BICUBIC"
# After a box pre-reduction (``prereduce_factor``) the rest of the resize is near 1:1, where
# bicubic interpolation softens detail more than the wide bicubic it replaces; Lanczos (3
# lobes) keeps the blur score of the tiles within a few % of the bicubic path. Measured on
# CMU-1 tissue at 0.2527 -> 0.5 um/px: PSNR against the bicubic path 35.7-36.0 dB, blur
# score 0.2-2.4% lower (box + bicubic: 34.6 dB, blur 18% lower); tests/wsi/test_wsi_fast_paths.py
# holds both bounds.
PREREDUCED_FILTER = "LANCZOS"


def worker_died(slide_path: str):
    """The error for a pool whose worker process died mid-read."""
    from medprep.common.errors import InputError

    return InputError(
        "a worker process died while reading the slide (out of memory, or the slide "
        "decoder crashed on damaged data)",
        path=slide_path,
    )


def init_worker(slide_path: str, job: TileJob | None = None) -> None:
    global _STATE
    close_worker()
    _STATE = _WorkerState(SlideReader(slide_path), job)


def close_worker() -> None:
    global _STATE
    if _STATE is not None:
        _STATE.reader.close()
        _STATE = None


def _state() -> _WorkerState:
    if _STATE is None:
        raise RuntimeError("worker not initialised: call init_worker first")
    return _STATE


def _tile_origin(
    job: TileJob, task: BlockTask, x: int, y: int, shape: tuple[int, ...]
) -> tuple[int, int]:
    """Where a tile starts in the block's pixels when no resampling is needed."""
    ds = job.level_downsample
    height, width = shape[:2]
    ix = min(max(round((x - task.read_x) / ds), 0), width - job.size)
    iy = min(max(round((y - task.read_y) / ds), 0), height - job.size)
    return ix, iy


def _source_span(origin: int, read_origin: int, extent_l0: float, ds: float, limit: int):
    """A tile's exact (fractional) footprint along one axis of the block image."""
    start = (origin - read_origin) / ds
    return max(start, 0.0), min(start + extent_l0 / ds, limit)


def prereduce_factor(ratio: float, tolerance: float) -> int:
    """The box pre-reduction of a resampled block: the largest whole factor ``k`` whose
    averaged pixels are at most ``tolerance`` coarser than the output pixels.

    ``ratio`` is level pixels per output pixel. Averaging ``k`` x ``k`` pixels (an area
    filter, antialiased) and then resizing by ``ratio / k`` costs a fraction of one wide
    bicubic pass over the whole block: at 0.2527 -> 0.5 um/px (ratio 1.98) the bicubic
    pass filters 8 source pixels per output pixel along each axis, the Lanczos pass over
    the averaged block 6, from a quarter of the pixels. ``k / ratio - 1`` is the relative coarsening, the same bound the resolution policy
    allows when it uses a native level as it is (``wsi.resolution.tolerance``); with
    tolerance 0, ``k`` never exceeds ``ratio`` (no intermediate is coarser than the output).
    """
    return max(1, math.floor(ratio * (1.0 + max(tolerance, 0.0)) + 1e-9))


def resample_tiles(rgba: np.ndarray, job: TileJob, task: BlockTask) -> list[np.ndarray]:
    """Every tile of the block resized from the block image over its exact footprint.

    The block is resized once, in PIL's own two passes: a horizontal pass per tile column
    over the whole block height, then a vertical pass per tile over its column strip. PIL
    resizes a box the same way (horizontal, then vertical, with the same coefficients), so
    each tile is bit for bit what ``image.resize((size, size), box=footprint)`` gives,
    while no source row is filtered twice for tiles of one column. The block is opaque
    (``make_opaque``) and is handed to PIL as RGBX over the same memory: no copy, and no
    conversion to premultiplied alpha and back as PIL does for RGBA.

    With ``job.prereduce`` = k > 1 the block is first averaged over k x k pixels
    (``Image.reduce``, whole block, once) and the tiles are resized from that over the
    same footprints (in averaged pixels) with ``PREREDUCED_FILTER``; see
    ``prereduce_factor``. Tiles are H x W x 4
    (the 4th byte 255, ignored by the scores and the encoder).
    """
    from PIL import Image

    resample = getattr(
        Image.Resampling, PREREDUCED_FILTER if job.prereduce > 1 else RESAMPLE_FILTER
    )
    ds = job.level_downsample * job.prereduce
    height, width = rgba.shape[:2]
    image = Image.frombuffer("RGBX", (width, height), rgba, "raw", "RGBX", 0, 1)
    if job.prereduce > 1:
        image = image.reduce(job.prereduce)
        width, height = image.size
    boxes = _whole_boxes(job, task, ds, width, height) if job.prereduce > 1 else None
    if boxes is not None:
        # the averaged pixels are the output pixels (resolution.plan_read): cut the tiles
        return [np.asarray(image.crop(box)) for box in boxes]
    strips: dict[int, Any] = {}  # a PIL image per tile column
    tiles = []
    for x, y in zip(task.xs, task.ys, strict=True):
        strip = strips.get(x)
        if strip is None:
            left, right = _source_span(x, task.read_x, job.width_l0, ds, width)
            strip = image.resize((job.size, height), resample, box=(left, 0, right, height))
            strips[x] = strip
        top, bottom = _source_span(y, task.read_y, job.height_l0, ds, height)
        tile = strip.resize((job.size, job.size), resample, box=(0, top, job.size, bottom))
        tiles.append(np.asarray(tile))
    return tiles


def _whole_boxes(job: TileJob, task: BlockTask, ds: float, width: int, height: int):
    """The tiles' boxes in the image at ``ds`` level-0 pixels per pixel when each is
    ``job.size`` whole pixels inside it (nothing left to resize), else None."""
    boxes = []
    for x, y in zip(task.xs, task.ys, strict=True):
        box = [(x - task.read_x) / ds, (y - task.read_y) / ds]
        box += [box[0] + job.width_l0 / ds, box[1] + job.height_l0 / ds]
        whole = [round(v) for v in box]
        if any(abs(v - w) > 1e-6 for v, w in zip(box, whole, strict=True)):
            return None
        if whole[2] - whole[0] != job.size or whole[3] - whole[1] != job.size:
            return None
        if whole[0] < 0 or whole[1] < 0 or whole[2] > width or whole[3] > height:
            return None
        boxes.append(tuple(whole))
    return boxes


def _as_image(rgba: np.ndarray):
    """A PIL RGBA image sharing ``rgba``'s memory (C-contiguous H x W x 4 uint8)."""
    from PIL import Image

    height, width = rgba.shape[:2]
    return Image.frombuffer("RGBA", (width, height), rgba, "raw", "RGBA", 0, 1)


def read_block(task: BlockTask) -> BlockResult:
    """Read a block's region once, then cut, score and encode each of its tiles.

    Tiles stay RGBA views of the block (opaque after compositing): the scores use the
    first three channels and the JPEG encoder skips the fourth, so no RGB copy is made.
    """
    state = _state()
    job = state.job
    if job is None:
        raise RuntimeError("worker has no tile job")
    direct_before = state.reader.direct_reads
    try:
        rgba, damaged_list = state.reader.read_region(
            job.level, task.read_x, task.read_y, task.read_width, task.read_height
        )
    except RegionReadError as error:
        return BlockResult(task.index, [], [], [], error=str(error))
    damaged = tuple(damaged_list)
    direct = state.reader.direct_reads > direct_before
    rgba = make_opaque(rgba, job.background)
    resampled = resample_tiles(rgba, job, task) if job.resample else None
    gray = None if job.resample else np.asarray(_as_image(rgba).convert("L"))
    scores: list[tuple[float, ...]] = []
    reasons: list[str | None] = []
    encoded: list[bytes | None] = []
    for k, (x, y) in enumerate(zip(task.xs, task.ys, strict=True)):
        if damaged and touches_damage(job, x, y, damaged):
            scores.append((math.nan,) * len(qc.SCORE_NAMES))
            reasons.append(READ_ERROR)
            encoded.append(None)
            continue
        if resampled is not None:
            tile = resampled[k]
            tile_gray = None
        else:
            ix, iy = _tile_origin(job, task, x, y, rgba.shape)
            tile = rgba[iy : iy + job.size, ix : ix + job.size]
            tile_gray = gray[iy : iy + job.size, ix : ix + job.size]  # type: ignore[index]
        tile_scores = qc.tile_scores(
            tile, job.tissue_mode, job.tissue_threshold, tile_gray, job.dark_level
        )
        reason = qc.rejection_reason(tile_scores, job.filters)
        scores.append(tile_scores.as_tuple())
        reasons.append(reason)
        if reason is None and job.image_format is not None:
            if job.stain_matrix is not None:
                tile = stain.apply_od_matrix(tile, np.asarray(job.stain_matrix))
            encoded.append(encode_tile(tile, job.image_format, job.quality))
        else:
            encoded.append(None)
    return BlockResult(task.index, scores, reasons, encoded, direct=direct, damaged=damaged)


def unread_block(task: BlockTask) -> BlockResult:
    """The result of a block whose pixels nobody needs (coordinates only, no pixel
    filter): every tile kept, no scores, nothing read or encoded."""
    n = len(task.xs)
    return BlockResult(task.index, [], [None] * n, [None] * n)


def read_chunk(task: ChunkTask) -> tuple[int, np.ndarray | str, tuple[DamagedTile, ...]]:
    """A resized RGBA piece (H x W x 4 uint8) of the slide, or the read error message,
    and the slide tiles of the piece that cannot be decoded (left transparent)."""
    from PIL import Image

    state = _state()
    try:
        rgba, damaged = state.reader.read_region(
            task.level, task.read_x, task.read_y, task.read_width, task.read_height
        )
    except RegionReadError as error:
        return task.index, str(error), ()
    # PIL resizes RGBA premultiplied, so unscanned (transparent) pixels do not darken
    # their neighbours; the box filter averages areas, the right thing for a reduction.
    resized = _as_image(rgba).resize(
        (task.out_width, task.out_height), Image.Resampling.BOX, box=task.box
    )
    return task.index, np.asarray(resized), tuple(damaged)
