"""Per-tile quality scores and the optional filters on them.

Scores, all from the tile's own pixels (a tile's scores can be recomputed from its image):

- ``tissue_fraction``: pixels whose tissue score (saturation for brightfield, brightness
  for fluorescence) is above the slide's tissue threshold from preprocessing.
- ``background_fraction``: white (every channel >= ``WHITE_LEVEL``) or black (every
  channel <= ``BLACK_LEVEL``) pixels; also reported apart as ``white_fraction`` and
  ``black_fraction``.
- ``blur``: variance of the 4-neighbour Laplacian of the grey image over the tile's
  interior; low = out of focus or featureless.

The fractions are estimated on a regular grid of pixels (every 4th pixel in each
direction for tiles of 256 pixels or more, 4096 samples; denser for smaller tiles), which
moves them by far less than any useful filter threshold and keeps the scores cheap next
to reading and encoding. The blur score uses every pixel.
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
REJECT_REASONS = ("max_background", "min_tissue_fraction", "min_blur")

SCORE_NAMES = ("tissue_fraction", "background_fraction", "white_fraction", "black_fraction", "blur")


@dataclass(frozen=True)
class TileScores:
    tissue_fraction: float
    background_fraction: float
    white_fraction: float
    black_fraction: float
    blur: float

    def as_tuple(self) -> tuple[float, ...]:
        return (
            self.tissue_fraction,
            self.background_fraction,
            self.white_fraction,
            self.black_fraction,
            self.blur,
        )


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a 2-D grey image."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    g = gray.astype(np.int16)
    neighbours = np.add(g[:-2, 1:-1], g[2:, 1:-1])
    neighbours += g[1:-1, :-2]
    neighbours += g[1:-1, 2:]
    lap = np.multiply(g[1:-1, 1:-1], 4)
    lap -= neighbours
    flat = lap.astype(np.float32).ravel()
    n = flat.size
    mean = float(flat.sum(dtype=np.float64)) / n
    return max(float(np.dot(flat, flat)) / n - mean * mean, 0.0)


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
    rgb: np.ndarray, tissue_mode: str, tissue_threshold: float, gray: np.ndarray | None = None
) -> TileScores:
    """QC scores of one H x W x 3 (or x 4, the 4th channel ignored) uint8 tile.

    ``gray`` is the tile's ``gray_levels`` if the caller already has them (a view into
    the grey image of a whole block, say); computed here otherwise.
    """
    step = sampling_step(min(rgb.shape[0], rgb.shape[1]))
    sample = rgb[::step, ::step]
    high = np.maximum(np.maximum(sample[..., 0], sample[..., 1]), sample[..., 2])
    low = np.minimum(np.minimum(sample[..., 0], sample[..., 1]), sample[..., 2])
    n = high.size
    white = np.count_nonzero(low >= WHITE_LEVEL) / n
    black = np.count_nonzero(high <= BLACK_LEVEL) / n
    if tissue_mode == "fluorescence":
        tissue = np.count_nonzero(high > tissue_threshold) / n
    else:
        tissue = np.count_nonzero(_saturated(tissue_threshold)[high, low]) / n
    blur = laplacian_variance(gray_levels(rgb) if gray is None else gray)
    return TileScores(float(tissue), float(white + black), float(white), float(black), blur)


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
    return None
