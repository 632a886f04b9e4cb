"""tile_ct: 3D patches of the preprocessed volume, a coordinate table, optional PNG slices.

Patches of ``patches.size_mm`` on a grid with ``patches.stride_mm`` covering the lungs'
bounding box are kept when at least ``min_lung_fraction`` of their voxels are lung.

By default (``patches.materialise: none``) patches are only coordinates: the table gives
each patch's voxel box in the preprocessed volume (``preprocess/volume.nii.gz``, int16 HU,
stored once) and readers (``medprep.data``) cut them from it. With ``materialise`` = ``hu``
(int16), ``uint8`` (``patches.window`` mapped to 0-255) or ``normalised`` (float32 after
``ct.normalise``, only when asked) all kept patches also go into one memory-mappable
``patches.npy`` of shape (n, z, y, x), row ``patch`` of the table. Axis order: z (slice,
inferior to superior as the NIfTI's third axis), y (row), x (column), i.e. the NIfTI
array (x, y, z) transposed. Parts of a patch beyond the volume are air.

The table gives each patch's voxel box (z0:z1, y0:y1, x0:x1), its centre in voxels
(``center_voxel_z/y/x``, the box's middle: start + (size - 1) / 2) and in patient
coordinates (DICOM LPS, mm). A preprocess status other than ``ok`` (``no_lungs``) gives
zero patches with that status.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medprep.common import atomic, statuses
from medprep.common.parallel import thread_map
from medprep.ct import hu, labels, nifti, patches
from medprep.ct.patches import MATERIALISED_DTYPES, TABLE_COLUMNS
from medprep.ct.settings import NormaliseSettings, ct_settings
from medprep.workflow.manifest import artifact, artifact_path

log = logging.getLogger("medprep.ct")

# written only when the sample has annotations: it then wins over the sheet's label
LABEL_COLUMN = "label"


def _write_table(path: str | os.PathLike, rows: dict[str, list]) -> None:
    import pyarrow.parquet as pq

    from medprep.common.tables import arrow_table

    columns = dict(TABLE_COLUMNS)
    if LABEL_COLUMN in rows:
        columns[LABEL_COLUMN] = "int64"
    table = arrow_table(rows, columns)
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _centre_lps(affine_ras: np.ndarray, start: np.ndarray, size) -> np.ndarray:
    centre_zyx = start + (np.asarray(size) - 1) / 2.0
    ijk = np.array([centre_zyx[2], centre_zyx[1], centre_zyx[0], 1.0])
    return (nifti.LPS_TO_RAS @ affine_ras @ ijk)[:3]


def _write_slices(folder, volume, spacing_z, window, every_mm, threads) -> list[str]:
    from PIL import Image

    step = max(1, round(every_mm / spacing_z))
    indices = list(range(0, volume.shape[0], step))
    low, high = window

    def write(z: int) -> str:
        scaled = (volume[z].astype(np.float32) - low) * (255.0 / (high - low))
        name = f"slice_{z:04d}.png"
        Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8)).save(folder / name, format="PNG")
        return name

    return list(thread_map(write, indices, threads))


def tile(
    preprocess_manifest: dict[str, Any],
    settings: dict[str, Any] | None = None,
    *,
    patches_path: str | os.PathLike,
    table_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    slices_dir: str | os.PathLike | None = None,
    threads: int = 1,
    annotations: list[Any] | None = None,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Write patches, table, summary (and PNG slices); return (artifacts, summary).

    ``annotations``: the sample's ``medprep.ct.labels.Annotation`` list (None: the
    sample has no annotation source, and the table no ``label`` column). Each gets a
    patch centred on it after the grid's; grid patches get labels (see that module)."""
    cfg = ct_settings(settings)
    pcfg = cfg.patches
    norm = cfg.normalise
    pre = preprocess_manifest.get("summary", {})
    status = pre.get("status", statuses.OK)
    spacing = [float(s) for s in pre["spacing_out"]]
    size, stride = patches.patch_voxels(pcfg.size_mm, pcfg.stride_mm, spacing)
    materialise = pcfg.materialise
    dtype = MATERIALISED_DTYPES.get(materialise)
    window = [float(v) for v in pcfg.window]
    convert = _converter(materialise, norm, window)
    fill = convert(np.array([hu.AIR_HU], dtype=np.int16))[0].item() if dtype else hu.AIR_HU
    warnings: list[str] = []
    rows: dict[str, list] = {c: [] for c in TABLE_COLUMNS}
    if annotations is not None:
        rows[LABEL_COLUMN] = []
    labelled: dict[str, Any] = {}
    candidates = 0
    slice_names: list[str] = []

    if status != statuses.OK:
        warnings.append(f"preprocess status {status}: no patches")
        if annotations:
            warnings.append(f"{len(annotations)} annotation(s) not placed: no lungs")
        if dtype is not None:
            _save_array(patches_path, np.zeros((0, *size), dtype=dtype))
    else:
        mask, affine = nifti.read_nifti(
            artifact_path(preprocess_manifest, "preprocess/lung_mask.nii.gz")
        )
        # the volume (same grid and affine as the mask) is inflated only when its values
        # are used: materialised patches or PNG slices
        volume = mask
        if dtype is not None or (cfg.slices_png.enabled and slices_dir is not None):
            volume, affine = nifti.read_nifti(
                artifact_path(preprocess_manifest, "preprocess/volume.nii.gz")
            )
        if mask.dtype == np.uint8 and int(mask.max(initial=0)) <= 1:
            mask = mask.view(bool)  # 0/1: no copy
        box = patches.bounding_box(mask.astype(bool, copy=False))
        starts = (
            patches.candidate_starts(box, volume.shape, size, stride)
            if box is not None
            else np.zeros((0, 3), dtype=np.int64)
        )
        candidates = len(starts)
        fractions = patches.lung_fractions(mask, starts, size)
        keep = np.flatnonzero((fractions >= pcfg.min_lung_fraction) & (fractions > 0))
        if candidates and not keep.size:
            warnings.append(
                f"no patch reaches min_lung_fraction {pcfg.min_lung_fraction} "
                f"({candidates} candidates)"
            )
        placed = labels.place(annotations or [], affine, mask, size)
        grid = starts[keep]
        all_starts = np.concatenate(
            [grid, np.array([p.start for p in placed], dtype=np.int64).reshape(-1, 3)]
        )
        all_fractions = np.concatenate(
            [fractions[keep], patches.lung_fractions(mask, all_starts[len(grid) :], size)]
        )
        patch_labels, which = labels.grid_labels(grid, size, spacing, placed)
        for row, start in enumerate(all_starts):
            centre = _centre_lps(affine, start, size)
            for column, value in zip(
                ("patch", "z0", "y0", "x0", "z1", "y1", "x1"),
                (row, *start.tolist(), *(start + np.asarray(size)).tolist()),
                strict=True,
            ):
                rows[column].append(int(value))
            middle = start + (np.asarray(size) - 1) / 2.0
            for axis, value in zip("zyx", middle.tolist(), strict=True):
                rows[f"center_voxel_{axis}"].append(float(value))
            rows["center_lps_x_mm"].append(round(float(centre[0]), 3))
            rows["center_lps_y_mm"].append(round(float(centre[1]), 3))
            rows["center_lps_z_mm"].append(round(float(centre[2]), 3))
            rows["lung_fraction"].append(round(float(all_fractions[row]), 4))
            rows["padded"].append(patches.is_padded(start, size, volume.shape))
            centred = row >= len(grid)
            index = row - len(grid) if centred else int(which[row])
            item = placed[index] if index >= 0 else None
            _annotation_columns(
                rows, item, centred, centre, patch_labels[row] if not centred else 0
            )
        labelled = _label_summary(placed, patch_labels, warnings) if annotations is not None else {}
        if dtype is not None:
            _write_patches(patches_path, volume, all_starts, size, dtype, convert)
        if cfg.slices_png.enabled and slices_dir is not None:
            with atomic.staged_dir(slices_dir) as tmp_dir:
                slice_names = _write_slices(
                    tmp_dir,
                    volume,
                    spacing[0],
                    cfg.slices_png.window,
                    cfg.slices_png.every_mm,
                    threads,
                )
    if dtype is None and Path(patches_path).exists():
        Path(patches_path).unlink()  # patches of an earlier run that materialised them
    if not slice_names and slices_dir is not None and Path(slices_dir).is_dir():
        shutil.rmtree(slices_dir)  # slices of an earlier run with other settings
    _write_table(table_path, rows)
    summary = {
        "status": status,
        "warnings": warnings,
        "patches": len(rows["patch"]),
        "candidates": candidates,
        "patch_shape": list(size),
        "stride_voxels": list(stride),
        "spacing": spacing,
        "materialise": materialise,
        "dtype": np.dtype(dtype).name if dtype is not None else None,
        "axes": "n, z, y, x" if dtype is not None else None,
        "fill_value": fill,
        "normalise": norm.as_dict(),
        "window": window,
        "min_lung_fraction": pcfg.min_lung_fraction,
        "slices_png": len(slice_names),
    }
    if annotations is not None:
        summary["annotations"] = {"count": len(annotations), **labelled}
    atomic.write_json(summary_path, summary)
    artifacts = [artifact("patches/patches.npy", patches_path)] if dtype is not None else []
    artifacts += [
        artifact("patches/patches.parquet", table_path),
        artifact("patches/summary.json", summary_path),
    ]
    if slices_dir is not None:  # else no slices were written
        artifacts += [artifact(f"patches/slices/{n}", Path(slices_dir) / n) for n in slice_names]
    log.info("%d of %d candidate patches kept (status %s)", summary["patches"], candidates, status)
    return artifacts, summary


def _annotation_columns(rows, item, centred: bool, centre_lps, grid_label: int) -> None:
    """The region-label columns of one patch row (``item``: its PlacedAnnotation or None)."""
    annotation = item.annotation if item is not None else None
    if LABEL_COLUMN in rows:
        # a centred patch (a row after the grid's) was placed on ``item``
        rows[LABEL_COLUMN].append(int(item.annotation.label) if centred else int(grid_label))
    rows["centred"].append(centred)
    rows["annotation_id"].append(annotation.id if annotation is not None else None)
    if item is None:
        distance = float("nan")
    elif centred:
        distance = item.distance_mm
    else:
        distance = float(np.linalg.norm(np.asarray(centre_lps) - item.annotation.centre_lps))
    rows["distance_mm"].append(round(distance, 3))
    diameter = annotation.diameter_mm if annotation is not None else None
    rows["diameter_mm"].append(float("nan") if diameter is None else round(diameter, 3))
    rows["readers"].append(annotation.readers if annotation is not None else 0)
    rows["outside_scan"].append(bool(centred and item.outside_scan))
    rows["outside_lung"].append(bool(centred and item.outside_lung))


def _label_summary(placed, labels: np.ndarray, warnings: list[str]) -> dict[str, Any]:
    """Counts for the summary; a warning line per annotation outside the scan or lungs."""
    for item in placed:
        where = "the scan" if item.outside_scan else "the lung mask" if item.outside_lung else ""
        if where:
            warnings.append(
                f"annotation {item.annotation.id} lies outside {where}: its patch is kept, "
                f"flagged outside_{'scan' if item.outside_scan else 'lung'}"
            )
    values, counts = np.unique(labels, return_counts=True)
    return {
        "centred_patches": len(placed),
        "outside_scan": sum(p.outside_scan for p in placed),
        "outside_lung": sum(p.outside_lung for p in placed),
        "grid_labels": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "max_distance_mm": round(max((p.distance_mm for p in placed), default=0.0), 3),
    }


def window_uint8(values: np.ndarray, window: list[float]) -> np.ndarray:
    """HU to uint8: ``window`` [low, high] mapped linearly onto 0-255, clipped, rounded."""
    low, high = window
    scaled = (values.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _converter(materialise: str, norm: NormaliseSettings, window: list[float]):
    """The function from an int16 HU patch to the stored values."""
    if materialise == "uint8":
        return lambda patch: window_uint8(patch, window)
    if materialise == "normalised":
        return lambda patch: hu.normalise(patch, norm.min_hu, norm.max_hu, norm.mean)
    return lambda patch: patch


def _write_patches(path, volume, starts, size, dtype, convert) -> None:
    """One (n, z, y, x) ``.npy`` of the patches at ``starts``, written one patch at a time
    (not through a memory map, whose dirty pages would all count in the step's memory)."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as out:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": (len(starts), *size),
        }
        np.lib.format.write_array_header_1_0(out, header)
        buffer = np.empty(size, dtype=np.int16)
        for start in starts:
            patches.extract(volume, start, size, hu.AIR_HU, buffer)
            out.write(np.ascontiguousarray(convert(buffer), dtype=dtype).data)


def _save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        np.save(tmp, array)
