"""Resample a stack of slices to a regular grid, separably, from the real slice positions.

Each input slice is resampled in-plane onto the common output grid (which also removes a
gantry-tilt shear: every slice is shifted by its own in-plane offset), then output slices are
interpolated along the normal between the input slices at their measured positions, so
uneven spacing and gaps are handled exactly for nearest and linear interpolation. Orders:
0 nearest, 1 linear, 3 cubic convolution (Keys, a = -0.5; along an unevenly spaced normal it
works on the slice index, an approximation). Cubic results are clipped to the input range.

Coordinates are in the slice frame: x along the row direction, y along the column direction,
z along the normal, all in mm from the first slice's first pixel.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from medprep.common.parallel import thread_map

ORDERS = (0, 1, 3)
OUTPUT_CHUNK = 16  # output slices computed together (threads share the work within one)
KEYS_A = -0.5


@dataclasses.dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # z, y, x
    spacing: tuple[float, float, float]  # z, y, x (mm)
    start: tuple[float, float, float]  # slice-frame coordinates (mm) of voxel (0, 0, 0)


def plan_grid(
    positions: np.ndarray,
    offsets: np.ndarray,
    in_shape: tuple[int, int],
    pixel_spacing: tuple[float, float],
    spacing: tuple[float, float, float],
) -> Grid:
    """The output grid covering every slice (the union of the sheared slices' extents)."""
    rows, cols = in_shape
    z_extent = float(positions[-1] - positions[0])
    y_lo = float(offsets[:, 1].min())
    y_hi = float(offsets[:, 1].max()) + (rows - 1) * pixel_spacing[0]
    x_lo = float(offsets[:, 0].min())
    x_hi = float(offsets[:, 0].max()) + (cols - 1) * pixel_spacing[1]

    def count(extent: float, step: float) -> int:
        return int(np.floor(extent / step + 1e-6)) + 1

    shape = (
        count(z_extent, spacing[0]),
        count(y_hi - y_lo, spacing[1]),
        count(x_hi - x_lo, spacing[2]),
    )
    return Grid(shape, (float(spacing[0]), float(spacing[1]), float(spacing[2])), (0.0, y_lo, x_lo))


def axis_taps(
    coords: np.ndarray, n_in: int, order: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input indices (taps, n_out), weights (taps, n_out) and validity (n_out) of fractional
    input coordinates ``coords`` on an axis of ``n_in`` samples. Outside half a sample
    beyond either end an output is invalid (to be filled)."""
    if order not in ORDERS:
        raise ValueError(f"interpolation order must be one of {ORDERS}, got {order}")
    coords = np.asarray(coords, dtype=np.float64)
    valid = (coords >= -0.5) & (coords <= n_in - 0.5)
    f = np.clip(coords, 0.0, n_in - 1.0)
    if order == 0 or n_in == 1:
        index = np.clip(np.floor(f + 0.5), 0, n_in - 1).astype(np.intp)[None]
        return index, np.ones(index.shape, dtype=np.float32), valid
    base = np.floor(f)
    if order == 1:
        base = np.minimum(base, n_in - 2)
        t = f - base
        index = np.stack([base, base + 1]).astype(np.intp)
        weight = np.stack([1.0 - t, t]).astype(np.float32)
        return index, weight, valid
    t = f - base
    distances = np.stack([1.0 + t, t, 1.0 - t, 2.0 - t])
    weight = _keys(distances)
    index = np.clip(base[None] + np.arange(-1, 3)[:, None], 0, n_in - 1).astype(np.intp)
    return index, weight.astype(np.float32), valid


def _keys(x: np.ndarray) -> np.ndarray:
    a = KEYS_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def tap_matrix(taps: tuple[np.ndarray, np.ndarray, np.ndarray], n_in: int):
    """The taps of one axis as a sparse (n_out, n_in) float32 matrix (weights of taps that
    clipped onto the same input sample are summed)."""
    from scipy import sparse

    index, weight, _ = taps
    n_taps, n_out = index.shape
    rows = np.broadcast_to(np.arange(n_out), (n_taps, n_out)).ravel()
    matrix = sparse.csr_matrix(
        (weight.ravel().astype(np.float32), (rows, index.ravel())),
        shape=(n_out, n_in),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    return matrix


_BUFFERS = threading.local()


def _as_float32(plane: np.ndarray) -> np.ndarray:
    """``plane`` as float32 in this thread's reused buffer: a fresh 1 MB array per slice
    is served by its own mapping (``steps.fixed_mmap_threshold``), page faults and all."""
    if plane.dtype == np.float32:
        return plane
    buffer = getattr(_BUFFERS, "plane", None)
    if buffer is None or buffer.shape != plane.shape:
        buffer = _BUFFERS.plane = np.empty(plane.shape, dtype=np.float32)
    np.copyto(buffer, plane)
    return buffer


def _resample_plane(plane, ymatrix, xmatrix, yvalid, xvalid, fill, out) -> None:
    # two sparse products (a few taps per output sample): rows, then columns
    rows = ymatrix @ _as_float32(plane)  # (ny, cols)
    out[...] = (xmatrix @ np.ascontiguousarray(rows.T)).T  # (nx, ny) -> (ny, nx)
    if not yvalid.all():
        out[~yvalid, :] = fill
    if not xvalid.all():
        out[:, ~xvalid] = fill


def z_coordinates(positions: np.ndarray, grid: Grid, order: int) -> np.ndarray:
    """Fractional slice index of each output slice, from the real slice positions."""
    rel = positions - positions[0]
    z = grid.start[0] + np.arange(grid.shape[0]) * grid.spacing[0]
    if len(positions) == 1:
        return np.zeros(len(z))
    if order == 0:  # nearest in mm, not in index
        right = np.clip(np.searchsorted(rel, z), 1, len(rel) - 1)
        nearer_left = (z - rel[right - 1]) <= (rel[right] - z)
        return np.where(nearer_left, right - 1, right).astype(np.float64)
    return np.interp(z, rel, np.arange(len(rel), dtype=np.float64))


def resample_stack(
    volume: np.ndarray,
    positions: np.ndarray,
    offsets: np.ndarray,
    pixel_spacing: tuple[float, float],
    spacing: tuple[float, float, float],
    *,
    order: int = 1,
    fill: float = -1000.0,
    threads: int = 1,
) -> tuple[np.ndarray, Grid]:
    """Resample ``volume`` (slices, rows, cols) to ``spacing`` (z, y, x mm); int16 out.

    ``positions``: each slice's position along the normal (increasing, mm); ``offsets``:
    each slice's first-pixel offset (x, y mm) in the plane relative to the first slice.
    Outputs outside a slice's extent (only with shear) get ``fill``.
    """
    n_slices, rows, cols = volume.shape
    positions = np.asarray(positions, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.float64).reshape(n_slices, 2)
    grid = plan_grid(positions, offsets, (rows, cols), pixel_spacing, spacing)
    nz, ny, nx = grid.shape
    y_out = grid.start[1] + np.arange(ny) * grid.spacing[1]
    x_out = grid.start[2] + np.arange(nx) * grid.spacing[2]
    shared = not np.any(offsets)

    def plane_operators(k: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        # the two sparse (scipy) matrices, then the rows and columns that are valid
        yt = axis_taps((y_out - offsets[k, 1]) / pixel_spacing[0], rows, order)
        xt = axis_taps((x_out - offsets[k, 0]) / pixel_spacing[1], cols, order)
        return tap_matrix(yt, rows), tap_matrix(xt, cols), yt[2], xt[2]

    if shared:
        operators = plane_operators(0)

    def in_plane(k: int) -> tuple[int, np.ndarray]:
        plane = np.empty((ny, nx), dtype=np.float32)
        ops = operators if shared else plane_operators(k)
        _resample_plane(volume[k], *ops, np.float32(fill), plane)
        return k, plane

    zi, zw, _ = axis_taps(z_coordinates(positions, grid, order), n_slices, order)
    if order == 0:
        zi, zw = zi[:1], zw[:1]
    low: float | None = None
    high: float | None = None
    if order == 3:
        low, high = float(volume.min()), float(volume.max())
        if not shared:
            low = min(low, fill)
    out = np.empty(grid.shape, dtype=np.int16)
    # Output slices in chunks; only the in-plane results the chunk needs are kept (slice
    # indices only grow along the output), so memory holds a few planes, not the stack.
    planes: dict[int, np.ndarray] = {}

    def along_normal(m: int) -> None:
        acc = planes[zi[0, m]] * zw[0, m]
        for t in range(1, zi.shape[0]):
            if zw[t, m] != 0:
                acc += planes[zi[t, m]] * zw[t, m]
        np.rint(acc, out=acc)
        if low is not None:
            np.clip(acc, low, high, out=acc)
        out[m] = acc

    for m0 in range(0, nz, OUTPUT_CHUNK):
        chunk = range(m0, min(m0 + OUTPUT_CHUNK, nz))
        needed = {int(zi[0, m]) for m in chunk}
        needed |= {int(zi[t, m]) for m in chunk for t in range(1, zi.shape[0]) if zw[t, m] != 0}
        for k in [k for k in planes if k < min(needed)]:
            del planes[k]
        missing = sorted(k for k in needed if k not in planes)
        for k, plane in thread_map(in_plane, missing, threads):
            planes[k] = plane
        for _ in thread_map(along_normal, chunk, threads):
            pass
    return out, grid
