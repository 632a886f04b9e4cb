"""Per-tile quality scores and the optional filters on them.

Scores, all from the tile's own pixels (a tile's scores can be recomputed from its image),
defined per stain type (``tissue_mode`` of the slide). Brightfield (H&E, IHC):

- ``white_fraction``: every channel >= ``WHITE_LEVEL`` (glass); ``black_fraction``: every
  channel <= ``BLACK_LEVEL``; ``background_fraction``: white + black;
- ``tissue_fraction``: HSV saturation above the slide's tissue threshold;
- signal image for the blur scores: grey (luma), as every channel carries stain.

Fluorescence (tissue bright on a dark background):

- ``black_fraction`` = ``background_fraction``: brightest channel <= the slide's
  ``dark_level`` (as dark as its glass); ``white_fraction`` as above (over-exposure, not
  background); ``tissue_fraction``: 1 - black (signal above the glass);
- signal image: the brightest channel, where any dye shines (luma would weigh DAPI's
  blue by 0.114).

Both: ``blur`` is the variance of the 4-neighbour Laplacian of the signal image (raw: it
scales with contrast squared); ``sharpness`` is ``blur`` / (gradient energy + 1), free of
contrast and exposure and so comparable across slides and stains: in-focus tiles score
0.7-2, a 1-pixel Gaussian blur halves it, a 2-pixel one divides it by about 6.

``dark_level`` comes from preprocessing: twice the median brightness of the slide's
scanned non-tissue area (at least that + 4), so "dark" means "as dark as this slide's glass"
whatever the camera's offset. Per-pixel thresholds at the tissue-mask threshold would call
the unstained space between DAPI nuclei background (87% of a tissue tile).

The fractions are estimated on a regular grid of pixels (every 4th pixel in each
direction for tiles of 256 pixels or more, 4096 samples; denser for smaller tiles), which
moves them by far less than any useful filter threshold and keeps the scores cheap next
to reading and encoding. The blur scores use every pixel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from medprep.wsi.settings import FilterSettings

WHITE_LEVEL = 220
BLACK_LEVEL = 30

# Rejection reasons in the order they are checked; a tile failing several counts once,
# under the first.
REJECT_REASONS = ("max_background", "min_tissue_fraction", "min_blur", "min_sharpness")

SCORE_NAMES = (
    "tissue_fraction",
    "background_fraction",
    "white_fraction",
    "black_fraction",
    "blur",
    "sharpness",
)


@dataclass(frozen=True)
class TileScores:
    tissue_fraction: float
    background_fraction: float
    white_fraction: float
    black_fraction: float
    blur: float
    sharpness: float = 0.0

    def as_tuple(self) -> tuple[float, ...]:
        return (
            self.tissue_fraction,
            self.background_fraction,
            self.white_fraction,
            self.black_fraction,
            self.blur,
            self.sharpness,
        )


def laplacian_stats(gray: np.ndarray) -> tuple[float, float]:
    """Variance of the 4-neighbour Laplacian over the interior of a 2-D grey image, and
    the image's gradient energy (mean squared difference to the right and below).

    The energy comes from the same Laplacian by summation by parts: the sum over pixels of
    ``g * (4 g - neighbours)`` is the sum of squared differences over neighbouring pairs,
    two pairs per pixel, up to the image border; so it costs one dot product more.
    """
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0, 0.0
    g = gray.astype(np.int16)
    # 4 g - neighbours in int16 (|lap| <= 1020), in place: one temporary, five passes
    lap = np.multiply(g[1:-1, 1:-1], np.int16(4))
    lap -= g[:-2, 1:-1]
    lap -= g[2:, 1:-1]
    lap -= g[1:-1, :-2]
    lap -= g[1:-1, 2:]
    flat = lap.astype(np.float32).ravel()
    n = flat.size
    mean = float(flat.sum(dtype=np.float64)) / n
    variance = max(float(np.dot(flat, flat)) / n - mean * mean, 0.0)
    centre = g[1:-1, 1:-1].astype(np.float32).ravel()
    energy = max(float(np.dot(centre, flat)) / n, 0.0)
    return variance, energy


def sharpness(blur: float, energy: float) -> float:
    """``blur`` normalised by the tile's gradient energy: second over first derivatives.

    Scaling the contrast scales both alike, so the score does not depend on stain
    intensity or exposure; it falls as the point spread grows (about 1 / sigma^2)."""
    return blur / (energy + 1.0)


def signal_image(rgb: np.ndarray, tissue_mode: str) -> np.ndarray:
    """The 2-D image the blur scores use: luma (brightfield) or the brightest channel."""
    if tissue_mode == "fluorescence":
        return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return gray_levels(rgb)


def dark_level(background_brightness: float | None, tissue_threshold: float) -> float:
    """Fluorescence: signal at or below which a pixel is as dark as the slide's glass.

    ``background_brightness`` is the median brightest channel of the scanned non-tissue
    area (None when the slide has none)."""
    if background_brightness is None:
        return float(min(BLACK_LEVEL, tissue_threshold))
    level = max(2.0 * background_brightness, background_brightness + 4.0)
    return float(min(level, tissue_threshold))


def gray_levels(pixels: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as uint8: (299 R + 587 G + 114 B) / 1000, rounded (PIL's ``L``).

    ``pixels`` is H x W x 3 (RGB) or H x W x 4 (RGBA, alpha ignored).
    """
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).convert("L"))


@functools.lru_cache(maxsize=16)
def _saturated(threshold: float) -> np.ndarray:
    """Table over (max channel, min channel): is HSV saturation above ``threshold``?

    Saturation is (max - min) / max * 255; the table spares a division per pixel."""
    high = np.arange(256, dtype=np.int32)[:, None]
    low = np.arange(256, dtype=np.int32)[None, :]
    return (high - low) * 255 > threshold * high


def sampling_step(size: int) -> int:
    """Pixel step of the grid the fractions are estimated on (at least 64 x 64 samples)."""
    return max(1, min(4, size // 64))


def tile_scores(
    rgb: np.ndarray,
    tissue_mode: str,
    tissue_threshold: float,
    gray: np.ndarray | None = None,
    dark: float | None = None,
) -> TileScores:
    """QC scores of one H x W x 3 (or x 4, the 4th channel ignored) uint8 tile.

    ``gray`` is the tile's ``gray_levels`` if the caller already has them (a view into
    the grey image of a whole block, say; brightfield only); computed here otherwise.
    ``dark`` is the slide's fluorescence ``dark_level`` (default ``BLACK_LEVEL``).
    """
    step = sampling_step(min(rgb.shape[0], rgb.shape[1]))
    sample = rgb[::step, ::step]
    high = np.maximum(np.maximum(sample[..., 0], sample[..., 1]), sample[..., 2])
    low = np.minimum(np.minimum(sample[..., 0], sample[..., 1]), sample[..., 2])
    n = high.size
    white = np.count_nonzero(low >= WHITE_LEVEL) / n
    if tissue_mode == "fluorescence":
        black = np.count_nonzero(high <= (BLACK_LEVEL if dark is None else dark)) / n
        tissue = 1.0 - black
        background = black
        signal = signal_image(rgb, tissue_mode)
    else:
        black = np.count_nonzero(high <= BLACK_LEVEL) / n
        tissue = np.count_nonzero(_saturated(tissue_threshold)[high, low]) / n
        background = white + black
        signal = gray_levels(rgb) if gray is None else gray
    blur, energy = laplacian_stats(signal)
    return TileScores(
        float(tissue),
        float(background),
        float(white),
        float(black),
        blur,
        sharpness(blur, energy),
    )


def pixel_filters_on(filters: FilterSettings) -> bool:
    """Whether any filter on these scores is on (so tiles must be read to apply it)."""
    return any(
        value is not None
        for value in (
            filters.max_background,
            filters.min_tissue_fraction,
            filters.min_blur,
            filters.min_sharpness,
        )
    )


def rejection_reason(scores: TileScores, filters: FilterSettings) -> str | None:
    """The first filter ``scores`` fail, or None when the tile is kept."""
    if filters.max_background is not None and scores.background_fraction > filters.max_background:
        return "max_background"
    if (
        filters.min_tissue_fraction is not None
        and scores.tissue_fraction < filters.min_tissue_fraction
    ):
        return "min_tissue_fraction"
    if filters.min_blur is not None and scores.blur < filters.min_blur:
        return "min_blur"
    if filters.min_sharpness is not None and scores.sharpness < filters.min_sharpness:
        return "min_sharpness"
    return None
