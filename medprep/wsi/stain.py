"""Stain vectors of brightfield H&E slides, and what a loader does with them.

Macenko's method (Macenko et al., ISBI 2009): in optical density (OD, ``-log(I / Io)``)
every pixel of a two-stain image is a non-negative mix of two stain vectors, so tissue
pixels lie in a wedge of a plane. The plane is spanned by the two leading eigenvectors
of the pixels' OD covariance; the stain vectors are the directions at the ``alpha`` and
``100 - alpha`` percentiles of the pixels' angles in that plane (the wedge's edges); the
vector with more red absorption is haematoxylin. A pixel's concentrations are its OD
unmixed by the vectors; the 99th percentile of each stain's concentration sets the
stain's strength.

Estimated once per slide (``medprep.wsi.preprocess``), the vectors make normalising or
augmenting a tile one 3 x 3 matrix product in OD:

- normalise: ``OD' = V_target diag(max_target / max_source) V_source^+ OD``;
- augment: the concentrations ``C = V_source^+ OD`` become ``a * C + b`` with a random
  scale ``a`` and shift ``b`` per stain (Tellez et al.'s HED jitter, on the slide's own
  vectors): ``OD' = OD + V_source ((a - 1) * C + b)``.

Normalising drops the part of OD that the two stains do not explain, as Macenko's
reconstruction does (and torchstain, TIAToolbox), so a tile normalised to its own
slide's stains is its projection on the stains' plane, not itself; augmenting keeps that
part, so a scale of 1 and a shift of 0 give the tile back. Everything here takes and
returns plain arrays.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

# Transmitted light intensity (the brightest glass) and the OD below which, on any
# channel, a pixel is taken as transparent: Macenko's values, with which the reference
# H&E below was computed.
IO = 240.0
BETA = 0.15
# Percentile of the angle extremes (robust to a few stray pixels).
ALPHA = 1.0
# The stain strength: this percentile of each stain's concentration.
MAX_PERCENTILE = 99.0

# Fewer tissue pixels than this (above BETA on every channel) give no estimate.
MIN_PIXELS = 1000
# Stain vectors closer than this are one stain (the reference H and E are 22.3 degrees apart).
MIN_ANGLE_DEG = 6.0


@dataclass(frozen=True)
class StainVectors:
    """Haematoxylin and eosin: unit OD vectors (R, G, B) and their strengths (the
    ``MAX_PERCENTILE`` of their concentrations)."""

    h: tuple[float, float, float]
    e: tuple[float, float, float]
    max_h: float
    max_e: float

    @property
    def matrix(self) -> np.ndarray:
        """The 3 x 2 mixing matrix: columns H and E."""
        return np.array([self.h, self.e], dtype=np.float64).T

    @property
    def max_concentrations(self) -> np.ndarray:
        return np.array([self.max_h, self.max_e], dtype=np.float64)

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "h": [round(v, 6) for v in self.h],
            "e": [round(v, 6) for v in self.e],
            "max_concentrations": [round(self.max_h, 6), round(self.max_e, 6)],
        }

    @classmethod
    def from_dict(cls, value: dict) -> StainVectors:
        """From ``as_dict``'s form: ``{"h": [r, g, b], "e": [r, g, b],
        "max_concentrations": [h, e]}``."""
        h, e = _unit(value["h"]), _unit(value["e"])
        max_h, max_e = (float(v) for v in value["max_concentrations"])
        if not (max_h > 0 and max_e > 0):
            raise ValueError(f"stain max_concentrations must be positive, got {max_h}, {max_e}")
        return cls(h, e, max_h, max_e)

    @property
    def angle_deg(self) -> float:
        cosine = float(np.clip(np.dot(self.h, self.e), -1.0, 1.0))
        return math.degrees(math.acos(cosine))


def _unit(vector) -> tuple[float, float, float]:
    array = np.asarray(vector, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(array))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"a stain vector must be three finite numbers, not all 0: {vector}")
    return tuple(float(v) for v in array / norm)  # type: ignore[return-value]


# Macenko's reference H&E (the values of his reference implementation).
REFERENCE = StainVectors(
    h=(0.5626, 0.7201, 0.4062), e=(0.2159, 0.8012, 0.5581), max_h=1.9705, max_e=1.0308
)


@dataclass(frozen=True)
class StainEstimate:
    """What Macenko's method made of a set of pixels: the vectors, or why there are none."""

    vectors: StainVectors | None
    pixels: int  # pixels used: above BETA on every channel
    reason: str | None = None  # why there are no vectors

    def summary(self, **source) -> dict:
        """The record of ``preprocess/summary.json``; ``source``: where the pixels came from."""
        return {
            "method": "macenko",
            **source,
            "status": "ok" if self.vectors is not None else "degenerate",
            "reason": self.reason,
            "pixels": self.pixels,
            "angle_deg": round(self.vectors.angle_deg, 3) if self.vectors else None,
            **(self.vectors.as_dict() if self.vectors else {}),
            "io": IO,
            "beta": BETA,
            "alpha": ALPHA,
        }


@functools.lru_cache(maxsize=4)
def od_table(io: float = IO) -> np.ndarray:
    """OD of each uint8 value: ``-log((v + 1) / io)`` (float32, 256 entries)."""
    return (-np.log((np.arange(256, dtype=np.float64) + 1.0) / io)).astype(np.float32)


def optical_density(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """OD of uint8 RGB pixels (``(..., 3)``; a 4th channel is ignored), float32."""
    return od_table(io)[rgb[..., :3]]


def estimate(
    od: np.ndarray,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    min_pixels: int = MIN_PIXELS,
    min_angle_deg: float = MIN_ANGLE_DEG,
) -> StainEstimate:
    """Macenko's stain vectors of ``od`` (N x 3 optical densities of tissue pixels).

    The vectors come from the pixels above ``beta`` on every channel; the strengths
    (``MAX_PERCENTILE`` of each stain's concentration) from all of ``od``.

    Never raises on the data: too few stained pixels, a single stain, or concentrations
    that are not positive give an estimate without vectors and the reason.
    """
    every = np.asarray(od, dtype=np.float32).reshape(-1, 3)
    channels = [np.ascontiguousarray(every[:, c]) for c in range(3)]
    return _estimate(channels, alpha, beta, min_pixels, min_angle_deg)


def _estimate(
    channels: list[np.ndarray], alpha: float, beta: float, min_pixels: int, min_angle_deg: float
) -> StainEstimate:
    """``estimate`` on one contiguous float32 OD array per channel: sums of the three run
    10-20x faster than a matrix product with a 3 x 2 operand on millions of rows."""
    keep = (channels[0] >= beta) & (channels[1] >= beta) & (channels[2] >= beta)
    n = int(np.count_nonzero(keep))
    if n < min_pixels:
        return StainEstimate(
            None, n, f"too little stained tissue ({n} pixels above OD {beta}, {min_pixels} needed)"
        )
    stained = np.stack([c[keep] for c in channels])  # 3 x n
    centred = stained - stained.mean(axis=1, keepdims=True)
    covariance = (centred @ centred.T).astype(np.float64) / max(n - 1, 1)
    del centred
    _, eigenvectors = np.linalg.eigh(covariance)
    first, second = eigenvectors[:, 2], eigenvectors[:, 1]
    first = first if first.sum() >= 0 else -first  # into the positive octant: no angle wrap
    plane = np.column_stack([first, second])
    angles = np.arctan2(_combine(stained, plane[:, 1]), _combine(stained, plane[:, 0]))
    del stained
    low, high = np.percentile(angles, [alpha, 100.0 - alpha])
    candidates = [plane @ np.array([math.cos(a), math.sin(a)]) for a in (low, high)]
    candidates = [v if v.sum() >= 0 else -v for v in candidates]
    h, e = sorted(candidates, key=lambda v: -v[0])  # haematoxylin absorbs more red
    angle = math.degrees(math.acos(float(np.clip(np.dot(h, e), -1.0, 1.0))))
    if angle < min_angle_deg:
        return StainEstimate(
            None,
            n,
            f"one stain: the two stain directions are {angle:.1f} degrees apart "
            f"(under {min_angle_deg:g})",
        )
    # strengths over every pixel given, faint ones included, as Macenko's reference does
    unmix = np.linalg.pinv(np.column_stack([h, e]))
    max_h, max_e = (
        float(np.percentile(_combine(channels, unmix[k]), MAX_PERCENTILE)) for k in range(2)
    )
    if not (max_h > 0 and max_e > 0):
        return StainEstimate(
            None, n, f"stain concentrations are not positive ({max_h:.3g}, {max_e:.3g})"
        )
    vectors = StainVectors(
        tuple(float(v) for v in h),  # type: ignore[arg-type]
        tuple(float(v) for v in e),  # type: ignore[arg-type]
        float(max_h),
        float(max_e),
    )
    return StainEstimate(vectors, n)


def _combine(channels, weights) -> np.ndarray:
    """``sum_c weights[c] * channels[c]`` over three channel arrays (float32)."""
    out = channels[0] * np.float32(weights[0])
    out += channels[1] * np.float32(weights[1])
    out += channels[2] * np.float32(weights[2])
    return out


def estimate_rgb(
    rgb: np.ndarray,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    min_pixels: int = MIN_PIXELS,
    min_angle_deg: float = MIN_ANGLE_DEG,
) -> StainEstimate:
    """``estimate`` on uint8 RGB pixels (any shape ending in 3 or 4)."""
    flat = rgb.reshape(-1, rgb.shape[-1])
    table = od_table()
    channels = [np.take(table, flat[:, c]) for c in range(3)]
    return _estimate(channels, alpha, beta, min_pixels, min_angle_deg)


def normalisation_matrix(source: StainVectors, target: StainVectors = REFERENCE) -> np.ndarray:
    """The 3 x 3 matrix taking a pixel's OD from ``source`` stains to ``target`` stains."""
    scale = np.diag(target.max_concentrations / source.max_concentrations)
    return target.matrix @ scale @ np.linalg.pinv(source.matrix)


def augmentation_matrix(
    source: StainVectors, scale: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(M, offset)`` with ``OD' = M OD + offset``: concentrations times ``scale`` plus
    ``shift`` (per stain, H then E; ``shift`` in units of the stain's strength); the part
    of OD the two stains do not explain is kept."""
    mixing = source.matrix
    change = np.diag(np.asarray(scale, np.float64) - 1.0)
    matrix = np.eye(3) + mixing @ change @ np.linalg.pinv(mixing)
    offset = mixing @ (np.asarray(shift, np.float64) * source.max_concentrations)
    return matrix, offset


def random_augmentation(
    rng: np.random.Generator, sigma_scale: float, sigma_shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """A scale in ``1 +- sigma_scale`` and a shift in ``+- sigma_shift`` per stain (uniform)."""
    scale = rng.uniform(1.0 - sigma_scale, 1.0 + sigma_scale, 2)
    shift = rng.uniform(-sigma_shift, sigma_shift, 2)
    return scale, shift


def od_matrix_tables(
    matrix: np.ndarray, offset: np.ndarray | None = None, io: float = IO
) -> np.ndarray:
    """Tables ``T[k, c, v]`` (3 x 3 x 256, float32) such that the output intensity of
    channel ``k`` is ``T[k, 0, r] * T[k, 1, g] * T[k, 2, b]``.

    ``io * exp(-(M od + offset)_k)`` is a product over the input channels ``c`` of
    ``exp(-M[k, c] od(v_c))`` (``io * exp(-offset_k)`` folded into ``c = 0``), and each
    factor depends on one uint8 value: so the map costs nine table lookups per pixel and
    no logarithm or exponential per pixel.
    """
    od = od_table(io).astype(np.float64)
    tables = np.exp(-np.asarray(matrix, np.float64)[:, :, None] * od[None, None, :])
    scale = io * np.exp(-np.zeros(3) if offset is None else -np.asarray(offset, np.float64))
    tables[:, 0, :] *= scale[:, None]
    return tables.astype(np.float32)


def apply_od_matrix(
    rgb: np.ndarray, matrix: np.ndarray, offset: np.ndarray | None = None, io: float = IO
) -> np.ndarray:
    """``rgb`` (H x W x 3 or 4 uint8) with every pixel's OD mapped by ``matrix`` (and
    ``offset``), back to uint8 RGB (H x W x 3), values above 255 clipped."""
    tables = od_matrix_tables(matrix, offset, io)
    flat = rgb.reshape(-1, rgb.shape[-1])
    channels = [np.ascontiguousarray(flat[:, c]) for c in range(3)]
    out = np.empty((3, len(flat)), np.float32)
    for k in range(3):
        np.take(tables[k, 0], channels[0], out=out[k])
        out[k] *= np.take(tables[k, 1], channels[1])
        out[k] *= np.take(tables[k, 2], channels[2])
    np.minimum(out, 255.0, out=out)
    return out.T.astype(np.uint8).reshape(*rgb.shape[:-1], 3)


def normalise(
    rgb: np.ndarray, source: StainVectors, target: StainVectors = REFERENCE
) -> np.ndarray:
    """``rgb`` (uint8) as if stained like ``target``, given its own stains ``source``."""
    return apply_od_matrix(rgb, normalisation_matrix(source, target))


def augment(
    rgb: np.ndarray,
    source: StainVectors,
    rng: np.random.Generator,
    sigma_scale: float = 0.2,
    sigma_shift: float = 0.0,
) -> np.ndarray:
    """``rgb`` (uint8) with its H and E concentrations scaled and shifted at random."""
    scale, shift = random_augmentation(rng, sigma_scale, sigma_shift)
    matrix, offset = augmentation_matrix(source, scale, shift)
    return apply_od_matrix(rgb, matrix, offset)


def sample_tissue_pixels(
    mask: np.ndarray, count: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of up to ``count`` distinct pixels of ``mask`` (bool), drawn at
    random with ``seed`` and returned in row-major order (reads then go down the slide)."""
    flat = np.flatnonzero(mask)
    if len(flat) > count:
        flat = np.sort(np.random.default_rng(seed).choice(flat, count, replace=False))
    rows, cols = np.unravel_index(flat, mask.shape)
    return rows, cols
