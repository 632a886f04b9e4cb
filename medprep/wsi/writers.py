"""Tile encoders, pixel containers (tar shards, a folder of files, none) and the tile table.

Containers write into a folder the caller owns (a ``medprep.common.atomic.staged_dir``), one tile
at a time, in the order given: their output depends only on that order and the bytes.
Tar shards are deterministic (fixed mtime, owner and mode) and WebDataset-style: each tile
is one member ``<key>.<ext>`` whose key has no dots.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = {"jpeg": "jpg", "png": "png"}
PNG_LEVEL = 3  # zlib effort; PNG is lossless at every level


def encode_tile(pixels: np.ndarray, image_format: str, quality: int = 90) -> bytes:
    """Encode an H x W x 3 (RGB) or H x W x 4 (RGB + ignored 4th byte) uint8 tile as
    JPEG (libjpeg-turbo, YCbCr 4:2:0) or PNG (RGB). Rows may be strided (a view of a
    larger image); the 4-byte form saves a copy, with the same bytes as its RGB."""
    import imagecodecs

    if image_format == "jpeg":
        if pixels.shape[-1] == 4:
            return bytes(
                imagecodecs.jpeg8_encode(
                    pixels,
                    level=int(quality),
                    subsampling="420",
                    colorspace=imagecodecs.JPEG8.CS.EXT_RGBX,
                    outcolorspace=imagecodecs.JPEG8.CS.YCbCr,
                )
            )
        return bytes(imagecodecs.jpeg8_encode(pixels, level=int(quality), subsampling="420"))
    if image_format == "png":
        rgb = np.ascontiguousarray(pixels[..., :3])
        return bytes(imagecodecs.png_encode(rgb, level=PNG_LEVEL))
    raise ValueError(f"unknown tile format {image_format!r}")


def tile_key(sample: str, x: int, y: int) -> str:
    """A tile's file/member stem: sample and level-0 origin, no dots (WebDataset keys)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", sample)
    return f"{safe}_x{x:07d}_y{y:07d}"


class PixelContainer:
    """Where encoded tiles go. ``add`` returns (file relative to the tile folder, member).

    After each ``add``, ``last_offset`` is the byte offset of the tile's data in its file
    (inside a tar shard: after the member's header), or None when no pixels are stored.
    """

    files: list[str]
    last_offset: int | None = None

    def add(self, key: str, data: bytes, extension: str) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CoordinatesOnly(PixelContainer):
    """No pixels: the table holds coordinates for loaders that read the slide directly."""

    def __init__(self) -> None:
        self.files = []

    def add(self, key: str, data: bytes, extension: str) -> tuple[str | None, str | None]:
        return None, None


class FolderContainer(PixelContainer):
    """One image file per tile, ``<folder>/<key>.<ext>``."""

    def __init__(self, folder: str | os.PathLike, relative_to: str = "pixels") -> None:
        self.folder = Path(folder)
        self.relative_to = relative_to
        self.files = []

    def add(self, key: str, data: bytes, extension: str) -> tuple[str | None, str | None]:
        name = f"{key}.{extension}"
        (self.folder / name).write_bytes(data)
        self.files.append(name)
        self.last_offset = 0
        return f"{self.relative_to}/{name}", None


class TarShardContainer(PixelContainer):
    """Tar shards ``shard-000000.tar``, ... of at most ``max_members`` tiles each, written
    with :mod:`tarfile` (ustar, mode 0644, owner 0/0 without names, mtime 0)."""

    def __init__(
        self, folder: str | os.PathLike, max_members: int, relative_to: str = "pixels"
    ) -> None:
        if max_members < 1:
            raise ValueError("max_members must be at least 1")
        self.folder = Path(folder)
        self.max_members = max_members
        self.relative_to = relative_to
        self.files = []
        self._tar: tarfile.TarFile | None = None
        self._members = 0

    def _open_next(self) -> None:
        self.close()
        name = f"shard-{len(self.files):06d}.tar"
        # kept open across add() calls and closed in close()
        self._tar = tarfile.open(  # noqa: SIM115
            self.folder / name, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8"
        )
        self.files.append(name)
        self._members = 0

    def add(self, key: str, data: bytes, extension: str) -> tuple[str | None, str | None]:
        if self._tar is None or self._members >= self.max_members:
            self._open_next()
        assert self._tar is not None
        member = tarfile.TarInfo(f"{key}.{extension}")
        member.size, member.mtime, member.mode = len(data), 0, 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        # a ustar header is one block (longer names raise), so the data starts right after
        self.last_offset = self._tar.offset + tarfile.BLOCKSIZE
        self._tar.addfile(member, io.BytesIO(data))
        self._members += 1
        return f"{self.relative_to}/{self.files[-1]}", member.name

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()  # two zero blocks, then padding to a whole record
            self._tar = None


def make_container(
    container: str, folder: str | os.PathLike | None, shard_max_tiles: int
) -> PixelContainer:
    if container == "coords":
        return CoordinatesOnly()
    if folder is None:
        raise ValueError(f"container {container!r} needs a folder")
    if container == "folder":
        return FolderContainer(folder)
    if container == "tar":
        return TarShardContainer(folder, shard_max_tiles)
    raise ValueError(f"unknown container {container!r}")


TABLE_COLUMNS: dict[str, str] = {
    "tile_id": "int64",
    "sample": "string",
    "x": "int64",  # level-0 origin
    "y": "int64",
    "width_l0": "float64",  # level-0 extent
    "height_l0": "float64",
    "level": "int32",  # pyramid level read
    "target_mpp": "float64",  # the resolution asked for
    "mpp": "float64",  # the resolution of the tile pixels (= target_mpp unless snapped)
    "size": "int32",  # output pixels per side
    "mask_coverage": "float64",
    "tissue_fraction": "float64",
    "background_fraction": "float64",
    "white_fraction": "float64",
    "black_fraction": "float64",
    "blur": "float64",
    "sharpness": "float64",  # blur normalised by gradient energy (comparable across slides)
    "pen_fraction": "float64",  # of the tile under marker ink (mask-resolution detector)
    "fold_fraction": "float64",  # under a tissue fold (dark and highly saturated)
    "gap_fraction": "float64",  # glass inside the tissue outline (cracks, tears, lumens)
    "file": "string",  # relative to the folder of the table; null for coords
    "member": "string",  # tar member; null unless tar
    "offset": "int64",  # byte offset of the image data in `file` (tar: after the header)
    "nbytes": "int64",  # bytes of the image data; null for coords
}


# Region label columns (medprep.wsi.labels), written after the others when the sample has
# an annotation file: the label, its share of the tile and, optionally, every class's share.
LABEL_COLUMNS: dict[str, str] = {"label": "string", "label_fraction": "float64"}
CLASS_FRACTION_PREFIX = "label_fraction_"


def _label_columns(columns: Mapping[str, Any]) -> dict[str, str]:
    found = {name: kind for name, kind in LABEL_COLUMNS.items() if name in columns}
    found.update((name, "float64") for name in columns if name.startswith(CLASS_FRACTION_PREFIX))
    return found


def write_table(columns: Mapping[str, Sequence[Any] | np.ndarray], path: str | os.PathLike) -> None:
    """Write the tile table (Parquet, or CSV if ``path`` ends in .csv) atomically: the
    ``TABLE_COLUMNS``, then the label columns that ``columns`` has."""
    from medprep.common.atomic import atomic_path
    from medprep.common.tables import arrow_table

    missing = set(TABLE_COLUMNS) - set(columns)
    if missing:
        raise ValueError(f"tile table lacks columns {sorted(missing)}")
    table = arrow_table(columns, {**TABLE_COLUMNS, **_label_columns(columns)})
    with atomic_path(path) as tmp:
        if str(path).endswith(".csv"):
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp, compression="zstd")


def read_table(path: str | os.PathLike):
    """The tile table as a pandas DataFrame."""
    if str(path).endswith(".csv"):
        import pandas as pd

        return pd.read_csv(path)
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()
