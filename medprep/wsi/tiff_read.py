"""Direct reads of tiled TIFF-family slides: decode the stored tiles of a region, no OpenSlide.

OpenSlide's ``read_region`` paints every tile through a cache and cairo, which costs more
than decoding the tile itself. For slides whose levels are plain tiled TIFF directories
(Aperio SVS, generic tiled TIFF) this module reads the tiles of a region with ``os.pread``
(tile offsets from ``tifffile``), decodes them with ``imagecodecs`` (libjpeg-turbo,
OpenJPEG, zlib) and assembles the region in numpy, with OpenSlide's conventions: RGBA
uint8, alpha 255 where the level has pixels and 0 (all channels 0) outside it.

Only what is known to match OpenSlide is read here; everything else is refused when the
reader is built (``open_tiff_reader`` returns ``None`` and a reason) or per region
(``read_rgba`` returns ``None``), and the caller reads through OpenSlide instead:

- formats: OpenSlide vendors ``aperio`` and ``generic-tiff`` only (NDPI, Philips, Ventana,
  Leica and others have their own tile layouts, overlaps or sparse tiles);
- a level is read here when exactly one tiled directory has its dimensions, 8-bit RGB
  (3 samples, contiguous, no extra samples) and a known compression: JPEG (with the
  directory's JPEGTables; YCbCr or RGB colour space from PhotometricInterpretation, as
  OpenSlide decodes), Aperio JPEG 2000 (33003 YCbCr, 33005 RGB), none, LZW, Deflate
  (horizontal predictor or none); one tile of each level is decoded when the reader is
  built, to check its shape;
- when the reader is opened, the top-left tile of every level is read both ways and a
  level whose pixels differ from OpenSlide's (by more than 1) goes to OpenSlide;
- a region with a tile of 0 bytes (a missing tile, which OpenSlide paints transparent) or
  a tile that does not decode to the expected shape is refused.

Levels whose downsample is not an integer: the region starts at the whole level pixel
nearest ``x / downsample`` (what a tiler asks for); OpenSlide instead paints the tiles at
the fractional offset, so its pixels there are interpolated by up to half a level pixel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FAST_VENDORS = ("aperio", "generic-tiff")

JPEG = 7
APERIO_J2K_YCBCR = 33003
APERIO_J2K_RGB = 33005
NONE = 1
LZW = 5
DEFLATE = (8, 32946)
COMPRESSIONS = (JPEG, APERIO_J2K_YCBCR, APERIO_J2K_RGB, NONE, LZW, *DEFLATE)
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6

# Largest difference from OpenSlide's pixels accepted when a reader checks its levels (the
# rounding of two libjpeg-turbo builds).
MAX_DIFF = 1

# Read a run of tiles of one tile row with one pread when the bytes between them are at
# most this share of the bytes wanted (tiles are usually stored row by row).
MAX_GAP_SHARE = 0.25


class TileDecodeError(Exception):
    """A stored tile did not decode to what its directory promises."""


@dataclass(frozen=True)
class LevelLayout:
    """Where the tiles of one level are and how to decode them (plain data)."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # int64, row-major tile order
    counts: np.ndarray  # int64
    compression: int
    photometric: int
    predictor: int
    jpeg_tables: bytes | None

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) YCbCr to RGB, uint8, rounded as libjpeg does (for Aperio 33003)."""
    y = ycc[..., 0].astype(np.float32)
    cb = ycc[..., 1].astype(np.float32) - 128.0
    cr = ycc[..., 2].astype(np.float32) - 128.0
    rgb = np.empty(ycc.shape[:2] + (3,), dtype=np.float32)
    rgb[..., 0] = y + 1.402 * cr
    rgb[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    rgb[..., 2] = y + 1.772 * cb
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def decode_tile(data: bytes, layout: LevelLayout) -> np.ndarray:
    """One stored tile as a tile_height x tile_width x 3 or x 4 (RGBX) uint8 array."""
    import imagecodecs

    th, tw = layout.tile_height, layout.tile_width
    compression = layout.compression
    if compression == JPEG:
        colorspace = (
            imagecodecs.JPEG8.CS.YCbCr
            if layout.photometric == PHOTOMETRIC_YCBCR
            else imagecodecs.JPEG8.CS.RGB
        )
        tile = imagecodecs.jpeg8_decode(
            data,
            tables=layout.jpeg_tables,
            colorspace=colorspace,
            outcolorspace=imagecodecs.JPEG8.CS.EXT_RGBX,
        )
    elif compression in (APERIO_J2K_YCBCR, APERIO_J2K_RGB):
        tile = imagecodecs.jpeg2k_decode(data)
        if tile.ndim == 3 and tile.shape[2] == 3 and compression == APERIO_J2K_YCBCR:
            tile = ycbcr_to_rgb(tile)
    else:
        if compression == NONE:
            raw = data
        elif compression == LZW:
            raw = imagecodecs.lzw_decode(data)
        else:
            raw = imagecodecs.zlib_decode(data)
        if len(raw) < th * tw * 3:
            raise TileDecodeError(f"tile has {len(raw)} bytes, expected {th * tw * 3}")
        tile = np.frombuffer(raw, dtype=np.uint8, count=th * tw * 3).reshape(th, tw, 3)
        if layout.predictor == 2:
            tile = np.cumsum(tile, axis=1, dtype=np.uint8)
    if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[:2] != (th, tw):
        raise TileDecodeError(
            f"tile decoded to {tile.shape} {tile.dtype}, expected {th} x {tw} uint8"
        )
    if tile.shape[2] not in (3, 4):
        raise TileDecodeError(f"tile decoded to {tile.shape[2]} channels, expected 3")
    return tile


def _page_problem(page) -> str | None:
    """Why a tifffile page cannot be read directly, or None."""
    if not page.is_tiled or page.tiledepth != 1 or page.imagedepth != 1:
        return "not a 2-D tiled directory"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.extrasamples:
        return "not 8-bit RGB"
    if int(page.planarconfig) != 1:
        return "planar (separate) samples"
    if int(page.fillorder) != 1:
        return "unusual fill order"
    compression = int(page.compression)
    photometric = int(page.photometric)
    if compression not in COMPRESSIONS:
        return f"compression {compression}"
    if compression == JPEG:
        if photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
            return f"JPEG with photometric {photometric}"
    elif photometric != PHOTOMETRIC_RGB:
        return f"photometric {photometric} with compression {compression}"
    if compression in (NONE, LZW, *DEFLATE) and int(page.predictor) not in (1, 2):
        return f"predictor {int(page.predictor)}"
    return None


def _layout(page) -> LevelLayout:
    return LevelLayout(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        counts=np.asarray(page.databytecounts, dtype=np.int64),
        compression=int(page.compression),
        photometric=int(page.photometric),
        predictor=int(page.predictor),
        jpeg_tables=bytes(page.jpegtables) if page.jpegtables else None,
    )


def find_levels(
    path: str | os.PathLike,
    level_dimensions: tuple[tuple[int, int], ...],
    vendor: str,
) -> tuple[dict[int, LevelLayout], dict[int, str]]:
    """The layouts of the OpenSlide levels that can be read directly, and why the others
    cannot. A level is read directly when exactly one tiled directory has its size."""
    import tifffile

    layouts: dict[int, LevelLayout] = {}
    refused: dict[int, str] = {}
    if vendor not in FAST_VENDORS:
        return layouts, dict.fromkeys(range(len(level_dimensions)), f"vendor {vendor}")
    size = os.path.getsize(path)
    with tifffile.TiffFile(path) as tiff:
        pages = [p for p in tiff.pages if getattr(p, "is_tiled", False)]
        for level, (width, height) in enumerate(level_dimensions):
            matches = [p for p in pages if (p.imagewidth, p.imagelength) == (width, height)]
            if len(matches) != 1:
                refused[level] = f"{len(matches)} tiled directories of {width} x {height}"
                continue
            page = matches[0]
            problem = _page_problem(page)
            j2k = int(page.compression) in (APERIO_J2K_YCBCR, APERIO_J2K_RGB)
            if problem is None and j2k and vendor != "aperio":
                problem = "Aperio JPEG 2000 outside an Aperio slide"
            if problem is None:
                layout = _layout(page)
                expected = layout.tiles_across * layout.tiles_down
                if len(layout.offsets) != expected or len(layout.counts) != expected:
                    problem = f"{len(layout.offsets)} tile offsets, expected {expected}"
                elif int((layout.offsets + layout.counts).max(initial=0)) > size:
                    problem = "tiles past the end of the file"
            if problem is not None:
                refused[level] = problem
                continue
            layouts[level] = layout
    return layouts, refused


class TiffTileReader:
    """Region reads from the stored tiles of a slide's directly readable levels.

    One open file descriptor, read with ``os.pread`` (no shared file position), so a
    reader per worker process is all that is needed; not shareable across processes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layouts: dict[int, LevelLayout],
        level_downsamples: tuple[float, ...],
    ):
        self.path = os.fspath(path)
        self.layouts = layouts
        self.level_downsamples = level_downsamples
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TiffTileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def can_read(self, level: int) -> bool:
        return level in self.layouts

    def keep_levels_matching(self, reference: Callable[[int, int, int], np.ndarray]) -> dict:
        """Compare the top-left tile of every level with ``reference(level, width,
        height)`` (OpenSlide's read of the same region) and stop reading directly the
        levels where they differ by more than ``MAX_DIFF`` or whose first tile is not
        stored; returns the levels dropped and why."""
        dropped = {}
        for level, layout in list(self.layouts.items()):
            width = min(layout.tile_width, layout.width)
            height = min(layout.tile_height, layout.height)
            try:
                ours = self.read_rgba(level, 0, 0, width, height)
                if ours is None:
                    raise TileDecodeError("its first tile is not stored")
                theirs = reference(level, width, height)
                diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()
                if diff > MAX_DIFF:
                    raise TileDecodeError(f"first tile differs from OpenSlide's by {diff}")
            except Exception as error:  # noqa: BLE001 - the level goes to OpenSlide
                dropped[level] = str(error)
                del self.layouts[level]
        return dropped

    def _pread(self, offset: int, count: int) -> bytes:
        assert self._fd is not None, "reader is closed"
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise TileDecodeError(f"short read at byte {offset}: {len(data)} of {count}")
        return data

    def _tile_bytes(self, layout: LevelLayout, row: int, cols: range) -> list[bytes]:
        """The stored bytes of tiles ``cols`` of tile row ``row``, in as few reads as fit."""
        first = row * layout.tiles_across
        index = np.arange(first + cols.start, first + cols.stop)
        offsets = layout.offsets[index]
        counts = layout.counts[index]
        start = int(offsets.min())
        end = int((offsets + counts).max())
        wanted = int(counts.sum())
        if end - start <= wanted * (1 + MAX_GAP_SHARE):
            run = self._pread(start, end - start)
            return [
                run[o - start : o - start + c]
                for o, c in zip(offsets.tolist(), counts.tolist(), strict=True)
            ]
        return [self._pread(o, c) for o, c in zip(offsets.tolist(), counts.tolist(), strict=True)]

    def read_rgba(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """The region as OpenSlide's ``read_region`` gives it (H x W x 4 uint8, alpha 0
        outside the level), (x, y) in level-0 pixels and the size at ``level``; ``None``
        when the region has a missing tile (the caller reads it through OpenSlide).
        Raises ``TileDecodeError`` (or the decoder's error) on data that does not decode."""
        layout = self.layouts[level]
        ds = self.level_downsamples[level]
        lx = int(np.floor(x / ds + 0.5)) if level else int(x)
        ly = int(np.floor(y / ds + 0.5)) if level else int(y)
        # the part of the region inside the level
        x0, x1 = max(lx, 0), min(lx + width, layout.width)
        y0, y1 = max(ly, 0), min(ly + height, layout.height)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height)
        # every pixel of a region inside the level is written below; others start at 0
        out = (np.empty if inside else np.zeros)((height, width, 4), dtype=np.uint8)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = layout.tile_width, layout.tile_height
        cols = range(x0 // tw, (x1 - 1) // tw + 1)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            index = row * layout.tiles_across
            if (layout.counts[index + cols.start : index + cols.stop] <= 0).any():
                return None
            for col, data in zip(cols, self._tile_bytes(layout, row, cols), strict=True):
                tile = decode_tile(data, layout)
                # overlap of this tile with the region, in level pixels
                tx0, ty0 = col * tw, row * th
                ax0, ax1 = max(x0, tx0), min(x1, tx0 + tw)
                ay0, ay1 = max(y0, ty0), min(y1, ty0 + th)
                target = out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx]
                source = tile[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
                if source.shape[2] == 4:
                    target[...] = source
                else:
                    target[..., :3] = source
                    target[..., 3] = 255
        return out


def open_tiff_reader(
    path: str | os.PathLike,
    vendor: str,
    level_dimensions: tuple[tuple[int, int], ...],
    level_downsamples: tuple[float, ...],
) -> tuple[TiffTileReader | None, str]:
    """A direct reader for the levels of ``path`` that allow it, or ``None`` and why not.

    Each level kept has one of its stored tiles decoded here, so a file whose tiles the
    decoders do not understand falls back to OpenSlide as a whole.
    """
    try:
        layouts, refused = find_levels(path, level_dimensions, vendor)
    except Exception as error:  # noqa: BLE001 - anything tifffile cannot parse is OpenSlide's
        return None, f"tifffile cannot read the directories: {error}"
    if not layouts:
        reasons = "; ".join(f"level {k}: {v}" for k, v in sorted(refused.items()))
        return None, reasons or "no levels"
    reader = TiffTileReader(path, layouts, level_downsamples)
    for level, layout in list(layouts.items()):
        stored = np.flatnonzero(layout.counts > 0)
        try:
            if stored.size == 0:
                raise TileDecodeError("no stored tiles")
            tile_index = int(stored[0])
            data = reader._pread(int(layout.offsets[tile_index]), int(layout.counts[tile_index]))
            decode_tile(data, layout)
        except Exception as error:  # noqa: BLE001 - the level goes to OpenSlide
            refused[level] = f"test decode failed: {error}"
            del layouts[level]
    if not layouts:
        reader.close()
        reasons = "; ".join(f"level {k}: {v}" for k, v in sorted(refused.items()))
        return None, reasons
    note = ", ".join(f"level {k}: {v}" for k, v in sorted(refused.items()))
    return reader, (f"direct reads of levels {sorted(layouts)}" + (f" ({note})" if note else ""))


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _page_past_end(page, index: int, size: int) -> str | None:
    for tag in page.tags:
        end = int(tag.valueoffset) + int(tag.valuebytecount)
        if end > size:
            return f"tag {tag.code} of directory {index} ends at byte {end} but the file has {size} bytes"
    ends = [
        int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c
    ]
    if ends and max(ends) > size:
        return (
            f"the image data of directory {index} ends at byte {max(ends)} "
            f"but the file has {size} bytes"
        )
    return None


def tiff_damage(path: str | os.PathLike) -> str | None:
    """Where a TIFF file is cut short, from its directories as ``tifffile`` reads them:
    a directory, a tag value or image data past the end of the file; ``None`` if all of
    it is inside the file (or the header itself cannot be read)."""
    import re

    import tifffile

    size = os.path.getsize(path)
    collected = _Messages()
    tifffile_log = logging.getLogger("tifffile")
    tifffile_log.addHandler(collected)
    index = 0
    try:
        with tifffile.TiffFile(path) as tiff:
            for page in tiff.pages:  # walks the whole directory chain
                problem = _page_past_end(page, index, size)
                if problem:
                    return problem
                index += 1
            pages = index
    except tifffile.TiffFileError as error:
        return f"directory {index} is cut short or corrupted ({error})"
    except Exception:  # noqa: BLE001 - a header tifffile cannot read: no better message
        return None
    finally:
        tifffile_log.removeHandler(collected)
    for message in collected.messages:
        found = re.search(r"invalid (?:page offset|offset to first page) (\d+)", message)
        if found and int(found.group(1)) >= size:
            return f"directory {pages} is at byte {found.group(1)} but the file has {size} bytes"
        found = re.search(r"TiffTag (\d+) .*invalid value offset (\d+)", message)
        if found:
            return (
                f"the value of tag {found.group(1)} at byte {found.group(2)} does not fit "
                f"in the file ({size} bytes)"
            )
    return None
