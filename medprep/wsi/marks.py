"""Marks on the slide (pen ink, tissue folds, gaps) found on the mask-resolution image:
numpy arrays in and out.

Classical colour rules on the thumbnail (``wsi.tissue.mask_mpp``, 8 um/px by default),
cheap enough to run on every slide; the tiler maps each mask to tiles as the fraction of
the tile it covers (``pen_fraction``, ``fold_fraction``, ``gap_fraction``). Brightfield
only: on a fluorescence slide ink and folds do not look like this, and nothing is flagged.

- **marker ink**, by HSV colour: blue and green (no H&E stain has these hues), black (dark
  and grey, unlike the darkest haematoxylin, which stays purple) and red (far more
  saturated than eosin). Components smaller than ``MIN_INK_PIXELS`` are dropped.
- **tissue folds**: doubled tissue is darker and more saturated than any single layer;
  pixels well below the slide's own tissue brightness and highly saturated, inside tissue.
- **gaps**: glass (unsaturated and bright) inside the filled tissue outline: cracks,
  tears, the clear centre of air bubbles, and lumens (which is why it is never a default
  filter).

Thresholds are in HSV units of 0-1 (hue in degrees) and were set on the fixtures: no
clean H&E pixel of the CMU and TCGA slides passes the ink rules (see the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

FLAG_NAMES = ("pen", "fold", "gap")
FRACTION_NAMES = tuple(f"{name}_fraction" for name in FLAG_NAMES)
REJECT_REASONS = tuple(f"max_{name}" for name in FRACTION_NAMES)
FLAG_COLOURS = {"pen": (255, 0, 255), "fold": (255, 140, 0), "gap": (0, 200, 255)}
# A tile counts as flagged in the summary when at least this fraction of it is flagged.
FLAG_MIN_FRACTION = 0.05
# Smallest ink component kept (mask pixels; 4 = 16 x 16 um at 8 um/px).
MIN_INK_PIXELS = 4


@dataclass(frozen=True)
class Hsv:
    hue: np.ndarray  # degrees, 0-360
    saturation: np.ndarray  # 0-1
    value: np.ndarray  # 0-1


def to_hsv(rgb: np.ndarray) -> Hsv:
    """HSV of an H x W x 3 uint8 image, as float32 arrays."""
    x = rgb[..., :3].astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    high = np.maximum(np.maximum(r, g), b)  # x.max(axis=-1), without a slow 3-wide reduce
    low = np.minimum(np.minimum(r, g), b)
    delta = high - low
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(
        high == r,
        ((g - b) / safe) % 6.0,
        np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    return Hsv(hue.astype(np.float32), saturation.astype(np.float32), high)


def _hue_between(hue: np.ndarray, start: float, end: float) -> np.ndarray:
    if start <= end:
        return (hue >= start) & (hue <= end)
    return (hue >= start) | (hue <= end)  # wraps through 0


def ink_masks(hsv: Hsv) -> dict[str, np.ndarray]:
    """Per-colour marker ink masks (bool)."""
    h, s, v = hsv.hue, hsv.saturation, hsv.value
    return {
        "blue": _hue_between(h, 190, 250) & (s > 0.35) & (v > 0.15),
        "green": _hue_between(h, 70, 175) & (s > 0.25) & (v > 0.15),
        "black": ((v < 0.3) & (s < 0.4)) | (v < 0.12),
        "red": _hue_between(h, 345, 15) & (s > 0.65) & (v > 0.3),
    }


# Ink needs at least this saturation and value (the loosest of the coloured rules above);
# hue is computed only for such pixels (usually a minority: glass is unsaturated).
HUE_MIN_SATURATION = 0.25
HUE_MIN_VALUE = 0.15


@functools.lru_cache(maxsize=1)
def _saturation_value_tables() -> tuple[np.ndarray, np.ndarray]:
    """Saturation over (max channel, min channel) and value over the max channel, in
    float32 exactly as ``to_hsv`` computes them per pixel (it depends on nothing else)."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    high = levels[:, None]
    low = levels[None, :]
    delta = high - low
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    return saturation.astype(np.float32), levels


def fast_ink_masks(rgb: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``ink_masks(to_hsv(rgb))`` and the saturation and value arrays, the same values:
    saturation and value by table lookup, hue only where a coloured ink rule could pass."""
    rgb = rgb[..., :3]
    high = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    low = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    saturation_table, value_table = _saturation_value_tables()
    s = saturation_table[high, low]
    v = value_table[high]
    candidates = np.flatnonzero((s > HUE_MIN_SATURATION) & (v > HUE_MIN_VALUE))
    hue = to_hsv(rgb.reshape(-1, 3)[candidates][None]).hue[0]
    cs, cv = s.ravel()[candidates], v.ravel()[candidates]
    masks = {}
    for name, (start, end, min_s, min_v) in {
        "blue": (190, 250, 0.35, 0.15),
        "green": (70, 175, 0.25, 0.15),
        "red": (345, 15, 0.65, 0.3),
    }.items():
        flat = np.zeros(s.size, dtype=bool)
        flat[candidates] = _hue_between(hue, start, end) & (cs > min_s) & (cv > min_v)
        masks[name] = flat.reshape(s.shape)
    masks["black"] = ((v < 0.3) & (s < 0.4)) | (v < 0.12)
    return {k: masks[k] for k in ("blue", "green", "black", "red")}, s, v


def remove_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    if min_pixels <= 1 or not mask.any():
        return mask
    from scipy import ndimage

    # label only the bounding box of the mask (ink is usually a small part of a slide)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels, count = ndimage.label(mask[box], structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    out = np.zeros_like(mask)
    out[box] = keep[labels]
    return out


def detect_marks(
    rgb: np.ndarray,
    tissue: np.ndarray,
    scanned: np.ndarray | None = None,
    tissue_threshold: float = 20.0,
) -> dict[str, np.ndarray]:
    """Boolean masks ``pen``, ``fold`` and ``gap`` of a brightfield mask-resolution image.

    ``tissue`` is the tissue mask (filled, as preprocessing wrote it); ``tissue_threshold``
    the saturation threshold (0-255) it was made with; ``scanned`` marks pixels with data.
    """
    if scanned is None:
        scanned = np.ones(rgb.shape[:2], dtype=bool)
    inks, saturation, value = fast_ink_masks(rgb)
    pen = np.zeros(rgb.shape[:2], dtype=bool)
    for mask in inks.values():
        pen |= mask
    pen = remove_small(pen & scanned, MIN_INK_PIXELS)

    inside = tissue & scanned & ~pen
    fold = np.zeros_like(pen)
    if inside.any():
        # a fold is darker than nearly all of this slide's tissue and strongly stained
        typical = float(np.median(value[inside]))
        fold = inside & (value < min(0.5, typical - 0.3)) & (saturation > 0.6)
        fold = remove_small(fold, MIN_INK_PIXELS)
    gap = inside & (saturation * 255 <= tissue_threshold) & (value > 0.75)
    return {"pen": pen, "fold": fold, "gap": gap}


def tint(thumbnail: np.ndarray, flags: dict[str, np.ndarray], alpha: float = 0.55) -> np.ndarray:
    """The thumbnail with flagged areas blended towards their colour (``FLAG_COLOURS``)."""
    out = np.array(thumbnail[..., :3])  # a copy: the caller's thumbnail is not changed
    used = [(n, m) for n, m in flags.items() if m.shape == out.shape[:2] and m.any()]
    if not used:
        return out
    # only flagged pixels change: blend those in float32 (in the order of ``flags``)
    flagged = np.logical_or.reduce([mask for _, mask in used])
    blended = out[flagged].astype(np.float32)
    for name, mask in used:
        colour = np.asarray(FLAG_COLOURS[name], dtype=np.float32)
        part = mask[flagged]
        blended[part] = blended[part] * (1 - alpha) + colour * alpha
    out[flagged] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


def autocontrast(
    rgb: np.ndarray, scanned: np.ndarray | None = None, gamma: float = 0.5
) -> np.ndarray:
    """Stretch each channel's 0.5-99.5th percentile (over scanned pixels) to 0-1, then
    apply ``gamma`` (0.5 lifts the dim tissue well above the black glass).

    For fluorescence thumbnails and overlays, which are otherwise nearly black. A channel
    with no spread (an unused one) is left as it is; a single-dye image is shown as grey."""
    out = rgb[..., :3].copy()
    region = scanned if scanned is not None and scanned.any() else np.ones(rgb.shape[:2], bool)
    tops = [float(np.percentile(rgb[..., c][region], 99.5)) for c in range(3)]
    used = [c for c in range(3) if tops[c] >= max(tops) / 4]
    if len(used) == 1:  # one dye (DAPI, say): shown as grey, which the eye reads best
        rgb = np.repeat(rgb[..., used[0] : used[0] + 1], 3, axis=-1)
    for c in range(3):
        values = rgb[..., c][region]
        if values.size == 0:
            continue
        low, high = np.percentile(values, (0.5, 99.5))
        if high - low < 8:
            continue
        stretched = np.clip((rgb[..., c].astype(np.float32) - low) / (high - low), 0, 1)
        out[..., c] = np.round(255.0 * stretched**gamma).astype(np.uint8)
    return out


def flag_coverage(
    flags: dict[str, np.ndarray],
    grid,
    mask_downsample_x: float,
    mask_downsample_y: float,
    shape: tuple[int, int],
) -> dict[str, np.ndarray]:
    """Fraction of every grid tile covered by each flag mask (rows x cols per flag)."""
    from medprep.wsi.grid import mask_coverage

    out = {}
    for name in FLAG_NAMES:
        mask = flags.get(name)
        if mask is None or not mask.any():
            out[name] = np.zeros(grid.shape, dtype=np.float64)
            continue
        if mask.shape != tuple(shape):
            raise ValueError(f"{name} mask is {mask.shape}, the tissue mask {shape}")
        out[name] = mask_coverage(mask, grid, mask_downsample_x, mask_downsample_y)
    return out


def rejection_reason(fractions: dict[str, float], filters) -> str | None:
    """The first ``max_<flag>_fraction`` filter a tile fails, or None."""
    for name in FLAG_NAMES:
        limit = getattr(filters, f"max_{name}_fraction")
        if limit is not None and fractions.get(name, 0.0) > limit:
            return f"max_{name}_fraction"
    return None


def flagged(fractions: dict[str, float]) -> list[str]:
    """Flags covering at least ``FLAG_MIN_FRACTION`` of a tile (counted in the summary)."""
    return [name for name in FLAG_NAMES if fractions.get(name, 0.0) >= FLAG_MIN_FRACTION]
