"""Refuse decompression bombs before any pixel is read.

A TIFF directory can claim any size for almost no bytes: 200000 x 200000 pixels with no
tile data is a 300 KB file that costs minutes of reads returning nothing. Three checks,
each cheap (the directory only, read with ``tifffile``; no pixel is decoded):

- a level of the pyramid whose tiles (or strips) hold no data at all: every byte count
  or every offset is zero;
- a level whose stored bytes cannot back the pixels it declares at any sane compression
  ratio (decoded bytes of its non-empty tiles / their stored bytes), or a level 0 whose
  declared pixels the whole file cannot back;
- a level 0 above a pixel budget (any format, checked on the slide's dimensions).

Sparse files (Philips TIFF leaves tiles outside the scanned area empty) pass: empty tiles
count in neither term of the per-level ratio, and the whole-file check allows for 97%
empty area at ordinary JPEG ratios.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medprep.common.errors import InputError
from medprep.common.settings import FROM_SCHEMA, Settings, settings_section

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Levels below this many pixels are cheap to read whatever they claim; not checked.
MIN_CHECKED_PIXELS = 2**22
# Directories looked at (a pyramid has a dozen at most; a hostile chain can be endless).
MAX_DIRECTORIES = 64


@settings_section("wsi", "limits")
class Limits(Settings):
    """``wsi.limits``: what a slide may claim before it is refused unread.

    ``max_pixels``: level-0 pixel budget (the schema's default is a whole 75 x 50 mm glass
    slide at 0.25 um/px, 300000 x 200000); real scans of the tissue area are 1e9-2e10.
    ``max_compression_ratio``: decoded bytes per stored byte. Baseline JPEG cannot beat
    about 250:1 even on blank glass (a 16 x 16 colour block costs at least ~3 bytes);
    whole slides measure 10-20:1 (the fixtures: CMU 10:1, the fluorescence NDPI 17:1).
    The default leaves room for JPEG 2000 or zstd on empty areas and still refuses a
    bomb, which claims 1e5-1e6:1.
    """

    max_pixels: float = FROM_SCHEMA
    max_compression_ratio: float = FROM_SCHEMA


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's own log while peeking at a directory: a damaged file is reported
    once, by whoever refuses it, not also as tifffile ERROR lines."""
    logger = logging.getLogger("tifffile")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


def is_tiff(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


@dataclass(frozen=True)
class LevelData:
    """What a TIFF directory claims and what it stores (plain numbers)."""

    index: int
    width: int
    height: int
    chunk_bytes: int  # decoded bytes of one tile or strip
    offsets: np.ndarray
    counts: np.ndarray

    @property
    def pixels(self) -> int:
        return self.width * self.height


def payload_problem(level: LevelData, max_ratio: float) -> str | None:
    """Why ``level``'s stored data cannot be what it claims, or None."""
    if level.pixels < MIN_CHECKED_PIXELS:
        return None
    where = f"directory {level.index} ({level.width} x {level.height} pixels)"
    counts, offsets = level.counts, level.offsets
    if counts.size == 0 or not counts.any() or not offsets.any():
        return (
            f"{where} holds no image data (its {counts.size} byte counts or offsets are "
            "all 0): a damaged or hostile file (decompression bomb); refusing to read it"
        )
    used = counts > 0
    stored = int(counts[used].sum())
    ratio = used.sum() * level.chunk_bytes / max(stored, 1)
    if ratio > max_ratio:
        return (
            f"{where} stores {stored} bytes for {int(used.sum())} non-empty chunks that decode "
            f"to {int(used.sum()) * level.chunk_bytes:.3g} bytes (compression {ratio:.3g}:1, "
            f"above wsi.limits.max_compression_ratio = {max_ratio:g}): a damaged or hostile "
            "file (decompression bomb); refusing to read it"
        )
    return None


def file_problem(level0: LevelData, samples: int, file_size: int, max_ratio: float) -> str | None:
    """Why the file is too small for its level 0, or None (allows 97% empty area)."""
    if level0.pixels < MIN_CHECKED_PIXELS:
        return None
    declared = level0.pixels * samples
    ratio = declared / max(file_size, 1)
    if ratio > max_ratio * 30:
        return (
            f"level 0 claims {level0.width} x {level0.height} pixels ({declared:.3g} bytes) "
            f"but the file has {file_size} bytes (compression {ratio:.3g}:1): a damaged or "
            "hostile file (decompression bomb); refusing to read it"
        )
    return None


def read_levels(path: str | os.PathLike) -> tuple[list[LevelData], int]:
    """The directories of a TIFF (up to ``MAX_DIRECTORIES``) and level 0's samples/pixel."""
    import tifffile

    levels: list[LevelData] = []
    samples = 3
    with tifffile.TiffFile(path) as tiff:
        for index, page in enumerate(tiff.pages):
            if index >= MAX_DIRECTORIES:
                break
            if not isinstance(page, tifffile.TiffPage):
                continue
            bytes_per_pixel = page.samplesperpixel * max(page.bitspersample, 1) / 8
            if page.is_tiled:
                chunk = page.tilewidth * page.tilelength * max(page.tiledepth, 1)
            else:
                chunk = page.imagewidth * max(min(page.rowsperstrip, page.imagelength), 1)
            if index == 0:
                samples = page.samplesperpixel
            levels.append(
                LevelData(
                    index=index,
                    width=int(page.imagewidth),
                    height=int(page.imagelength),
                    chunk_bytes=int(chunk * bytes_per_pixel),
                    offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                    counts=np.asarray(page.databytecounts, dtype=np.int64),
                )
            )
    return levels, samples


def check_tiff(path: str | os.PathLike, limits: Limits) -> None:
    """Refuse a TIFF-family slide whose directory claims more than its bytes can hold."""
    path = Path(path)
    if not is_tiff(path):
        return
    try:
        with quiet_tifffile():
            levels, samples = read_levels(path)
    except Exception:  # noqa: BLE001 - unreadable directories are OpenSlide's to report
        return
    size = path.stat().st_size
    if not levels:
        return
    largest = max(levels, key=lambda level: level.pixels)
    check_pixels(largest.width, largest.height, limits, path)
    for level in levels:
        problem = payload_problem(level, limits.max_compression_ratio)
        if problem:
            raise InputError(problem, path=os.fspath(path))
    problem = file_problem(largest, samples, size, limits.max_compression_ratio)
    if problem:
        raise InputError(problem, path=os.fspath(path))


def check_pixels(
    width: int, height: int, limits: Limits, path: str | os.PathLike | None = None
) -> None:
    """Refuse a level 0 above the pixel budget."""
    if width * height > limits.max_pixels:
        raise InputError(
            f"slide claims {width} x {height} pixels at level 0 ({width * height:.3g}), above "
            f"the budget wsi.limits.max_pixels = {limits.max_pixels:.3g}; refusing to read it "
            "(raise the limit if the slide is real)",
            path=os.fspath(path) if path is not None else None,
        )
