"""Direct reads of tiled TIFF-family slides: decode the stored tiles of a region, no OpenSlide.

OpenSlide's ``read_region`` paints every tile through a cache and cairo, which costs more
than decoding the tile itself. For slides whose levels are plain tiled TIFF directories
(Aperio SVS, generic tiled TIFF) this module reads the tiles of a region with ``os.pread``
(tile offsets from ``tifffile``), decodes them with ``imagecodecs`` (libjpeg-turbo,
OpenJPEG, zlib) and assembles the region in numpy, with OpenSlide's conventions: RGBA
uint8, alpha 255 where the level has pixels and 0 (all channels 0) outside it.

Decoding is at least as strict as OpenSlide's. OpenSlide turns every libjpeg warning
(corrupt data, premature end of a data segment, a bad Huffman code) into an error of the
tile; ``imagecodecs.jpeg8_decode`` drops the warnings and returns whatever libjpeg-turbo
made of the damaged data, so JPEG tiles are decoded with ``simplejpeg`` (libjpeg-turbo's
TurboJPEG API with warnings as errors). A tile whose header claims another size than the
level's tiles is damaged before anything is decoded (no buffer follows a damaged claim),
JPEG 2000 tiles need OpenJPEG's own size and 3 components, and Deflate/LZW tiles are
decoded into a buffer of the tile's size at most. A stored tile that does not decode is a
``DamagedTile`` (level, column, row, cause): ``read_region`` leaves its pixels
transparent and lists it, and ``read_rgba`` raises ``DamagedTileError`` naming it.

Only what is known to match OpenSlide is read here; everything else is refused when the
reader is built (``open_tiff_reader`` returns ``None`` and a reason) or per region
(``read_region`` returns ``None``), and the caller reads through OpenSlide instead:

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
- a region with a tile of 0 bytes (a missing tile, which OpenSlide paints transparent),
  or a JPEG tile whose own markers would change the colour space libjpeg infers, is
  refused (``None``).

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


class NotDirect(Exception):
    """A stored tile that decodes, but not in a way known to match OpenSlide here."""


@dataclass(frozen=True)
class DamagedTile:
    """A tile of a slide level that cannot be decoded: which one, where, and why.

    ``column``, ``row``: its place in the level's tile grid; ``x``, ``y``: its level-0
    origin; ``width``, ``height``: its size at the level; ``downsample``: the level's.
    ``kind`` is ``"tile"`` for a tile of the level's grid, ``"region"`` for a piece of a
    region whose tile grid is not known (OpenSlide formats without tile properties).
    """

    level: int
    column: int
    row: int
    x: int
    y: int
    width: int
    height: int
    downsample: float
    cause: str
    kind: str = "tile"

    @property
    def key(self) -> tuple[int, str, int, int]:
        return (self.level, self.kind, self.column, self.row)

    def box_l0(self) -> tuple[float, float, float, float]:
        """Left, top, right, bottom in level-0 pixels."""
        return (
            self.x,
            self.y,
            self.x + self.width * self.downsample,
            self.y + self.height * self.downsample,
        )

    def describe(self) -> str:
        where = (
            f"level {self.level} {self.kind} at column {self.column}, row {self.row} "
            f"(level-0 x={self.x}, y={self.y}; {self.width} x {self.height} pixels)"
        )
        return f"{where} cannot be decoded: {self.cause}"


class DamagedTileError(TileDecodeError):
    """A region read met tiles that cannot be decoded; the message names them."""

    def __init__(self, damaged: list[DamagedTile] | tuple[DamagedTile, ...]):
        self.damaged = tuple(damaged)
        more = len(self.damaged) - 1
        super().__init__(
            self.damaged[0].describe() + (f" (and {more} more damaged tile(s))" if more else "")
        )


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
    # JPEG: SOI, the Adobe marker of RGB tiles and the tables (``jpeg_prefix``)
    jpeg_prefix: bytes = b""

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


# An Adobe APP14 segment with transform 0: libjpeg then reads 3 components as RGB (what
# an RGB tile of a TIFF is), without it as YCbCr unless the component ids are 'R', 'G', 'B'.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
SOI = b"\xff\xd8"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class JpegMarkers:
    """What the segments before a JPEG scan say about colour and size (plain data)."""

    jfif: bool = False
    adobe_transform: int | None = None
    components: tuple[int, ...] = ()
    width: int | None = None
    height: int | None = None
    bits: int | None = None


def jpeg_markers(data: bytes) -> JpegMarkers:
    """The JFIF and Adobe markers and the frame header of a JPEG stream (or a JPEGTables
    stream), read up to its first scan; a malformed header ends the reading (the decoder
    then names what is wrong)."""
    jfif, adobe = False, None
    components: tuple[int, ...] = ()
    width = height = bits = None
    pos = 2 if data[:2] == SOI else 0
    end = len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0xD9, 0xDA) or 0xD0 <= marker <= 0xD7:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            break
        if marker == 0xE0 and body[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        elif marker in _SOF_MARKERS and len(body) >= 6:
            bits = body[0]
            height = int.from_bytes(body[1:3], "big")
            width = int.from_bytes(body[3:5], "big")
            count = body[5]
            components = tuple(body[6 + 3 * i] for i in range(count) if 6 + 3 * i < len(body))
        pos += 2 + length
    return JpegMarkers(jfif, adobe, components, width, height, bits)


def jpeg_prefix(tables: bytes | None, photometric: int) -> bytes:
    """What goes before a tile's own segments to make a whole JPEG stream: SOI, the
    Adobe marker of RGB tiles, and the level's JPEGTables without their SOI and EOI."""
    body = b""
    if tables:
        body = tables[2:] if tables[:2] == SOI else tables
        if body[-2:] == b"\xff\xd9":
            body = body[:-2]
    return SOI + (ADOBE_RGB if photometric == PHOTOMETRIC_RGB else b"") + body


def _check_jpeg_tile(data: bytes, layout: LevelLayout) -> None:
    """Refuse a JPEG tile whose header claims another size (damaged, decoded by no one),
    or whose own markers would make libjpeg infer another colour space (``NotDirect``)."""
    if data[:2] != SOI:
        raise TileDecodeError(f"not a JPEG stream (starts with {data[:2].hex() or 'nothing'})")
    markers = jpeg_markers(data)
    if markers.width is not None and (markers.width, markers.height) != (
        layout.tile_width,
        layout.tile_height,
    ):
        raise TileDecodeError(
            f"JPEG header claims {markers.width} x {markers.height} pixels, the level's "
            f"tiles are {layout.tile_width} x {layout.tile_height}"
        )
    if markers.bits not in (None, 8) or len(markers.components) not in (0, 3):
        raise TileDecodeError(
            f"JPEG header claims {len(markers.components)} components of {markers.bits} "
            "bits, the level is 8-bit RGB"
        )
    if inferred_colour_space(markers, layout.photometric) != layout.photometric:
        raise NotDirect(
            "the tile's own JFIF or Adobe marker or component ids set another colour space"
        )


def inferred_colour_space(markers: JpegMarkers, photometric: int) -> int | None:
    """The colour space libjpeg infers for a 3-component tile (``PHOTOMETRIC_RGB`` or
    ``PHOTOMETRIC_YCBCR``) after the prefix of ``jpeg_prefix``: a JFIF marker means
    YCbCr; else the last Adobe marker's transform (0: RGB, 1: YCbCr; RGB tiles get one
    with 0 in the prefix); else component ids 'R', 'G', 'B' mean RGB, any others YCbCr.
    ``None`` for an Adobe transform libjpeg warns about."""
    adobe = markers.adobe_transform
    if adobe is None and photometric == PHOTOMETRIC_RGB:
        adobe = 0
    if markers.jfif:
        return PHOTOMETRIC_YCBCR
    if adobe is not None:
        return {0: PHOTOMETRIC_RGB, 1: PHOTOMETRIC_YCBCR}.get(adobe)
    return PHOTOMETRIC_RGB if markers.components == (82, 71, 66) else PHOTOMETRIC_YCBCR


def _check_j2k_tile(data: bytes, layout: LevelLayout) -> None:
    """Refuse a JPEG 2000 codestream whose SIZ segment claims another size or component
    count than the level's tiles, as OpenSlide does, before OpenJPEG allocates for it."""
    from medprep.common.claims import codestream_claim

    claim = codestream_claim(data) if data[:4] == b"\xff\x4f\xff\x51" else None
    if claim is None:
        raise TileDecodeError("not a JPEG 2000 codestream (no SOC and SIZ markers)")
    width, height, components = claim
    if (width, height, components) != (layout.tile_width, layout.tile_height, 3):
        raise TileDecodeError(
            f"JPEG 2000 header claims {width} x {height} pixels of {components} components, "
            f"the level's tiles are {layout.tile_width} x {layout.tile_height} of 3"
        )


def decode_tile(data: bytes, layout: LevelLayout) -> np.ndarray:
    """One stored tile as a tile_height x tile_width x 3 or x 4 (RGBX) uint8 array.

    Raises ``TileDecodeError`` (or the decoder's error) when the tile is damaged: any
    libjpeg warning, a header claiming another size, too few bytes; ``NotDirect`` when
    the tile is sound but its colour markers are not what this reader assumes.
    """
    import imagecodecs

    th, tw = layout.tile_height, layout.tile_width
    compression = layout.compression
    if compression == JPEG:
        import simplejpeg

        _check_jpeg_tile(data, layout)
        prefix = layout.jpeg_prefix or jpeg_prefix(layout.jpeg_tables, layout.photometric)
        try:
            tile = simplejpeg.decode_jpeg(prefix + data[2:], colorspace="RGBX", strict=True)
        except ValueError as error:  # libjpeg's errors and warnings alike
            raise TileDecodeError(str(error) or "JPEG decoder error") from None
    elif compression in (APERIO_J2K_YCBCR, APERIO_J2K_RGB):
        _check_j2k_tile(data, layout)
        tile = imagecodecs.jpeg2k_decode(data)
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise TileDecodeError(f"JPEG 2000 tile decoded to {tile.shape}, expected 3 components")
        if compression == APERIO_J2K_YCBCR:
            tile = ycbcr_to_rgb(tile)
    else:
        size = th * tw * 3
        raw: bytes | bytearray
        if compression == NONE:
            raw = data
        elif compression == LZW:
            raw = imagecodecs.lzw_decode(data, out=size)
        else:
            import zlib

            # at most the tile's bytes are decoded (a deflate stream can claim 1032 times
            # its size); bytes after them are ignored, as libtiff does
            try:
                raw = zlib.decompressobj().decompress(data, size)
            except zlib.error as error:
                raise TileDecodeError(f"Deflate data is corrupt ({error})") from None
        if len(raw) < size:
            raise TileDecodeError(f"tile has {len(raw)} bytes, expected {size}")
        tile = np.frombuffer(raw, dtype=np.uint8, count=size).reshape(th, tw, 3)
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
        if page.jpegtables:
            tables = jpeg_markers(bytes(page.jpegtables))
            if tables.jfif or tables.adobe_transform is not None:
                return "JPEG tables with a JFIF or Adobe colour marker"
    elif photometric != PHOTOMETRIC_RGB:
        return f"photometric {photometric} with compression {compression}"
    if compression in (NONE, LZW, *DEFLATE) and int(page.predictor) not in (1, 2):
        return f"predictor {int(page.predictor)}"
    return None


def _layout(page) -> LevelLayout:
    tables = bytes(page.jpegtables) if page.jpegtables else None
    compression = int(page.compression)
    photometric = int(page.photometric)
    return LevelLayout(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        counts=np.asarray(page.databytecounts, dtype=np.int64),
        compression=compression,
        photometric=photometric,
        predictor=int(page.predictor),
        jpeg_tables=tables,
        jpeg_prefix=jpeg_prefix(tables, photometric) if compression == JPEG else b"",
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
        pages = [p for p in tiff.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
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
        """``read_region``'s pixels; raises ``DamagedTileError`` naming the tiles that
        cannot be decoded, ``None`` when the region goes through OpenSlide."""
        region = self.read_region(level, x, y, width, height)
        if region is None:
            return None
        pixels, damaged = region
        if damaged:
            raise DamagedTileError(damaged)
        return pixels

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> tuple[np.ndarray, list[DamagedTile]] | None:
        """The region as OpenSlide's ``read_region`` gives it (H x W x 4 uint8, alpha 0
        outside the level), (x, y) in level-0 pixels and the size at ``level``, and the
        stored tiles that cannot be decoded, whose pixels are left transparent (alpha 0,
        like unscanned area). ``None`` when the region has a missing tile or a tile this
        reader does not decode the way OpenSlide does (the caller reads it through
        OpenSlide)."""
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
        damaged: list[DamagedTile] = []
        if x0 >= x1 or y0 >= y1:
            return out, damaged
        tw, th = layout.tile_width, layout.tile_height
        cols = range(x0 // tw, (x1 - 1) // tw + 1)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            index = row * layout.tiles_across
            if (layout.counts[index + cols.start : index + cols.stop] <= 0).any():
                return None
            try:
                stored: list[bytes | Exception] = list(self._tile_bytes(layout, row, cols))
            except TileDecodeError:  # a short read: the file ends early; which tiles?
                stored = [self._tile_or_error(layout, row * layout.tiles_across + c) for c in cols]
            for col, data in zip(cols, stored, strict=True):
                # overlap of this tile with the region, in level pixels
                tx0, ty0 = col * tw, row * th
                ax0, ax1 = max(x0, tx0), min(x1, tx0 + tw)
                ay0, ay1 = max(y0, ty0), min(y1, ty0 + th)
                target = out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx]
                try:
                    if isinstance(data, Exception):
                        raise data
                    tile = decode_tile(data, layout)
                except NotDirect:
                    return None
                except Exception as error:  # noqa: BLE001 - any decoder error: a damaged tile
                    damaged.append(self._damaged(level, col, row, error))
                    target[...] = 0
                    continue
                source = tile[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
                if source.shape[2] == 4:
                    target[...] = source
                else:
                    target[..., :3] = source
                    target[..., 3] = 255
        return out, damaged

    def _tile_or_error(self, layout: LevelLayout, index: int) -> bytes | Exception:
        try:
            return self._pread(int(layout.offsets[index]), int(layout.counts[index]))
        except TileDecodeError as error:
            return error

    def _damaged(self, level: int, col: int, row: int, error: Exception) -> DamagedTile:
        layout = self.layouts[level]
        ds = self.level_downsamples[level]
        cause = str(error) or type(error).__name__
        return DamagedTile(
            level=level,
            column=col,
            row=row,
            x=round(col * layout.tile_width * ds),
            y=round(row * layout.tile_height * ds),
            width=layout.tile_width,
            height=layout.tile_height,
            downsample=ds,
            cause=cause,
        )


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
