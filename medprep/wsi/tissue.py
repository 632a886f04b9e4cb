"""Tissue detection on a low-resolution RGB image: numpy arrays in, numpy arrays out.

Brightfield (H&E, IHC): tissue is coloured on a bright, grey-white background, so the
score is HSV saturation. Fluorescence: tissue is bright on a dark background, so the score
is brightness (the largest channel). Either way: Otsu threshold on the scanned pixels
(bounded below by ``min_threshold`` so a blank slide does not turn noise into tissue),
then closing, hole filling and removal of small pieces, with sizes given in microns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology

from medprep.wsi.settings import TissueSettings

# Median brightness (largest channel, 0-255) of the scanned pixels below which a slide is
# taken as fluorescence. Brightfield slides are mostly near-white glass (230-250) and even
# a crop full of tissue stays far above this; fluorescence backgrounds are below 40.
FLUORESCENCE_MAX_MEDIAN_BRIGHTNESS = 100


@dataclass(frozen=True)
class TissueResult:
    mask: np.ndarray  # bool, True = tissue
    mode: str  # brightfield or fluorescence (as used, after detection)
    mode_detected: bool  # True when mode came from ``auto``
    threshold: float  # threshold applied to the score
    otsu_threshold: float | None  # Otsu's value before the lower bound (None if fixed)
    tissue_fraction: float  # of all mask pixels

    def thresholds(self) -> dict[str, float | None]:
        return {"threshold": self.threshold, "otsu_threshold": self.otsu_threshold}


def max_channel(rgb: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def min_channel(rgb: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0-255 (uint8); 0 for black pixels."""
    high = max_channel(rgb).astype(np.uint16)
    low = min_channel(rgb)
    # (high - low) * 255 + high / 2 <= 65152 fits in 16 bits: half the memory of int32
    numerator = (high - low) * 255 + high // 2
    out = np.zeros(high.shape, dtype=np.uint8)
    np.floor_divide(numerator, high, out=out, where=high > 0, casting="unsafe")
    return out


def detect_mode(rgb: np.ndarray, scanned: np.ndarray | None = None) -> str:
    """``fluorescence`` when the scanned area is mostly dark, else ``brightfield``."""
    brightness = max_channel(rgb)
    values = brightness[scanned] if scanned is not None else brightness.ravel()
    if values.size == 0:
        return "brightfield"
    return (
        "fluorescence" if np.median(values) < FLUORESCENCE_MAX_MEDIAN_BRIGHTNESS else "brightfield"
    )


def tissue_score(rgb: np.ndarray, mode: str) -> np.ndarray:
    """Per-pixel tissue evidence, uint8: saturation (brightfield) or brightness (fluorescence)."""
    if mode == "brightfield":
        return saturation(rgb)
    if mode == "fluorescence":
        return max_channel(rgb)
    raise ValueError(f"unknown tissue mode {mode!r}")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the class boundary: tissue is ``> threshold``)."""
    if values.size == 0:
        return 255.0
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    if np.count_nonzero(histogram) < 2:
        return float(values.flat[0])
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(hist=(histogram, np.arange(256))))


# Up to this radius closing uses a disk footprint (bools only, fast for small disks);
# above it, distance transforms (the same result, time linear in pixels whatever the
# radius, but about 40 bytes per pixel of temporary memory).
DIRECT_CLOSING_MAX_RADIUS = 12


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk of ``radius`` pixels, the image surrounded by background
    (so tissue touching the image edge is not eroded away)."""
    if radius <= 0 or not mask.any() or mask.all():
        return mask.copy()
    pad = radius + 1
    padded = np.pad(mask, pad, mode="constant", constant_values=False)
    if radius <= DIRECT_CLOSING_MAX_RADIUS:
        # binary morphology of scipy.ndimage, to which skimage's deprecated binary_closing
        # delegated; its grey-level closing gives the same mask 2-4x slower
        footprint = morphology.disk(radius, dtype=bool)
        dilated = ndimage.binary_dilation(padded, footprint)
        closed = ndimage.binary_erosion(dilated, footprint, border_value=1)
    else:
        closed = morphology.isotropic_closing(padded, radius)
    return closed[pad:-pad, pad:-pad]


def remove_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_pixels``."""
    # skimage removes components of at most max_size pixels: those below ceil(min_pixels)
    return morphology.remove_small_objects(
        mask, max_size=max(0, math.ceil(min_pixels) - 1), connectivity=2
    )


def detect_tissue(
    rgb: np.ndarray,
    settings: TissueSettings,
    mask_mpp: float,
    scanned: np.ndarray | None = None,
) -> TissueResult:
    """Tissue mask of a low-resolution RGB image whose pixels are ``mask_mpp`` microns.

    ``scanned`` marks pixels with slide data (False where the scanner captured nothing);
    they never count as tissue and do not take part in Otsu or mode detection.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {rgb.shape} {rgb.dtype}")
    if scanned is None:
        scanned = np.ones(rgb.shape[:2], dtype=bool)
    detected = settings.mode == "auto"
    mode = detect_mode(rgb, scanned) if detected else settings.mode
    score = tissue_score(rgb, mode)
    if settings.threshold is not None:
        otsu = None
        threshold = float(settings.threshold)
    else:
        otsu = otsu_threshold(score[scanned])
        threshold = max(otsu, float(settings.min_threshold))
    mask = (score > threshold) & scanned
    mask = closing(mask, round(settings.closing_um / mask_mpp))
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_objects(mask, settings.min_object_um2 / (mask_mpp * mask_mpp))
    mask &= scanned
    fraction = float(mask.mean()) if mask.size else 0.0
    return TissueResult(mask, mode, detected, threshold, otsu, fraction)
