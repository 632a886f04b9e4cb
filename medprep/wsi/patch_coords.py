"""Patch coordinates in the HDF5 layout of TRIDENT and CLAM (``tiles/{sample}_patches.h5``).

One dataset, ``coords``: int64, N x 2, the level-0 top-left (x, y) of each kept tile, in
the order of the tile table. Its attributes:

- TRIDENT's (``coords_to_h5``): ``patch_size`` (tile pixels per side),
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap`` (tile pixels shared by neighbours: size - stride), ``name`` (the sample),
  ``level0_width``, ``level0_height``;
- CLAM's: ``patch_level`` (the pyramid level the tiles were read from) and
  ``downsample`` (that level's level-0 pixels per pixel, x and y);
- medprep's: ``mpp`` (the tiles' real microns per pixel) and ``level0_mpp``.

TRIDENT reads a level-0 box of ``round(patch_size * level0_magnification /
target_magnification)`` pixels at each coordinate and resizes it to ``patch_size``; it
never uses the slide's own magnification for that. So ``target_magnification`` is the
magnification asked for (``10 / target_mpp``: 20 for 0.5 um/px) and
``level0_magnification`` is that times the tiles' scale (level-0 pixels per tile pixel):
the box is the tile's own footprint (``width_l0``), also where 0.2527 um/px is not
exactly 40x or a scan at 0.2270 um/px is resampled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# magnification of 1 um/px by the usual convention (10x objective = 1 um/px)
MICRONS_AT_1X = 10.0


def patch_attributes(
    *,
    name: str,
    size: int,
    step: int,
    scale_x: float,
    target_mpp: float,
    tile_mpp: float,
    level0_mpp: float,
    dimensions: tuple[int, int],
    level: int,
    level_downsample: float,
) -> dict[str, Any]:
    """The attributes of ``coords`` for tiles of ``size`` pixels, ``step`` apart, each
    ``size * scale_x`` level-0 pixels wide, read from pyramid ``level``."""
    target_magnification = MICRONS_AT_1X / target_mpp
    return {
        "patch_size": int(size),
        "patch_size_level0": int(round(size * scale_x)),
        "level0_magnification": float(target_magnification * scale_x),
        "target_magnification": float(target_magnification),
        "overlap": int(size - step),
        "name": str(name),
        "level0_width": int(dimensions[0]),
        "level0_height": int(dimensions[1]),
        "patch_level": int(level),
        "downsample": np.array([level_downsample, level_downsample], dtype=np.float64),
        "mpp": float(tile_mpp),
        "level0_mpp": float(level0_mpp),
    }


def level0_box(attributes: dict[str, Any]) -> int:
    """The level-0 side TRIDENT's patcher reads at each coordinate (``WSIPatcher``:
    ``round(patch_size * src_mag / dst_mag)`` with the file's magnifications)."""
    ratio = attributes["level0_magnification"] / attributes["target_magnification"]
    return round(attributes["patch_size"] * ratio)


def write_patch_coords(
    path: str | os.PathLike,
    x: np.ndarray | Sequence[int],
    y: np.ndarray | Sequence[int],
    attributes: dict[str, Any],
) -> None:
    """Write ``coords`` (x, y columns) with ``attributes``, atomically."""
    import h5py

    from medprep.common.atomic import atomic_path

    coords = np.column_stack(
        [np.asarray(x, dtype=np.int64).reshape(-1), np.asarray(y, dtype=np.int64).reshape(-1)]
    )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dataset = f.create_dataset("coords", data=coords, dtype=np.int64)
        for key, value in attributes.items():
            dataset.attrs[key] = value


def read_patch_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``coords`` and its attributes, as TRIDENT's ``read_coords`` returns them."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["coords"][:], dict(f["coords"].attrs)
