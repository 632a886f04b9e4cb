"""3D patch grid over the lungs, lung fractions, extraction with air padding (plain arrays)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import cast

import numpy as np

# the columns of patches.parquet (written by medprep.ct.tile, indexed by medprep.data.index)
TABLE_COLUMNS = {
    "patch": "int64",
    "z0": "int64",
    "y0": "int64",
    "x0": "int64",
    "z1": "int64",
    "y1": "int64",
    "x1": "int64",
    "center_voxel_z": "float64",
    "center_voxel_y": "float64",
    "center_voxel_x": "float64",
    "center_lps_x_mm": "float64",
    "center_lps_y_mm": "float64",
    "center_lps_z_mm": "float64",
    "lung_fraction": "float64",
    "padded": "bool",
    # region labels (medprep.ct.labels); null / NaN / False without annotations
    "centred": "bool",  # the patch is centred on its annotation (not a grid patch)
    "annotation_id": "string",  # the centring or labelling annotation
    "distance_mm": "float64",  # patch centre to the annotation's centre
    "diameter_mm": "float64",  # the annotation's diameter (NaN: a point)
    "readers": "int64",  # LIDC readers who marked the nodule (0: from a CSV)
    "outside_scan": "bool",  # the annotation's centre lies outside the volume
    "outside_lung": "bool",  # ... or outside the lung mask
}


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3D mask, or None if there is none."""
    along_z = np.flatnonzero(mask.any(axis=(1, 2)))
    if along_z.size == 0:
        return None
    z0, z1 = int(along_z[0]), int(along_z[-1]) + 1
    # a 3D mask reduced along z is a 2D array (numpy's stubs also allow a scalar)
    plane = cast(np.ndarray, mask[z0:z1].any(axis=0))
    ys = np.flatnonzero(plane.any(axis=1))
    xs = np.flatnonzero(plane.any(axis=0))
    return (slice(z0, z1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))


# dtype of each patch value by ct.patches.materialise (none: patches are coordinates only)
MATERIALISED_DTYPES = {"hu": np.int16, "uint8": np.uint8, "normalised": np.float32}


def bytes_per_patch_voxel(materialise: str) -> int:
    """Bytes a materialised patch takes per voxel (0: not materialised)."""
    dtype = MATERIALISED_DTYPES.get(materialise)
    return 0 if dtype is None else np.dtype(dtype).itemsize


def patch_voxels(
    size_mm: float, stride_mm: float, spacing: Sequence[float]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Patch size and stride in voxels per axis of ``spacing`` (z, y, x), at least 1."""
    size = tuple(max(1, round(size_mm / s)) for s in spacing)
    stride = tuple(max(1, round(stride_mm / s)) for s in spacing)
    return size, stride


def _axis_starts(lo: int, hi: int, extent: int, size: int, stride: int) -> np.ndarray:
    """Starts of patches covering [lo, hi) on an axis of ``extent`` voxels, centred on it,
    shifted to stay inside the axis when the grid fits (else centred on the axis)."""
    length = hi - lo
    count = 1 if length <= size else math.ceil((length - size) / stride) + 1
    span = (count - 1) * stride + size
    first = lo - (span - length) // 2
    first = min(max(first, 0), extent - span) if span <= extent else (extent - span) // 2
    return first + np.arange(count) * stride


def candidate_starts(
    box: Sequence[slice], shape: Sequence[int], size: Sequence[int], stride: Sequence[int]
) -> np.ndarray:
    """(n, 3) start voxels (z, y, x) of a regular grid of patches covering the box."""
    axes = [
        _axis_starts(b.start, b.stop, n, p, s)
        for b, n, p, s in zip(box, shape, size, stride, strict=True)
    ]
    return np.array(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, 3)


def _clipped(start: np.ndarray, size: Sequence[int], shape: Sequence[int]):
    """The part of the patch inside the volume (``src``) and where it goes in the patch
    (``dst``); both empty for a patch wholly outside (a patch centred on an annotation
    beyond the scan), never a negative index that would wrap around."""
    src = []
    for a, p, n in zip(start, size, shape, strict=True):
        lo = min(max(int(a), 0), n)
        src.append(slice(lo, max(lo, min(int(a) + p, n))))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start, strict=True))
    return tuple(src), dst


def lung_fractions(mask: np.ndarray, starts: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Fraction of each patch's voxels inside the mask (outside the volume counts as not)."""
    total = float(np.prod(size))
    out = np.empty(len(starts))
    for i, start in enumerate(starts):
        src, _ = _clipped(start, size, mask.shape)
        out[i] = np.count_nonzero(mask[src]) / total
    return out


def is_padded(start: np.ndarray, size: Sequence[int], shape: Sequence[int]) -> bool:
    return bool(np.any(start < 0) or np.any(start + np.asarray(size) > np.asarray(shape)))


def extract(
    volume: np.ndarray, start: np.ndarray, size: Sequence[int], fill: float, out: np.ndarray
) -> None:
    """Copy the patch at ``start`` into ``out`` (shape ``size``), ``fill`` outside the volume."""
    src, dst = _clipped(start, size, volume.shape)
    if is_padded(start, size, volume.shape):
        out[...] = fill
    out[dst] = volume[src]
