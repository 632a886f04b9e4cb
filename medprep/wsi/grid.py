"""The tile grid at the target resolution, its tissue coverage, and blocks of neighbours.

The grid is separable: every tile of column ``c`` starts at level-0 x ``xs[c]`` and every
tile of row ``r`` at level-0 y ``ys[r]``. Origins are whole level-0 pixels (what a loader
passes to ``read_region``); a tile covers ``width_l0`` x ``height_l0`` level-0 pixels,
which is ``size`` times the scale (level-0 pixels per output pixel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    xs: np.ndarray  # int64 level-0 x of each column
    ys: np.ndarray  # int64 level-0 y of each row
    width_l0: float  # level-0 extent of a tile
    height_l0: float
    size: int  # output pixels per side
    step: int  # output pixels between neighbouring tiles

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)


def make_grid(
    width: int, height: int, scale_x: float, scale_y: float, size: int, step: int
) -> Grid:
    """All tiles of ``size`` output pixels, ``step`` apart, lying wholly inside the slide.

    ``scale_*`` are level-0 pixels per output pixel; ``width``/``height`` the level-0 size.
    """
    if size < 1 or step < 1:
        raise ValueError("size and step must be positive")
    tile_w = size * scale_x
    tile_h = size * scale_y

    def origins(extent: int, scale: float, tile: float) -> np.ndarray:
        count = math.floor((extent - tile) / (step * scale) + 1e-9) + 1 if extent >= tile else 0
        starts = np.round(np.arange(max(count, 0)) * step * scale).astype(np.int64)
        # rounding may push the last tile a fraction of a pixel past the edge
        return starts[starts + tile <= extent + 1e-6]

    return Grid(
        origins(width, scale_x, tile_w),
        origins(height, scale_y, tile_h),
        tile_w,
        tile_h,
        size,
        step,
    )


def _interval_weights(
    starts: np.ndarray, length: float, cells: int
) -> list[tuple[int, np.ndarray]]:
    """For each interval [s, s + length) in cell units: the first cell and per-cell overlaps."""
    result = []
    for start in starts:
        end = start + length
        first = max(int(math.floor(start)), 0)
        last = min(int(math.ceil(end)), cells)
        if last <= first:
            result.append((first, np.zeros(0)))
            continue
        edges = np.arange(first, last + 1, dtype=np.float64)
        low = np.maximum(edges[:-1], start)
        high = np.minimum(edges[1:], end)
        result.append((first, np.clip(high - low, 0, None)))
    return result


def mask_coverage(
    mask: np.ndarray, grid: Grid, mask_downsample_x: float, mask_downsample_y: float
) -> np.ndarray:
    """Fraction of each tile's area covered by ``mask``, shape ``grid.shape`` (rows, cols).

    ``mask`` pixel (i, j) covers level-0 ``[j*dx, (j+1)*dx) x [i*dy, (i+1)*dy)``. Partial
    mask pixels at tile edges count by their overlapping area, so coverage is exact for the
    piecewise-constant mask; memory stays at one mask row band at a time.
    """
    rows, cols = grid.shape
    coverage = np.zeros((rows, cols), dtype=np.float64)
    if rows == 0 or cols == 0:
        return coverage
    height, width = mask.shape
    x0 = grid.xs / mask_downsample_x
    x1 = (grid.xs + grid.width_l0) / mask_downsample_x
    tile_area = (grid.width_l0 / mask_downsample_x) * (grid.height_l0 / mask_downsample_y)
    row_weights = _interval_weights(
        grid.ys / mask_downsample_y, grid.height_l0 / mask_downsample_y, height
    )
    x0 = np.clip(x0, 0, width)
    x1 = np.clip(x1, 0, width)
    positions = np.arange(width + 1, dtype=np.float64)
    for r, (first, weights) in enumerate(row_weights):
        if weights.size == 0:
            continue
        band = mask[first : first + weights.size].astype(np.float32)
        profile = weights.astype(np.float32) @ band  # mask area per mask column, this row band
        cumulative = np.concatenate(([0.0], np.cumsum(profile, dtype=np.float64)))
        # the integral of a piecewise-constant profile is the linear interpolation of its
        # cumulative sums at the (fractional) interval ends
        area = np.interp(x1, positions, cumulative) - np.interp(x0, positions, cumulative)
        coverage[r] = area / tile_area
    return np.clip(coverage, 0.0, 1.0)


@dataclass(frozen=True)
class Block:
    """Neighbouring tiles read as one region: a full rectangle of selected tiles, given
    as the grid indices of its tiles in row-major order."""

    rows: np.ndarray
    cols: np.ndarray


def _rectangles(cell: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Cover the True cells of a small bool array with rectangles (row0, row1, col0, col1).

    Runs of consecutive True cells in each row are merged downwards while the run below
    has exactly the same columns; every True cell is in one rectangle, no False cell in any.
    """
    open_rects: dict[tuple[int, int], int] = {}  # (col0, col1) -> first row
    done = []
    for r in range(cell.shape[0] + 1):
        runs = set()
        if r < cell.shape[0]:
            row = np.concatenate(([False], cell[r], [False]))
            edges = np.flatnonzero(row[1:] != row[:-1])
            runs = {(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)}
        for span in list(open_rects):
            if span not in runs:
                done.append((open_rects.pop(span), r, *span))
        for span in runs:
            open_rects.setdefault(span, r)
    return sorted(done)


def make_blocks(selected: np.ndarray, block_tiles: int) -> list[Block]:
    """Group the selected tiles (bool array of ``grid.shape``) into blocks read at once.

    The grid is cut into cells of ``block_tiles`` x ``block_tiles`` tiles (row-major);
    the selected tiles of a cell are covered by as few full rectangles as a row-run merge
    finds (one for a cell full of tissue), so a read never covers unselected tiles. The
    order depends only on the selection and ``block_tiles``, never on the worker count.
    """
    if block_tiles < 1:
        raise ValueError("block_tiles must be at least 1")
    blocks = []
    rows_total, cols_total = selected.shape
    for r0 in range(0, rows_total, block_tiles):
        band = selected[r0 : r0 + block_tiles]
        if not band.any():
            continue
        for c0 in range(0, cols_total, block_tiles):
            cell = band[:, c0 : c0 + block_tiles]
            if not cell.any():
                continue
            for top, bottom, left, right in _rectangles(cell):
                rr, cc = np.meshgrid(
                    np.arange(r0 + top, r0 + bottom),
                    np.arange(c0 + left, c0 + right),
                    indexing="ij",
                )
                blocks.append(Block(rr.ravel(), cc.ravel()))
    return blocks


def block_side_for_read_limit(
    block_tiles: int, size: int, step: int, pixels_per_output: float, max_read_side: int
) -> int:
    """The largest block side (in tiles, at most ``block_tiles``) whose read stays within
    ``max_read_side`` pixels at the level read (``pixels_per_output`` level pixels per
    output pixel), so a worker's buffer stays bounded whatever the settings."""
    side = block_tiles
    while side > 1 and ((side - 1) * step + size) * pixels_per_output > max_read_side:
        side -= 1
    return side
