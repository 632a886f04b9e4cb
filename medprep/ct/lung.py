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
5. the two lungs are told apart, and each lung's pockets are filled (below);
6. optional dilation by ``dilation_mm``;
7. a kept volume below ``no_lungs_below_ml`` whose largest axial cross-section is also below
   40 cm2 means status ``no_lungs`` (e.g. a head CT) and an empty mask (a few slices through
   a chest keep their lungs: small volume, large cross-section); a volume outside
   [min_volume_ml, max_volume_ml] is a QC flag.

Nodule-preserving pockets (step 5). The threshold boundary follows the pleura, so solid
tissue that touches a lung from inside and reaches the chest wall or the mediastinum (a
juxta-pleural nodule) is carved out of the mask, although the lung surrounds it on most
sides. Each lung gets a 3D morphological closing with a ball of ``closing_radius_mm`` (a
rolling ball over its boundary): the closing marks the pockets, dents of the lung surface
the ball cannot enter. A pocket is filled when its extent is at most ``pocket_max_mm`` in
every axis (nodules up to about 30 mm); larger pockets (the hilum, the heart's and the
aorta's impressions, the diaphragm) are left alone, so the heart, mediastinum, chest wall
and bowel stay out. The closing runs per lung (never across the mediastinum between them)
on a grid of ``grid_mm`` (distances in mm, so anisotropic voxels are handled), and the
filled voxels are decided at full resolution by interpolating the closing's distance map.

The lungs are told apart by eroding the mask (distance inside it) until it falls into two
large cores (airways and thin junctions break first); every voxel belongs to the nearer
core. Left and right volumes come from this split; a mask that never splits is one lung.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from medprep.common import statuses
from medprep.ct.patches import bounding_box  # noqa: F401 (also used as lung.bounding_box)
from medprep.ct.settings import LungSettings  # noqa: F401 (also used as lung.LungSettings)

# A short scan through the chest holds little lung volume but a large cross-section; sinus
# and mastoid air in a head CT has neither.
NO_LUNGS_MAX_AREA_CM2 = 40.0

CHUNK_SLICES = 32  # slabs for element-wise passes over a whole volume
SLAB_SLICES = 4  # slabs of per-slice labelling (temporaries below the mmap threshold)
CAP_MIN_MM3 = 500.0  # pockets this large (a 10 mm sphere) are filled with the larger ball

IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class LungResult:
    mask: np.ndarray  # uint8, 1 = lung
    status: str  # statuses.OK or statuses.NO_LUNGS
    volume_ml: float
    components: list[dict]  # the largest candidate components: volume_ml, kept
    peak_area_cm2: float  # largest axial cross-section of the kept components
    qc_flags: list[str]
    bbox: tuple[slice, slice, slice] | None  # of the mask
    construction: dict = dataclasses.field(default_factory=dict)  # how the mask was built
    left_volume_ml: float | None = None
    right_volume_ml: float | None = None


def label(mask: np.ndarray, structure=None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into uint16 when the components fit (half the memory and traffic
    of int32 on a whole volume), else int32."""
    try:
        out = np.empty(mask.shape, dtype=np.uint16)
        count = ndimage.label(mask, structure=structure, output=out)
    except RuntimeError:  # more than 65535 components
        out, count = ndimage.label(mask, structure=structure)
    return out, int(count)


def _border_labels(labels: np.ndarray) -> np.ndarray:
    faces = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    touching = np.unique(np.concatenate([f.ravel() for f in faces]))
    return touching[touching > 0]


def inner_air(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Air below ``threshold_hu`` that is not connected to the volume's side faces (a
    whole-volume mask; see ``inner_air_box``)."""
    box, sub = inner_air_box(hu, threshold_hu)
    inner = np.zeros(hu.shape, dtype=bool)
    if box is not None:
        inner[box] = sub
    return inner


def inner_air_box(
    hu: np.ndarray, threshold_hu: float
) -> tuple[tuple[slice, ...] | None, np.ndarray]:
    """(box, mask in the box) of the air below ``threshold_hu`` not connected (6-connected,
    in 3D) to the volume's side faces; (None, empty) when there is none.

    Only the rows and columns holding tissue (plus one of air around them) are looked at:
    what lies beyond them is air from top to bottom touching the side faces, so an air
    component reaching the crop's side is outside, as it would be in the whole volume.

    In two passes, so that no label array spans the crop: (1) slab by slab, the air of
    each slice connected within the slice to its border (most of the outside air) is
    removed; (2) the rest is labelled in 3D in its bounding box, and a component is
    outside too if it touches removed air in the slice above or below (it cannot touch
    it within a slice: it would belong to it). This is the 3D labelling of all air,
    exactly, at a third less memory."""
    empty = (None, np.zeros((0, 0, 0), dtype=bool))
    rows = np.zeros(hu.shape[1], dtype=bool)
    cols = np.zeros(hu.shape[2], dtype=bool)
    for z in range(0, hu.shape[0], CHUNK_SLICES):
        tissue = hu[z : z + CHUNK_SLICES] >= threshold_hu
        rows |= tissue.any(axis=(0, 2))
        cols |= tissue.any(axis=(0, 1))
    if not rows.any():
        return empty
    ys = np.flatnonzero(rows)
    xs = np.flatnonzero(cols)
    crop = (
        slice(max(int(ys[0]) - 1, 0), min(int(ys[-1]) + 2, hu.shape[1])),
        slice(max(int(xs[0]) - 1, 0), min(int(xs[-1]) + 2, hu.shape[2])),
    )
    view = hu[:, crop[0], crop[1]]
    rest = np.empty(view.shape, dtype=bool)  # air not joined to the border in its slice
    for z in range(0, view.shape[0], SLAB_SLICES):
        air = view[z : z + SLAB_SLICES] < threshold_hu
        labels, count = label(air, structure=IN_PLANE)
        border = np.zeros(count + 1, dtype=bool)
        border[_border_labels(labels)] = True
        np.logical_and(air, ~border[labels], out=rest[z : z + SLAB_SLICES])
    box = bounding_box(rest)
    if box is None:
        return empty
    sub = np.ascontiguousarray(rest[box])
    del rest
    labels, count = label(sub)
    outside = np.zeros(count + 1, dtype=bool)
    # the box in the volume (sub index k is volume slice z0 + k)
    full = (
        box[0],
        slice(crop[0].start + box[1].start, crop[0].start + box[1].stop),
        slice(crop[1].start + box[2].start, crop[1].start + box[2].stop),
    )
    z0 = box[0].start
    depth = sub.shape[0]
    for k0 in range(0, depth, SLAB_SLICES):
        k1 = min(k0 + SLAB_SLICES, depth)
        for dz in (-1, 1):
            # removed air in the neighbouring slices k + dz (sub index; the box holds all
            # of the rest, so beyond it every air voxel was removed)
            lo, hi = max(k0 + dz, -z0), min(k1 + dz, hu.shape[0] - z0)
            if lo >= hi:
                continue
            removed = hu[z0 + lo : z0 + hi, full[1], full[2]] < threshold_hu
            a, b = max(lo, 0), min(hi, depth)
            if a < b:
                removed[a - lo : b - lo] &= ~sub[a:b]
            here = slice(lo - dz, hi - dz)
            outside[labels[here][removed & sub[here]]] = True
    outside[0] = False
    if outside.any():
        for z in range(0, depth, CHUNK_SLICES):
            sub[z : z + CHUNK_SLICES] &= ~outside[labels[z : z + CHUNK_SLICES]]
    del labels
    inner_box = bounding_box(sub)
    if inner_box is None:
        return empty
    located = tuple(
        slice(f.start + b.start, f.start + b.stop) for f, b in zip(full, inner_box, strict=True)
    )
    return located, np.ascontiguousarray(sub[inner_box])


def _chunked_bincount(labels: np.ndarray, count: int) -> np.ndarray:
    sizes = np.zeros(count + 1, dtype=np.int64)
    # bincount copies to intp: slabs of about 2**17 voxels (1 MB) keep the copy small
    step = max(1, (1 << 17) // max(1, labels[0].size))
    for z in range(0, labels.shape[0], step):
        sizes += np.bincount(labels[z : z + step].ravel(), minlength=count + 1)
    return sizes


def fill_slices(mask: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Fill, in every axial slice, what ``mask`` encloses (holes not reaching the border)."""
    box = bounding_box(mask)
    if box is None:
        return mask
    # one voxel of margin in-plane keeps the region around the mask connected to the border
    zs = box[0]
    ys = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, mask.shape[1]))
    xs = slice(max(box[2].start - 1, 0), min(box[2].stop + 1, mask.shape[2]))
    sub = mask[zs, ys, xs]
    filled = mask if in_place else mask.copy()
    target = filled[zs, ys, xs]
    # slab by slab: the filling is per slice, so labelling a slab at a time is the same
    for z in range(0, sub.shape[0], CHUNK_SLICES):
        labels, count = label(~sub[z : z + CHUNK_SLICES], structure=IN_PLANE)
        open_region = np.zeros(count + 1, dtype=bool)
        open_region[_border_labels(labels)] = True
        open_region[0] = True
        target[z : z + CHUNK_SLICES] |= ~open_region[labels]
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


def _factors(spacing, grid_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, round(grid_mm / s)) for s in spacing)


def block_sums(mask: np.ndarray, factors) -> np.ndarray:
    """Number of True voxels in each block of ``factors`` voxels (the last blocks partial)."""
    shape = [-(-n // f) for n, f in zip(mask.shape, factors, strict=True)]
    padded = np.zeros([n * f for n, f in zip(shape, factors, strict=True)], dtype=np.uint8)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    return padded.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).sum(
        axis=(1, 3, 5), dtype=np.int32
    )


def _side_by_side(labels: np.ndarray, a: int, b: int) -> bool:
    """Two cores are the two lungs only if they lie side by side (left-right, along the
    array's x): their x ranges overlap by less than half the narrower one's. Two parts of
    one lung (upper and lower) overlap almost entirely."""
    ranges = []
    for k in (a, b):
        xs = np.flatnonzero((labels == k).any(axis=(0, 1)))
        ranges.append((int(xs[0]), int(xs[-1]) + 1))
    overlap = min(ranges[0][1], ranges[1][1]) - max(ranges[0][0], ranges[1][0])
    narrower = min(r[1] - r[0] for r in ranges)
    return overlap < 0.5 * narrower


def split_lungs(
    coarse: np.ndarray, spacing, min_fraction: float, max_depth_mm: float = 30.0
) -> tuple[np.ndarray, int, float]:
    """Tell the two lungs apart in a (coarse) lung mask.

    Erode (threshold the distance inside the mask) deeper and deeper until the mask falls
    into two cores side by side, the smaller holding at least ``min_fraction`` of the
    larger; every voxel
    then gets the label (1 or 2) of the nearer core. Returns (labels, number of lungs,
    erosion depth in mm); a mask that never splits is one lung (labels all 1)."""
    inside = ndimage.distance_transform_edt(coarse, sampling=spacing)
    step = float(min(spacing))
    depth = step
    while depth <= max_depth_mm:
        labels, count = ndimage.label(inside > depth)
        if count == 0:
            break
        if count >= 2:
            sizes = np.bincount(labels.ravel())[1:]
            order = np.argsort(-sizes, kind="stable")
            if sizes[order[1]] >= min_fraction * sizes[order[0]] and _side_by_side(
                labels, order[0] + 1, order[1] + 1
            ):
                lookup = np.zeros(count + 1, dtype=np.int8)
                lookup[order[0] + 1] = 1
                lookup[order[1] + 1] = 2
                cores = lookup[labels]
                _, nearest = ndimage.distance_transform_edt(
                    cores == 0, sampling=spacing, return_indices=True
                )
                return cores[tuple(nearest)], 2, depth
        depth += step
    return np.ones(coarse.shape, dtype=np.int8), 1, 0.0


def fill_pockets(
    mask: np.ndarray,
    lung: np.ndarray,
    coarse: np.ndarray,
    factors,
    spacing,
    radius_mm: float,
    max_extent_mm: float,
    fill_radius_mm: float = 0.0,
) -> tuple[tuple[np.ndarray, ...], dict]:
    """Voxels to add to ``mask`` (full resolution; index arrays) from one lung's pockets.

    ``lung``: the lung's voxels on the coarse grid (blocks of ``factors`` voxels of
    ``spacing`` mm); ``coarse``: the whole mask there. The closing of ``lung`` with a ball
    of ``radius_mm`` is computed from two distance transforms; its pockets (closed, not
    lung) whose extent is at most ``max_extent_mm`` on every axis are accepted; at full
    resolution a voxel of an accepted pocket (or next to one) is added where the closing's
    distance map, interpolated linearly, says it is closed."""
    cspacing = tuple(f * s for f, s in zip(factors, spacing, strict=True))
    box = bounding_box(lung)
    added = (np.zeros(0, dtype=np.intp),) * 3
    info = {"accepted": 0, "rejected": 0, "largest_unfilled_mm": 0.0}
    if box is None or radius_mm <= 0:
        return added, info
    pad = [int(np.ceil(radius_mm / c)) + 2 for c in cspacing]
    sub = np.pad(lung[box], [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~sub, sampling=cspacing) <= radius_mm
    closed_depth = ndimage.distance_transform_edt(dilated, sampling=cspacing)
    del dilated
    pockets = (closed_depth > radius_mm) & ~sub
    # pockets of this lung only: not what the mask (the other lung) already holds
    inner = tuple(slice(p, p + (b.stop - b.start)) for p, b in zip(pad, box, strict=True))
    pockets[inner] &= ~coarse[box]
    labels, count = ndimage.label(pockets, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return added, info
    accepted = np.zeros(count + 1, dtype=bool)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        extent = max((r.stop - r.start) * c for r, c in zip(region, cspacing, strict=True))
        if extent <= max_extent_mm:
            accepted[index] = True
        else:
            info["largest_unfilled_mm"] = max(info["largest_unfilled_mm"], round(extent, 1))
    info["accepted"] = int(accepted.sum())
    info["rejected"] = int(count - accepted.sum())
    if not info["accepted"]:
        return added, info
    cube = np.ones((3, 3, 3), dtype=bool)
    near = ndimage.binary_dilation(accepted[labels], structure=cube)
    # coarse (padded, cropped) index c is coarse index c - pad + box.start
    origin = [b.start - p for b, p in zip(box, pad, strict=True)]
    pieces = [_refine(mask, near, closed_depth, origin, factors, radius_mm)]
    if fill_radius_mm > radius_mm:
        # the pocket found, fill it with a larger ball: it follows the chest wall across
        # the nodule's base more closely (a ball of radius r leaves a cap of depth
        # r - sqrt(r^2 - a^2) at the base of a nodule of radius a sitting on a flat wall)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        regions = ndimage.find_objects(labels)
        for pocket in np.flatnonzero(accepted):
            if sizes[pocket] * float(np.prod(cspacing)) < CAP_MIN_MM3:
                continue
            pieces.append(
                _cap_fill(
                    mask,
                    lung,
                    labels,
                    pocket,
                    regions[pocket - 1],
                    origin,
                    factors,
                    cspacing,
                    radius_mm,
                    fill_radius_mm,
                )
            )
    flat = np.unique(
        np.concatenate([np.ravel_multi_index(p, mask.shape) for p in pieces])
    )  # a voxel may come from both balls
    return np.unravel_index(flat, mask.shape), info


def _cap_fill(mask, lung, labels, index, region, origin, factors, cspacing, radius_mm, fill_mm):
    """Full-resolution voxels within ``radius_mm`` of one pocket that the closing of the
    lung with a ball of ``fill_mm`` fills, computed in a box around the pocket."""
    # far enough from the box's faces that a ball placed beyond them cannot matter
    reach = [int(np.ceil(2 * fill_mm / c)) + 3 for c in cspacing]
    lo = [r.start + o - e for r, o, e in zip(region, origin, reach, strict=True)]
    hi = [r.stop + o + e for r, o, e in zip(region, origin, reach, strict=True)]
    local = np.zeros([b - a for a, b in zip(lo, hi, strict=True)], dtype=bool)
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, lung.shape, strict=True))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    local[dst] = lung[src]
    dilated = ndimage.distance_transform_edt(~local, sampling=cspacing) <= fill_mm
    depth = ndimage.distance_transform_edt(dilated, sampling=cspacing)
    del dilated
    near = np.zeros(local.shape, dtype=bool)
    at = tuple(
        slice(r.start + o - a, r.stop + o - a) for r, o, a in zip(region, origin, lo, strict=True)
    )
    near[at] = labels[region] == index
    steps = int(np.ceil(radius_mm / 2 / min(cspacing)))  # the cap is thinner than r / 2
    near = ndimage.binary_dilation(near, structure=np.ones((3, 3, 3), bool), iterations=steps)
    return _refine(mask, near, depth, lo, factors, fill_mm)


def _refine(mask, near, depth_map, origin, factors, radius_mm):
    """Full-resolution voxels of the coarse blocks ``near`` (coarse index c is coarse
    index c + origin of the volume) not yet in ``mask`` where ``depth_map`` (the erosion
    distance of a closing), interpolated linearly, exceeds ``radius_mm``."""
    empty = (np.zeros(0, dtype=np.intp),) * 3
    near_box = bounding_box(near)
    if near_box is None:
        return empty
    lo = [(nb.start + o) * f for nb, o, f in zip(near_box, origin, factors, strict=True)]
    hi = [(nb.stop + o) * f for nb, o, f in zip(near_box, origin, factors, strict=True)]
    lo_c = [max(a, 0) for a in lo]
    hi_c = [min(b, n) for b, n in zip(hi, mask.shape, strict=True)]
    if any(a >= b for a, b in zip(lo_c, hi_c, strict=True)):
        return empty
    block = near[near_box]
    for axis, f in enumerate(factors):
        block = block.repeat(f, axis=axis)
    block = block[tuple(slice(a - s, b - s) for a, b, s in zip(lo_c, hi_c, lo, strict=True))]
    region = tuple(slice(a, b) for a, b in zip(lo_c, hi_c, strict=True))
    points = np.nonzero(block & ~mask[region])
    coords = [
        (idx + a + 0.5) / f - 0.5 - o
        for idx, a, f, o in zip(points, lo_c, factors, origin, strict=True)
    ]
    depth = ndimage.map_coordinates(depth_map, coords, order=1, mode="nearest")
    keep = depth > radius_mm
    return tuple(p[keep] + a for p, a in zip(points, lo_c, strict=True))


def lung_mask(
    hu: np.ndarray, spacing: tuple[float, float, float], settings: LungSettings | None = None
) -> LungResult:
    """Lung mask of an HU volume (z, y, x) with voxel ``spacing`` (z, y, x mm)."""
    settings = settings or LungSettings()
    voxel_ml = float(np.prod(spacing)) / 1000.0
    box, candidates = inner_air_box(hu, settings.threshold_hu)
    components: list[dict] = []
    if box is not None:
        fill_slices(candidates, in_place=True)
        labels, count = label(candidates)
        del candidates
        mask = np.zeros(hu.shape, dtype=bool)
        sizes = _chunked_bincount(labels, count)[1:]
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
        target = mask[box]
        for z in range(0, target.shape[0], CHUNK_SLICES):
            target[z : z + CHUNK_SLICES] = kept_lookup[labels[z : z + CHUNK_SLICES]]
        del labels
    else:
        mask = np.zeros(hu.shape, dtype=bool)
    construction, sides = _pockets_and_sides(mask, spacing, settings)
    if settings.dilation_mm > 0:
        mask = _dilate(mask, spacing, settings.dilation_mm)
    volume_ml = float(np.count_nonzero(mask)) * voxel_ml
    left_ml = right_ml = None
    if sides is not None:  # voxel counts of the two lungs, before any dilation
        counts, first_is_left = sides
        per_side = [c * voxel_ml for c in counts]
        left_ml, right_ml = per_side if first_is_left else per_side[::-1]
    # slice by slice: count_nonzero(axis=...) makes a volume-sized temporary
    per_slice = np.array([np.count_nonzero(plane) for plane in mask], dtype=np.int64)
    peak_area_cm2 = float(per_slice.max(initial=0)) * spacing[1] * spacing[2] / 100.0
    qc_flags: list[str] = []
    status = statuses.OK
    if volume_ml < settings.no_lungs_below_ml and peak_area_cm2 < NO_LUNGS_MAX_AREA_CM2:
        status = statuses.NO_LUNGS
        qc_flags.append(statuses.NO_LUNGS)
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
        bbox=bounding_box(mask) if status == statuses.OK else None,
        construction=construction,
        left_volume_ml=None if status != statuses.OK or left_ml is None else round(left_ml, 1),
        right_volume_ml=None if status != statuses.OK or right_ml is None else round(right_ml, 1),
    )


def _pockets_and_sides(mask: np.ndarray, spacing, settings: LungSettings):
    """Split the lungs and fill each lung's pockets, in place; (construction, sides)."""
    construction = {
        "method": "threshold, outside air from the side faces, per-slice fill, largest "
        "components"
        + (", per-lung ball closing: pockets filled" if settings.closing_radius_mm > 0 else ""),
        "threshold_hu": settings.threshold_hu,
        "closing_radius_mm": settings.closing_radius_mm,
        "pocket_max_mm": settings.pocket_max_mm,
        "fill_radius_mm": settings.fill_radius_mm,
        "grid_mm": settings.grid_mm,
        "dilation_mm": settings.dilation_mm,
    }
    box = bounding_box(mask)
    if box is None:
        return construction, None
    factors = _factors(spacing, settings.grid_mm)
    cspacing = tuple(f * s for f, s in zip(factors, spacing, strict=True))
    construction["grid_spacing_mm"] = [round(c, 4) for c in cspacing]
    sums = block_sums(mask[box], factors)
    coarse = sums * 2 >= int(np.prod(factors))
    sides, lungs, depth = split_lungs(coarse, cspacing, settings.second_lung_fraction)
    construction["lungs_separated"] = lungs == 2
    construction["split_erosion_mm"] = round(depth, 2)
    counts = [int(sums[sides == k].sum()) for k in range(1, lungs + 1)]
    added_total = 0
    pockets = {"accepted": 0, "rejected": 0, "largest_unfilled_mm": 0.0}
    if settings.closing_radius_mm > 0:
        sub = mask[box]
        additions = []
        for k in range(1, lungs + 1):
            added, info = fill_pockets(
                sub,
                coarse & (sides == k),
                coarse,
                factors,
                spacing,
                settings.closing_radius_mm,
                settings.pocket_max_mm,
                settings.fill_radius_mm,
            )
            additions.append(added)
            pockets["accepted"] += info["accepted"]
            pockets["rejected"] += info["rejected"]
            pockets["largest_unfilled_mm"] = max(
                pockets["largest_unfilled_mm"], info["largest_unfilled_mm"]
            )
        for k, added in enumerate(additions):
            new = int(np.count_nonzero(~sub[added]))
            counts[k] += new
            added_total += new
            sub[added] = True
    construction["pockets_filled"] = pockets["accepted"]
    construction["pockets_too_large"] = pockets["rejected"]
    construction["largest_pocket_unfilled_mm"] = pockets["largest_unfilled_mm"]
    construction["added_ml"] = round(added_total * float(np.prod(spacing)) / 1000.0, 2)
    if lungs < 2:
        return construction, None
    centre_x = [float(np.nonzero(sides == k)[2].mean()) for k in (1, 2)]
    first_is_left = (centre_x[0] > centre_x[1]) == settings.x_towards_left
    return construction, (counts, first_is_left)
