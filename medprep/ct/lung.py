"""Lung mask after the DSB 2017 reference method, made robust.

Reference: threshold at -320 HU; the air component of one corner voxel is the outside; fill
lung structures slice by slice; keep the largest 3D component. Here:

1. air = HU below ``threshold_hu``;
2. outside air = 3D air components touching any side face of the volume (rows/columns
   borders of every slice), not one corner voxel; the top and bottom faces are not seeds,
   because the trachea and lungs may touch them;
3. per axial slice, tissue enclosed by the remaining (inner) air is filled in (vessels,
   nodules, airway walls), as the reference's slice-by-slice fill does;
4. 3D components: the largest is kept, and the second largest too when it holds at least
   ``second_lung_fraction`` of the largest (the two lungs, when they are not joined by the
   airways); smaller pockets (bowel gas, the trachea alone) are dropped;
5. optional dilation by ``dilation_mm``;
6. a kept volume below ``no_lungs_below_ml`` whose largest axial cross-section is also below
   40 cm2 means status ``no_lungs`` (e.g. a head CT) and an empty mask (a few slices through
   a chest keep their lungs: small volume, large cross-section); a volume outside
   [min_volume_ml, max_volume_ml] is a QC flag.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# A short scan through the chest holds little lung volume but a large cross-section; sinus
# and mastoid air in a head CT has neither.
NO_LUNGS_MAX_AREA_CM2 = 40.0

IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class LungSettings:
    threshold_hu: float = -320.0
    dilation_mm: float = 0.0
    min_volume_ml: float = 500.0
    max_volume_ml: float = 8000.0
    no_lungs_below_ml: float = 100.0
    second_lung_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class LungResult:
    mask: np.ndarray  # uint8, 1 = lung
    status: str  # "ok" or "no_lungs"
    volume_ml: float
    components: list[dict]  # the largest candidate components: volume_ml, kept
    peak_area_cm2: float  # largest axial cross-section of the kept components
    qc_flags: list[str]
    bbox: tuple[slice, slice, slice] | None  # of the mask


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3D mask, or None if there is none."""
    along_z = np.flatnonzero(mask.any(axis=(1, 2)))
    if along_z.size == 0:
        return None
    z0, z1 = int(along_z[0]), int(along_z[-1]) + 1
    plane = mask[z0:z1].any(axis=0)
    ys = np.flatnonzero(plane.any(axis=1))
    xs = np.flatnonzero(plane.any(axis=0))
    return (slice(z0, z1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))


def _border_labels(labels: np.ndarray) -> np.ndarray:
    faces = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    touching = np.unique(np.concatenate([f.ravel() for f in faces]))
    return touching[touching > 0]


def inner_air(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air below ``threshold_hu`` that is not connected to the volume's side faces."""
    air = hu < threshold_hu
    labels, count = ndimage.label(air)
    outside = np.zeros(count + 1, dtype=bool)
    outside[_border_labels(labels)] = True
    inner = air
    inner &= ~outside[labels]
    return inner


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill, in every axial slice, what ``mask`` encloses (holes not reaching the border)."""
    box = bounding_box(mask)
    if box is None:
        return mask
    # one voxel of margin in-plane keeps the region around the mask connected to the border
    zs = box[0]
    ys = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, mask.shape[1]))
    xs = slice(max(box[2].start - 1, 0), min(box[2].stop + 1, mask.shape[2]))
    sub = mask[zs, ys, xs]
    labels, count = ndimage.label(~sub, structure=IN_PLANE)
    open_region = np.zeros(count + 1, dtype=bool)
    open_region[_border_labels(labels)] = True
    open_region[0] = True
    filled = mask.copy()
    filled[zs, ys, xs] |= ~open_region[labels]
    return filled


def _dilate(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float):
    box = bounding_box(mask)
    if box is None or radius_mm <= 0:
        return mask
    pad = [int(np.ceil(radius_mm / s)) for s in spacing]
    region = tuple(
        slice(max(b.start - p, 0), min(b.stop + p, n))
        for b, p, n in zip(box, pad, mask.shape, strict=True)
    )
    distance = ndimage.distance_transform_edt(~mask[region], sampling=spacing)
    out = mask.copy()
    out[region] = distance <= radius_mm
    return out


def lung_mask(
    hu: np.ndarray, spacing: tuple[float, float, float], settings: LungSettings | None = None
) -> LungResult:
    """Lung mask of an HU volume (z, y, x) with voxel ``spacing`` (z, y, x mm)."""
    settings = settings or LungSettings()
    voxel_ml = float(np.prod(spacing)) / 1000.0
    inner = inner_air(hu, settings.threshold_hu)
    box = bounding_box(inner)
    mask = np.zeros(hu.shape, dtype=bool)
    components: list[dict] = []
    if box is not None:
        candidates = fill_slices(inner[box])
        del inner
        labels, count = ndimage.label(candidates)
        del candidates
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        keep = [int(order[0]) + 1]
        if count > 1 and sizes[order[1]] >= settings.second_lung_fraction * sizes[order[0]]:
            keep.append(int(order[1]) + 1)
        components = [
            {"volume_ml": round(float(sizes[i]) * voxel_ml, 1), "kept": int(i) + 1 in keep}
            for i in order[:5]
        ]
        kept_lookup = np.zeros(count + 1, dtype=bool)
        kept_lookup[keep] = True
        mask[box] = kept_lookup[labels]
        del labels
    if settings.dilation_mm > 0:
        mask = _dilate(mask, spacing, settings.dilation_mm)
    volume_ml = float(np.count_nonzero(mask)) * voxel_ml
    per_slice = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    peak_area_cm2 = float(per_slice.max(initial=0)) * spacing[1] * spacing[2] / 100.0
    qc_flags: list[str] = []
    status = "ok"
    if volume_ml < settings.no_lungs_below_ml and peak_area_cm2 < NO_LUNGS_MAX_AREA_CM2:
        status = "no_lungs"
        qc_flags.append("no_lungs")
        mask[:] = False
        volume_ml = 0.0
    else:
        if volume_ml < settings.min_volume_ml:
            qc_flags.append("lung_volume_low")
        if volume_ml > settings.max_volume_ml:
            qc_flags.append("lung_volume_high")
        if mask[0].any() or mask[-1].any():
            qc_flags.append("lungs_touch_scan_end")
    return LungResult(
        mask=mask.view(np.uint8),
        status=status,
        volume_ml=volume_ml,
        components=components,
        peak_area_cm2=round(peak_area_cm2, 2),
        qc_flags=qc_flags,
        bbox=bounding_box(mask) if status == "ok" else None,
    )
