"""Pyramidal, tiled, JPEG-compressed TIFF slides for tests, the demo and benchmarks.

``write_synthetic_slide`` makes a slide of any size with real tissue texture: a square of
the densest tissue of a real slide (e.g. CMU-1-Small-Region.svs), mirrored so it tiles
without seams, laid out in smooth random blobs covering about ``tissue_fraction`` of the
area on a glass-coloured background. Tiles are generated and JPEG-encoded one at a time
and streamed into the file, so memory stays small whatever the slide size. Pyramid levels
are rendered from level-0 geometry at their own resolution (not by reading level 0 back).

``write_pyramidal_tiff`` is the generic writer underneath: give it a function that renders
any region of any level. Slides are written Aperio-style (an ImageDescription with
``MPP = ...``, which OpenSlide reports as ``openslide.mpp-x``/``-y``) or as generic tiled
TIFFs with resolution tags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# render(downsample, x, y, width, height) -> uint8 (height, width, 3) of the level whose
# downsample is ``downsample``; x, y in that level's pixels
Renderer = Callable[[float, int, int, int, int], np.ndarray]

GLASS = (242, 240, 243)


def layout_cell(width: int, height: int) -> int:
    """Level-0 pixels per cell of the random layout field: a dozen cells across the short
    side, so slides of any size get a few tissue pieces of proportionate size."""
    return int(min(max(min(width, height) // 12, 256), 4096))


def default_downsamples(
    width: int, height: int, tile_size: int = 256, factor: int = 4
) -> tuple[int, ...]:
    """1, 4, 16, ... while the level is still at least a tile wide (Aperio-style)."""
    downsamples = [1]
    while max(width, height) / (downsamples[-1] * factor) >= tile_size:
        downsamples.append(downsamples[-1] * factor)
    return tuple(downsamples)


def _encode(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(tile, level=quality, subsampling="420"))


def write_pyramidal_tiff(
    path: str | os.PathLike,
    width: int,
    height: int,
    render: Renderer,
    *,
    mpp: float | None = 0.5,
    quality: int = 90,
    tile_size: int = 256,
    downsamples: Sequence[int] | None = None,
    vendor: str = "aperio",
    tile_cache: Callable[[float, int, int, int, int], object | None] | None = None,
) -> list[tuple[int, int]]:
    """Write a tiled JPEG pyramid; returns the (width, height) of each level.

    ``vendor``: ``aperio`` (resolution in the ImageDescription, as Aperio SVS) or
    ``generic`` (resolution tags in centimetres). ``mpp=None`` writes no resolution.
    ``tile_cache(downsample, x, y, w, h)`` may return a hashable key for tiles whose
    encoding can be reused (identical content); ``None`` means render and encode.
    """
    import tifffile

    if vendor not in ("aperio", "generic"):
        raise ValueError(f"vendor must be aperio or generic, got {vendor!r}")
    downsamples = tuple(downsamples or default_downsamples(width, height, tile_size))
    sizes = [(max(1, width // d), max(1, height // d)) for d in downsamples]
    bigtiff = width * height * 3 > 2**31

    def tiles(level: int) -> Iterator[bytes]:
        d = downsamples[level]
        level_w, level_h = sizes[level]
        cache: dict[object, bytes] = {}
        for y in range(0, level_h, tile_size):
            for x in range(0, level_w, tile_size):
                w = min(tile_size, level_w - x)
                h = min(tile_size, level_h - y)
                key = (
                    tile_cache(d, x, y, w, h)
                    if tile_cache and w == tile_size and h == tile_size
                    else None
                )
                if key is not None and key in cache:
                    yield cache[key]
                    continue
                pixels = np.zeros((tile_size, tile_size, 3), dtype=np.uint8)
                pixels[:h, :w] = render(d, x, y, w, h)
                if w < tile_size or h < tile_size:  # pad edge tiles by repeating the edge
                    pixels[h:, :w] = pixels[h - 1 : h, :w]
                    pixels[:, w:] = pixels[:, w - 1 : w]
                data = _encode(pixels, quality)
                if key is not None:
                    cache[key] = data
                yield data

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, d in enumerate(downsamples):
            level_w, level_h = sizes[level]
            options: dict = {
                "shape": (level_h, level_w, 3),
                "dtype": np.uint8,
                "tile": (tile_size, tile_size),
                "compression": "jpeg",
                "photometric": "ycbcr",
                "subsampling": (2, 2),
                "metadata": None,
            }
            if level == 0:
                if vendor == "aperio":
                    description = (
                        "Aperio Image Library medprep synthetic\r\n"
                        f"{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size}) "
                        f"JPEG/RGB Q={quality}"
                    )
                    if mpp is not None:
                        description += f"|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
                    options["description"] = description
                elif mpp is not None:
                    options["resolution"] = (1e4 / mpp, 1e4 / mpp)
                    options["resolutionunit"] = "CENTIMETER"
            else:
                options["subfiletype"] = 1
                if vendor == "generic" and mpp is not None:
                    options["resolution"] = (1e4 / (mpp * d), 1e4 / (mpp * d))
                    options["resolutionunit"] = "CENTIMETER"
            tif.write(tiles(level), **options)
    return sizes


@dataclass(frozen=True)
class Texture:
    """A square of real tissue, mirrored into a seamless periodic tile, per downsample."""

    mirrored: dict[int, np.ndarray]  # downsample -> (2P/d, 2P/d, 3)
    side: int  # P, level-0 pixels
    density: float  # fraction of the square that is tissue (saturation test)

    def period(self, downsample: int) -> int:
        return self.mirrored[downsample].shape[0]


def _densest_square(rgb: np.ndarray, side: int) -> tuple[int, int, float]:
    from medprep.wsi.tissue import saturation

    step = 16
    small = rgb[::step, ::step]
    tissue = (saturation(small) > 40).astype(np.float64)
    k = side // step
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(i) * step, int(j) * step, float(sums[i, j] / (k * k))


def load_texture(
    texture_slide: str | os.PathLike, downsamples: Sequence[int], side: int = 1024
) -> Texture:
    """The densest ``side`` x ``side`` tissue square of level 0 of ``texture_slide``."""
    from PIL import Image

    from medprep.wsi.slide import open_slide, rgba_to_rgb

    handle = open_slide(texture_slide)
    try:
        width, height = handle.dimensions
        # at most a 4096 square of the texture slide is looked at
        region_w, region_h = min(width, 4096), min(height, 4096)
        side = min(side, region_w, region_h)
        largest = max(downsamples)
        side = max(largest, side // largest * largest)
        rgba = np.asarray(handle.read_region((0, 0), 0, (region_w, region_h)))
    finally:
        handle.close()
    rgb = rgba_to_rgb(rgba, (255, 255, 255))
    top, left, density = _densest_square(rgb, side)
    square = np.ascontiguousarray(rgb[top : top + side, left : left + side])
    mirrored = {}
    for d in downsamples:
        small = np.asarray(
            Image.fromarray(square).resize((side // d, side // d), Image.Resampling.BOX)
        )
        top_row = np.concatenate([small, small[:, ::-1]], axis=1)
        mirrored[d] = np.ascontiguousarray(np.concatenate([top_row, top_row[::-1]], axis=0))
    return Texture(mirrored, side, density)


def tissue_layout(
    width: int, height: int, fraction: float, seed: int, cell: int
) -> tuple[np.ndarray, float]:
    """A smooth random field on a coarse grid and the threshold above which is tissue.

    Field value at level-0 (X, Y) = bilinear interpolation at (X / cell, Y / cell).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    rows = math.ceil(height / cell) + 2
    cols = math.ceil(width / cell) + 2
    noise = rng.standard_normal((rows, cols))
    field = ndimage.gaussian_filter(noise, sigma=2.0, mode="reflect")
    inner = field[: math.ceil(height / cell) + 1, : math.ceil(width / cell) + 1]
    fraction = min(max(fraction, 0.0), 1.0)
    threshold = float(np.quantile(inner, 1 - fraction)) if fraction < 1 else -np.inf
    return field, threshold


def _interpolation_weights(coords: np.ndarray, first: int, count: int) -> np.ndarray:
    """Dense (len(coords), count) bilinear weights onto cells first..first+count-1."""
    weights = np.zeros((coords.size, count))
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    rows = np.arange(coords.size)
    weights[rows, base - first] = 1 - frac
    inside = base + 1 - first < count
    weights[rows[inside], base[inside] + 1 - first] = frac[inside]
    return weights


@dataclass(frozen=True)
class SyntheticSlide:
    path: str
    width: int
    height: int
    mpp: float | None
    level_sizes: list[tuple[int, int]]
    layout_fraction: float  # fraction of the area inside tissue blobs
    texture_density: float  # fraction of tissue inside the blobs (from the texture)


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    texture_slide: str | os.PathLike,
    mpp: float | None = 0.5,
    quality: int = 90,
    tissue_fraction: float = 1 / 3,
    seed: int = 0,
    tile_size: int = 256,
    downsamples: Sequence[int] | None = None,
    vendor: str = "aperio",
    background: tuple[int, int, int] = GLASS,
) -> SyntheticSlide:
    """Write a ``width`` x ``height`` pyramidal JPEG slide with real tissue texture.

    About ``tissue_fraction`` of the area is tissue (blobs are enlarged to make up for
    the gaps inside the texture). ``mpp=None`` writes a slide without resolution metadata.
    """
    downsamples = tuple(downsamples or default_downsamples(width, height, tile_size))
    texture = load_texture(texture_slide, downsamples)
    layout_fraction = min(1.0, tissue_fraction / max(texture.density, 1e-6))
    cell = layout_cell(width, height)
    field, threshold = tissue_layout(width, height, layout_fraction, seed, cell)
    glass = np.asarray(background, dtype=np.uint8)

    def field_patch(
        d: float, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        # level-0 pixel centres of this region, in layout cells
        u = ((x + np.arange(w) + 0.5) * d) / cell
        v = ((y + np.arange(h) + 0.5) * d) / cell
        c0, r0 = int(np.floor(u[0])), int(np.floor(v[0]))
        c1, r1 = int(np.floor(u[-1])) + 2, int(np.floor(v[-1])) + 2
        return field[r0:r1, c0:c1], u, v, r0, c0

    def render(d: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        patch, u, v, r0, c0 = field_patch(d, x, y, w, h)
        if patch.max() <= threshold:
            return np.broadcast_to(glass, (h, w, 3))
        mirrored = texture.mirrored[int(d)]
        period = mirrored.shape[0]
        texture_rows = (y + np.arange(h)) % period
        texture_cols = (x + np.arange(w)) % period
        tissue = mirrored[texture_rows][:, texture_cols]
        if patch.min() > threshold:
            return tissue
        values = (
            _interpolation_weights(v, r0, patch.shape[0])
            @ patch
            @ _interpolation_weights(u, c0, patch.shape[1]).T
        )
        return np.where((values > threshold)[..., None], tissue, glass)

    def cache_key(d: float, x: int, y: int, w: int, h: int) -> object | None:
        patch, *_ = field_patch(d, x, y, w, h)
        if patch.max() <= threshold:
            return ("glass",)
        if patch.min() > threshold:
            period = texture.period(int(d))
            return ("tissue", y % period, x % period)
        return None

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sizes = write_pyramidal_tiff(
        path,
        width,
        height,
        render,
        mpp=mpp,
        quality=quality,
        tile_size=tile_size,
        downsamples=downsamples,
        vendor=vendor,
        tile_cache=cache_key,
    )
    return SyntheticSlide(
        os.fspath(path), width, height, mpp, sizes, layout_fraction, texture.density
    )
