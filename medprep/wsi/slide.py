"""Thin OpenSlide I/O: open a slide with clear errors, describe it, read regions.

Everything that can go wrong with a slide file becomes an ``InputError`` naming the file
and the cause in one line. Reads go through ``SlideReader``, which reopens the OpenSlide
handle after an error (a handle is unusable once OpenSlide reported one) and retries once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medprep.common.errors import InputError
from medprep.wsi.companions import check_named_files
from medprep.wsi.tiff_read import DamagedTile, DamagedTileError

log = logging.getLogger(__name__)

# Refuse slides claiming more level-0 pixels than any scanner produces (a 75 x 50 mm scan
# area at 0.12 um/px is 2.6e11 pixels): a corrupt or hostile header must not make us plan
# reads, grids or masks proportional to its claims.
MAX_LEVEL0_PIXELS = 2**38
MAX_SIDE = 2**21
# Side of the pieces a region is read in, after an OpenSlide error, at a level whose tile
# grid OpenSlide does not report.
PIECE_SIDE = 256
MIN_PIECE_PIXELS = 4096
MAX_PIECE_SIDE = 1 << 16

# The order in which the files of a multi-file slide are tried: index files first.
_INDEX_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svs", ".ndpi", ".scn", ".bif", ".svslide")
_TIFF_SUFFIXES = (".tif", ".tiff")

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
)


def describe_unreadable(path: str | os.PathLike) -> str:
    """A one-line guess at why OpenSlide cannot open ``path``, from its first bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if size == 0:
        return "empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what}, not a whole-slide image"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _describe_tiff(path, size)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file that is not a whole-slide image (or lacks the rest of its series)"
    return "not a whole-slide image format OpenSlide recognises"


def _describe_tiff(path: Path, size: int) -> str:
    """Walk a TIFF's directory chain to tell a truncated file from one that is not a slide."""
    from medprep.wsi.tiff_read import tiff_damage

    problem = tiff_damage(path)
    if problem:
        return f"truncated or damaged TIFF: {problem}"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            tiled = any(
                isinstance(page, tifffile.TiffPage) and page.is_tiled for page in tiff.pages
            )
    except Exception:  # noqa: BLE001 - only a better message is at stake
        tiled = True
    if not tiled:
        return "a plain TIFF image that is not tiled (whole-slide images are tiled pyramids)"
    return (
        "a TIFF file OpenSlide does not read as a slide (damaged, or a plain image "
        "that is not tiled)"
    )


def _openslide():
    import openslide

    return openslide


def open_slide(path: str | os.PathLike):
    """An ``openslide.OpenSlide`` for ``path``, or ``InputError`` with the cause."""
    openslide = _openslide()
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path=str(path))
    if path.is_dir():
        raise InputError("is a folder, not a slide file", path=str(path))
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path=str(path))
    check_named_files(path)
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as error:
        raise InputError(f"cannot read slide: {error}", path=str(path)) from None
    if vendor is None:
        raise InputError(describe_unreadable(path), path=str(path))
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as error:
        detail = str(error) or type(error).__name__
        if isinstance(error, openslide.OpenSlideUnsupportedFormatError):
            detail = describe_unreadable(path)
        raise InputError(f"cannot open {vendor} slide: {detail}", path=str(path)) from None


@dataclass(frozen=True)
class SlideInfo:
    """What the engine needs to know about a slide, read once from its metadata."""

    path: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    background: tuple[int, int, int] | None  # openslide.background-color, if the format has one
    tile_size: tuple[int, int] | None = None  # native tile size of level 0, if known
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def levels(self) -> list[dict[str, float]]:
        return [
            {"width": w, "height": h, "downsample": round(d, 6)}
            for (w, h), d in zip(self.level_dimensions, self.level_downsamples, strict=True)
        ]


def _float_property(properties, name: str) -> float | None:
    value = properties.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def describe_slide(handle, path: str | os.PathLike) -> SlideInfo:
    """Read a slide's geometry and resolution metadata; refuse implausible dimensions."""
    properties = handle.properties
    width, height = (int(v) for v in handle.dimensions)
    check_dimensions(width, height, path)
    background = None
    colour = properties.get("openslide.background-color")
    if colour and len(colour) == 6:
        try:
            background = tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            background = None
    tile_w = properties.get("openslide.level[0].tile-width")
    tile_h = properties.get("openslide.level[0].tile-height")
    # Only a few non-identifying properties are kept; vendor properties can carry names,
    # dates and scanner user IDs.
    kept = {
        k: properties[k]
        for k in (
            "openslide.vendor",
            "openslide.mpp-x",
            "openslide.mpp-y",
            "openslide.objective-power",
        )
        if k in properties
    }
    return SlideInfo(
        path=os.fspath(path),
        vendor=properties.get("openslide.vendor", "unknown"),
        dimensions=(width, height),
        level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        mpp_x=_float_property(properties, "openslide.mpp-x"),
        mpp_y=_float_property(properties, "openslide.mpp-y"),
        objective_power=_float_property(properties, "openslide.objective-power"),
        background=background,  # type: ignore[arg-type]
        tile_size=(int(tile_w), int(tile_h)) if tile_w and tile_h else None,
        properties=kept,
    )


def check_dimensions(width: int, height: int, path: str | os.PathLike | None = None) -> None:
    """Refuse a slide whose header claims impossible dimensions (a decompression bomb)."""
    where = os.fspath(path) if path is not None else None
    if width <= 0 or height <= 0:
        raise InputError(f"slide claims empty dimensions {width} x {height}", path=where)
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_LEVEL0_PIXELS:
        raise InputError(
            f"slide claims {width} x {height} pixels at level 0 ({width * height:.3g} pixels), "
            f"more than any scanner produces (limit {MAX_LEVEL0_PIXELS:.3g} pixels, "
            f"{MAX_SIDE} per side); refusing to read it",
            path=where,
        )


def inspect_slide(path: str | os.PathLike) -> SlideInfo:
    """Open ``path``, describe it and close it again."""
    handle = open_slide(path)
    try:
        return describe_slide(handle, path)
    finally:
        handle.close()


class RegionReadError(Exception):
    """A region of a slide could not be read; the message names the level and the
    damaged tiles, or the region's coordinates."""

    def __init__(self, message: str):
        super().__init__(message)


class SlideReader:
    """One OpenSlide handle, reopened after an error. Not shareable across processes.

    With ``direct=True`` (the default), levels of tiled TIFF-family slides are read from
    their stored tiles (``medprep.wsi.tiff_read``), pixel for pixel what OpenSlide returns;
    regions or files that path is unsure of go through OpenSlide. ``direct_reason`` says
    which levels are read directly, or why none is. ``direct=None`` follows the
    environment: ``MEDPREP_DIRECT_READS=0`` reads everything through OpenSlide.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool | None = None):
        if direct is None:
            direct = os.environ.get("MEDPREP_DIRECT_READS", "1") != "0"
        self.path = os.fspath(path)
        self._handle = open_slide(self.path)
        self._direct = None
        self.direct_reason = "direct reads off"
        self.direct_reads = 0
        self.openslide_reads = 0
        if direct:
            from medprep.wsi.tiff_read import open_tiff_reader

            handle = self._handle
            self._direct, self.direct_reason = open_tiff_reader(
                self.path,
                handle.properties.get("openslide.vendor", "unknown"),
                tuple((int(w), int(h)) for w, h in handle.level_dimensions),
                tuple(float(d) for d in handle.level_downsamples),
            )
            if self._direct is not None:
                dropped = self._direct.keep_levels_matching(
                    lambda level, w, h: read_region_array(handle, level, 0, 0, w, h)
                )
                if dropped:
                    self.direct_reason += "; through OpenSlide: " + ", ".join(
                        f"level {k} ({v})" for k, v in sorted(dropped.items())
                    )
                if not self._direct.layouts:
                    self._direct.close()
                    self._direct = None
            log.debug("%s: %s", self.path, self.direct_reason)

    @property
    def direct_levels(self) -> tuple[int, ...]:
        return tuple(sorted(self._direct.layouts)) if self._direct is not None else ()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def _reopen(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._handle = open_slide(self.path)

    def _read_direct(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> tuple[np.ndarray, list[DamagedTile]] | None:
        if self._direct is None or not self._direct.can_read(level) or width <= 0 or height <= 0:
            return None
        try:
            region = self._direct.read_region(level, x, y, width, height)
        except Exception as error:  # noqa: BLE001 - not damage (that is listed): OpenSlide's turn
            log.warning(
                "direct read of %s level %d at x=%d, y=%d failed (%s); reading through OpenSlide",
                self.path,
                level,
                x,
                y,
                error,
            )
            return None
        if region is not None:
            self.direct_reads += 1
        return region

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> tuple[np.ndarray, list[DamagedTile]]:
        """``read_region`` as an H x W x 4 uint8 array, (x, y) at level 0, size at
        ``level``, and the tiles of the region that cannot be decoded (left transparent,
        like unscanned area).

        Stored tiles read directly are decoded one by one, so a damaged one is known by
        its level, column and row. A region OpenSlide cannot read is read again tile by
        tile of the level's grid (``openslide.level[N].tile-width``; pieces of
        ``PIECE_SIDE`` pixels when the format has none), reopening the handle after each
        error, to tell the damaged tiles from the rest. Raises ``RegionReadError`` when
        the slide cannot be reopened.
        """
        direct = self._read_direct(level, x, y, width, height)
        if direct is not None:
            return direct
        try:
            return self._read_openslide(level, x, y, width, height), []
        except RegionReadError as error:
            if self._handle is None:
                raise
            first_error = error
        return self._read_tile_by_tile(level, x, y, width, height, first_error)

    def read_rgba(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``read_region``'s pixels; ``RegionReadError`` naming the tiles that cannot be
        decoded, if any."""
        pixels, damaged = self.read_region(level, x, y, width, height)
        if damaged:
            raise RegionReadError(str(DamagedTileError(damaged)))
        return pixels

    def _read_openslide(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """One OpenSlide read; on an error the handle is reopened and the read retried
        once; a second failure raises ``RegionReadError`` naming the region."""
        openslide = _openslide()
        last: Exception | None = None
        for attempt in (1, 2):
            try:
                if self._handle is None:
                    self._reopen()
                self.openslide_reads += 1
                return read_region_array(self._handle, level, x, y, width, height)
            except (openslide.OpenSlideError, InputError) as error:
                last = error
                log.warning("read of %s failed (attempt %d): %s", self.path, attempt, error)
                try:
                    self._reopen()
                except InputError as reopen_error:
                    last = reopen_error
                    break
        raise RegionReadError(
            f"cannot read level {level} region at level-0 x={x}, y={y}, "
            f"size {width} x {height}: {last}"
        )

    def _tile_grid(self, level: int) -> tuple[int, int, str]:
        properties = self._handle.properties if self._handle is not None else {}
        tw = properties.get(f"openslide.level[{level}].tile-width")
        th = properties.get(f"openslide.level[{level}].tile-height")
        try:
            size = (int(tw), int(th)) if tw and th else None
        except ValueError:
            size = None
        # tiles of fewer than MIN_PIECE_PIXELS would mean thousands of reads per region
        # (NDPI's are strips of whole restart intervals, e.g. 3968 x 8)
        if (
            size is not None
            and all(1 <= n <= MAX_PIECE_SIDE for n in size)
            and size[0] * size[1] >= MIN_PIECE_PIXELS
        ):
            return size[0], size[1], "tile"
        return PIECE_SIDE, PIECE_SIDE, "region"

    def _read_tile_by_tile(
        self, level: int, x: int, y: int, width: int, height: int, first_error: Exception
    ) -> tuple[np.ndarray, list[DamagedTile]]:
        """The region read in pieces of the level's tile grid; the pieces that fail are
        left transparent and listed. Pieces start on whole level-0 pixels, so at a level
        whose downsample is not a whole number their pixels may differ from one read of
        the region by the interpolation OpenSlide does there (only after an error)."""
        openslide = _openslide()
        ds = float(self._handle.level_downsamples[level])
        tw, th, kind = self._tile_grid(level)
        out = np.zeros((height, width, 4), dtype=np.uint8)
        damaged: list[DamagedTile] = []
        lx, ly = x / ds, y / ds  # the region's origin in level pixels
        for row in range(max(int(ly // th), 0), int((ly + height - 1) // th) + 1):
            i0, i1 = (max(min(round(v - ly), height), 0) for v in (row * th, (row + 1) * th))
            for col in range(max(int(lx // tw), 0), int((lx + width - 1) // tw) + 1):
                j0, j1 = (max(min(round(v - lx), width), 0) for v in (col * tw, (col + 1) * tw))
                if i0 >= i1 or j0 >= j1:
                    continue
                px, py = round(x + j0 * ds), round(y + i0 * ds)
                try:
                    if self._handle is None:
                        self._reopen()
                    self.openslide_reads += 1
                    piece = read_region_array(self._handle, level, px, py, j1 - j0, i1 - i0)
                except openslide.OpenSlideError as error:
                    # the whole cell of the grid: the same tile whichever region met it
                    cell_x, cell_y = round(col * tw * ds), round(row * th * ds)
                    damaged.append(
                        DamagedTile(level, col, row, cell_x, cell_y, tw, th, ds, str(error), kind)
                    )
                    try:
                        self._reopen()  # OpenSlide handles are unusable after an error
                    except InputError as reopen_error:
                        raise RegionReadError(f"cannot reopen the slide: {reopen_error}") from None
                    continue
                out[i0:i1, j0:j1] = piece
        if not damaged:  # every piece read: the first error did not come back
            log.warning("%s: %s; read again tile by tile without error", self.path, first_error)
        return out, damaged


def read_region_array(handle, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """``handle.read_region`` into a numpy RGBA array (not premultiplied), without a copy.

    openslide-python builds a PIL image over its buffer and ``np.asarray`` of a PIL image
    copies it through an encoder, which costs a noticeable share of a read; so the
    buffer is a numpy array handed to OpenSlide directly, with openslide-python's own
    conversion. Falls back to the public API if those internals are not there.
    """
    from ctypes import POINTER, c_uint32

    from openslide import lowlevel

    read = getattr(lowlevel, "_read_region", None)
    convert = getattr(getattr(lowlevel, "_convert", None), "argb2rgba", None)
    if read is None or convert is None or width <= 0 or height <= 0:
        return np.asarray(
            handle.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        )
    buffer = np.empty(int(width) * int(height), dtype=np.uint32)
    read(
        handle._osr,
        buffer.ctypes.data_as(POINTER(c_uint32)),
        int(x),
        int(y),
        int(level),
        int(width),
        int(height),
    )
    convert(buffer)
    return buffer.view(np.uint8).reshape(int(height), int(width), 4)


def make_opaque(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite transparent pixels (where the slide has no data) onto ``background``,
    in place; alpha becomes 255. Fully opaque input (the usual case) is left untouched."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgba
    rgba[..., :3] = rgba_to_rgb(rgba, background)
    rgba[..., 3] = 255
    return rgba


def rgba_to_rgb(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite an RGBA array (OpenSlide's output, not premultiplied) onto ``background``.

    Fully opaque input (the usual case) is only sliced; transparent pixels are where the
    slide has no scanned data.
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32)[..., None] / 255.0
    bg = np.asarray(background, dtype=np.float32)
    out = rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def pick_slide_file(paths: Iterable[str | os.PathLike]) -> Path:
    """The file OpenSlide should open among a sample's files.

    One file: that file (errors about it come from ``open_slide``). Several (a DICOM-WSI
    folder, MIRAX ``.mrxs`` + data folder, Hamamatsu ``.vms``): index files first, then
    TIFFs, then the rest, each in name order; the first one OpenSlide recognises.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("the sample has no files")
    if len(files) == 1:
        return files[0]

    def rank(path: Path) -> tuple[int, str]:
        suffix = path.suffix.lower()
        if suffix in _INDEX_SUFFIXES:
            group = 0
        elif suffix in _TIFF_SUFFIXES:
            group = 1
        elif suffix == ".dcm":
            group = 2
        else:
            group = 3
        return group, path.as_posix()

    openslide = _openslide()
    for path in sorted(files, key=rank):
        if path.suffix.lower() == ".dat":  # MIRAX data files are never the entry point
            continue
        check_named_files(path)
        try:
            if path.stat().st_size > 0 and openslide.OpenSlide.detect_format(str(path)):
                return path
        except (OSError, openslide.OpenSlideError):
            continue
    raise InputError(
        f"none of the sample's {len(files)} files is a slide OpenSlide can open "
        f"(first: {sorted(files)[0].name})",
        path=str(files[0].parent),
    )
