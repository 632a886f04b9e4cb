"""QC picture: axial, coronal and sagittal mid-slices with the lung mask outlined."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

OUTLINE_RGB = (255, 64, 32)
PANEL_PX = 256


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    scaled = (hu.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _panel(hu2d, mask2d, pixel_mm: tuple[float, float], window) -> np.ndarray:
    from PIL import Image

    grey = _window(hu2d, window)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    mask2d = mask2d.astype(bool)
    outline = mask2d & ~ndimage.binary_erosion(mask2d)
    rgb[outline] = OUTLINE_RGB
    # physical aspect ratio, longest side PANEL_PX
    height_mm = hu2d.shape[0] * pixel_mm[0]
    width_mm = hu2d.shape[1] * pixel_mm[1]
    scale = PANEL_PX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
    canvas = np.zeros((PANEL_PX, PANEL_PX, 3), dtype=np.uint8)
    array = np.asarray(image)
    top = (PANEL_PX - array.shape[0]) // 2
    left = (PANEL_PX - array.shape[1]) // 2
    canvas[top : top + array.shape[0], left : left + array.shape[1]] = array
    return canvas


def qc_image(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    window: tuple[float, float] = (-1000.0, 400.0),
) -> np.ndarray:
    """RGB picture (256 x 768): the axial slice with the most lung, and the coronal and
    sagittal slices through its row and column with the most lung (the volume's centre
    without lungs); the mask is outlined. Coronal and sagittal views show the
    head end at the top."""
    # slice by slice: count_nonzero(axis=...) makes a volume-sized temporary
    per_slice = np.array([np.count_nonzero(plane) for plane in mask], dtype=np.int64)
    if per_slice.any():
        z = int(np.argmax(per_slice))  # the slice with the most lung
        rows = np.count_nonzero(mask[z], axis=1)
        cols = np.count_nonzero(mask[z], axis=0)
        centre = [z, int(np.argmax(rows)), int(np.argmax(cols))]
    else:
        centre = [n // 2 for n in hu.shape]
    z, y, x = centre
    sz, sy, sx = spacing
    # the first slice is at the lowest position along the normal: flip so head is on top
    panels = [
        _panel(hu[z], mask[z], (sy, sx), window),
        _panel(hu[::-1, y, :], mask[::-1, y, :], (sz, sx), window),
        _panel(hu[::-1, :, x], mask[::-1, :, x], (sz, sy), window),
    ]
    return np.concatenate(panels, axis=1)
