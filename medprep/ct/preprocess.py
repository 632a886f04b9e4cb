"""preprocess_ct: DICOM files of one sample to an HU volume, a lung mask, metadata and QC.

``load_series`` reads headers, picks and sorts the series and decodes it to HU;
``preprocess`` resamples, masks the lungs and crops; ``write_outputs`` writes the files.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medprep.common import atomic, claims, statuses
from medprep.common.errors import InputError
from medprep.common.parallel import thread_map
from medprep.common.progress import Progress
from medprep.ct import dicom_io, hu, lung, nifti, qc_picture, resample, series, volume_io
from medprep.ct.settings import CtSettings, SeriesSettings, ct_settings, lung_settings

log = logging.getLogger("medprep.ct")

METADATA_FORMAT = 1


@dataclasses.dataclass
class LoadedSeries:
    # HU int16 (slices, rows, cols), slices in increasing position; None once
    # ``preprocess`` has resampled it (the stack is freed before the lung mask)
    volume: np.ndarray | None
    geometry: series.StackGeometry
    selection: series.Selection
    rejected: list[series.Rejected]
    warnings: list[str]
    info: dict[str, Any]  # series and HU facts for the metadata


def _common_folder(paths: Sequence[str]) -> str:
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:
        return os.path.dirname(paths[0])


def load_series(
    paths: Sequence[str | os.PathLike],
    *,
    series_uid: str | None = None,
    gantry_tilt: str = "correct",
    include_identifiers: bool = False,
    threads: int = 1,
    series_preferences: SeriesSettings | dict[str, Any] | None = None,
    lossy_compression: str = "fail",
) -> LoadedSeries:
    """Read headers, pick one CT series, sort it along its normal and decode it to HU.

    ``series_preferences``: the ``ct.series`` config section (how series are ranked);
    ``lossy_compression``: ``fail`` (one line naming the syntax) or ``accept`` (with a
    warning).
    """
    files = [os.fspath(p) for p in paths]
    if not files:
        raise InputError("no input files")
    volume_path = volume_io.volume_input(files)
    if volume_path is not None:
        return _load_volume(volume_path, files, gantry_tilt, include_identifiers)
    scanned = dicom_io.scan_headers(files, threads)
    rejected: list[series.Rejected] = []
    candidates: list[series.SliceHeader] = []
    for item in scanned:
        if isinstance(item, series.Rejected):
            rejected.append(item)
            continue
        reason = series.rejection_reason(item)
        if reason:
            rejected.append(series.Rejected(item.index, item.path, reason, item.series_uid))
        else:
            candidates.append(item)
    groups = series.group_series(candidates)
    invalid = [r for r in rejected if r.reason.startswith("invalid")]
    if not groups and invalid:
        raise InputError(invalid[0].reason, path=invalid[0].path)
    if not groups:
        raise InputError(
            f"no usable CT series among {len(files)} file(s): "
            f"{series.describe_rejections(rejected)}",
            path=_common_folder(files),
        )
    try:
        selection = series.select_series(
            groups, series_uid, SeriesSettings.from_config(series_preferences)
        )
    except InputError as error:
        raise error.with_context(path=_common_folder(files)) from None
    for item in rejected:
        # a file of the chosen series whose header is cut short, damaged or holds an
        # unusable number: the series is incomplete, so stop rather than interpolate
        if item.series_uid != selection.group.series_uid:
            continue
        if item.reason.startswith("invalid"):
            raise InputError(item.reason, path=item.path)
        if item.reason.startswith(("missing", "malformed")):
            raise InputError(
                f"{item.reason} in a file of the chosen series (truncated or damaged?)",
                path=item.path,
            )
    geometry = series.stack_geometry(selection.group)
    for header in geometry.slices:
        if not header.has_pixel_data:
            raise InputError("no pixel data (a slice of the chosen series)", path=header.path)
        if header.pixel_data_truncated:
            raise InputError(
                "truncated file: pixel data shorter than Rows x Columns x BitsAllocated",
                path=header.path,
            )
    if len(geometry.slices) < 2:
        raise InputError(
            f"the chosen series has a single slice ({len(selection.group.slices)} file(s) at one "
            "position); a volume needs at least 2 slices, so single-slice series are not processed",
            path=geometry.slices[0].path,
        )
    warnings = list(selection.warnings) + list(geometry.warnings)
    warnings += series.split_from_series(selection.group, selection.others, _common_folder(files))
    if geometry.sheared:
        if gantry_tilt == "fail":
            raise InputError(
                f"series acquired with gantry tilt ({geometry.tilt_deg:.1f} degrees); set "
                "ct.gantry_tilt: correct to resample it onto an orthogonal grid",
                path=geometry.slices[0].path,
            )
        warnings.append(
            f"gantry tilt {geometry.tilt_deg:.1f} degrees corrected by resampling each slice "
            "onto an orthogonal grid"
        )
    if not selection.group.is_axial:
        warnings.append(
            f"series is not axial (normal {selection.group.axial_angle_deg:.0f} degrees from "
            "the patient axis); per-slice lung filling runs in its slice plane"
        )
    if rejected:
        warnings.append(f"{len(rejected)} file(s) not used: {series.describe_rejections(rejected)}")
    unreadable = [r for r in rejected if r.reason.startswith("unreadable")]
    if unreadable:
        log.warning("%d unreadable DICOM file(s) skipped", len(unreadable))

    lossy = sorted({h.transfer_syntax for h in geometry.slices if h.lossy})
    if lossy and lossy_compression == "fail":
        from pydicom.uid import UID

        first = next(h for h in geometry.slices if h.lossy)
        raise InputError(
            f"lossy compression ({', '.join(f'{UID(t).name} {t}' for t in lossy)} or "
            "LossyImageCompression 01): HU values are approximate; set "
            "ct.lossy_compression: accept to use them",
            path=first.path,
        )
    volume, hu_info = _decode(geometry, threads)
    warnings.extend(hu_info.pop("warnings"))
    if lossy:
        warnings.append(
            f"lossy compression ({', '.join(lossy)} or LossyImageCompression 01): HU values "
            "approximate the original ones"
        )
    info = {
        "chosen": {
            **selection.group.describe(include_identifiers),
            "reason": selection.reason,
            "slices_used": len(geometry.slices),
            "transfer_syntaxes": sorted({h.transfer_syntax for h in geometry.slices}),
            "lossy_compression": any(h.lossy for h in geometry.slices),
            "enhanced_ct_frames": sum(h.frame is not None for h in geometry.slices),
            "files_without_preamble": sum(not h.preamble for h in geometry.slices),
        },
        "other_series": [
            {**g.describe(include_identifiers), "reason": r["reason"]}
            for g, r in zip(selection.others, selection.ranking[1:], strict=True)
        ],
        "series_ranking": list(selection.ranking),
        "rejected_files": [
            {
                "file_index": r.index,
                "reason": r.reason,
                **({"file": r.path} if include_identifiers else {}),
            }
            for r in rejected
        ],
        "duplicates": [
            {
                "file_index": h.index,
                "instance_number": h.instance_number,
                **({"file": h.path} if include_identifiers else {}),
            }
            for h in geometry.duplicates
        ],
        "hu_conversion": hu_info,
    }
    if include_identifiers:
        info["identifiers"] = dicom_io.read_identifiers(geometry.slices[0])
    log.info(
        "series %s: %d slices chosen (%s); %d other series, %d file(s) not used",
        selection.group.uid_hash,
        len(geometry.slices),
        selection.reason,
        len(selection.others),
        len(rejected),
    )
    return LoadedSeries(volume, geometry, selection, rejected, warnings, info)


def _load_volume(
    path: str, sample_files: Sequence[str], gantry_tilt: str, include_identifiers: bool
) -> LoadedSeries:
    """A MetaImage or NIfTI volume, as if it were a sorted DICOM series (see volume_io)."""
    raw, group = volume_io.read_volume(path, sample_files)
    geometry = series.stack_geometry(group)
    order = [h.index for h in geometry.slices]
    values = raw.values if order == list(range(len(order))) else raw.values[order]
    volume, hu_info = volume_io.to_hu(values, path)
    warnings = list(geometry.warnings) + hu_info.pop("warnings")
    if geometry.sheared:
        if gantry_tilt == "fail":
            raise InputError(
                f"volume axes are sheared ({geometry.tilt_deg:.1f} degrees); set "
                "ct.gantry_tilt: correct to resample it onto an orthogonal grid",
                path=path,
            )
        warnings.append(f"sheared volume axes ({geometry.tilt_deg:.1f} degrees) corrected")
    selection = series.Selection(group, f"{raw.kind} volume input", ())
    chosen = {
        "input": raw.kind,
        **raw.info,
        "series_uid_hash": group.uid_hash,
        "slices": len(geometry.slices),
        "slices_used": len(geometry.slices),
        "matrix": [group.rows, group.cols],
        "pixel_spacing_mm": list(group.pixel_spacing),
        "axial": group.is_axial,
        "reason": selection.reason,
    }
    if include_identifiers:
        chosen["file"] = path
    info = {
        "chosen": chosen,
        "other_series": [],
        "series_ranking": [],
        "rejected_files": [],
        "duplicates": [],
        "hu_conversion": {"modality_lut": [f"{raw.kind} values taken as HU"], **hu_info},
    }
    log.info("%s volume: %d slices, values taken as HU", raw.kind, len(geometry.slices))
    return LoadedSeries(volume, geometry, selection, [], warnings, info)


def _decode(geometry: series.StackGeometry, threads: int) -> tuple[np.ndarray, dict[str, Any]]:
    first = geometry.slices[0]
    shape = (len(geometry.slices), first.rows, first.cols)
    # each file's claim was checked when its header was read; the series' sum is checked
    # here, before the volume is allocated
    claims.check_claim(
        2 * shape[0] * shape[1] * shape[2],
        what=f"a volume of {shape[0]} slices of {shape[1]} x {shape[2]} voxels x 16 bits",
        path=_common_folder([h.path for h in geometry.slices]),
    )
    volume = np.empty(shape, dtype=np.int16)

    def decode(k: int) -> tuple[int, int, str]:
        header = geometry.slices[k]
        stored = dicom_io.read_pixels(header)
        transform = hu.ModalityTransform.from_tags(
            header.rescale_slope, header.rescale_intercept, header.modality_lut
        )
        padding = hu.Padding(header.padding_value, header.padding_range_limit)
        result = hu.to_hu(stored, transform, padding)
        volume[k] = result.hu
        return result.padding, result.clamped_low, transform.source

    progress = Progress("slices", len(geometry.slices))
    results = []
    for result in thread_map(decode, range(len(geometry.slices)), threads):
        results.append(result)
        progress.advance()
    sources = sorted({r[2] for r in results})
    padding_pixels = sum(r[0] for r in results)
    clamped = sum(r[1] for r in results)
    warnings = []
    if "identity" in sources:
        warnings.append(
            "no RescaleSlope/RescaleIntercept or Modality LUT: stored values taken as HU"
        )
    types = sorted({h.rescale_type for h in geometry.slices if h.rescale_type})
    if any(t.upper() != "HU" for t in types):
        warnings.append(f"RescaleType {'/'.join(types)}: values taken as HU")
    if clamped:
        warnings.append(
            f"{clamped} pixel(s) below {hu.HU_FLOOR} HU that are not declared padding "
            f"raised to {hu.HU_FLOOR}"
        )
    slopes = sorted({h.rescale_slope for h in geometry.slices if h.rescale_slope is not None})
    intercepts = sorted(
        {h.rescale_intercept for h in geometry.slices if h.rescale_intercept is not None}
    )
    info = {
        "modality_lut": sources,
        "rescale_slopes": slopes,
        "rescale_intercepts": intercepts,
        "padding_values": sorted(
            {h.padding_value for h in geometry.slices if h.padding_value is not None}
        ),
        "padding_pixels": padding_pixels,
        "padding_to_hu": hu.AIR_HU,
        "clamped_below_floor": clamped,
        "warnings": warnings,
    }
    return volume, info


@dataclasses.dataclass
class PreprocessResult:
    hu: np.ndarray  # int16 (z, y, x)
    mask: np.ndarray  # uint8 (z, y, x)
    affine_ras: np.ndarray
    spacing_out: tuple[float, float, float]
    status: str
    metadata: dict[str, Any]
    summary: dict[str, Any]
    settings: CtSettings


def hu_statistics(volume: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Min, max, mean and percentiles (exact, from a histogram of the int16 values)."""
    counts = np.zeros(65536, dtype=np.int64)
    lung_sum = 0
    lung_count = 0
    # slabs of about 2**17 voxels: bincount's intp copy of one (1 MB) stays in the cache
    step = max(1, (1 << 17) // max(1, volume[0].size))
    for start in range(0, volume.shape[0], step):
        chunk = volume[start : start + step]
        counts += np.bincount((chunk.view(np.uint16) ^ 0x8000).ravel(), minlength=65536)
        if mask is not None:
            m = mask[start : start + step].astype(bool)
            lung_sum += int(chunk[m].sum(dtype=np.int64))
            lung_count += int(np.count_nonzero(m))
    values = np.arange(65536, dtype=np.int64) - 32768
    total = int(counts.sum())
    cumulative = np.cumsum(counts)

    def percentile(p: float) -> int:
        return int(values[np.searchsorted(cumulative, p / 100 * (total - 1) + 1)])

    present = np.flatnonzero(counts)
    stats: dict[str, Any] = {
        "min": int(values[present[0]]),
        "max": int(values[present[-1]]),
        "mean": round(float((counts * values).sum() / total), 2),
        "p01": percentile(1),
        "p50": percentile(50),
        "p99": percentile(99),
    }
    stats["lung_mean"] = round(lung_sum / lung_count, 2) if lung_count else None
    return stats


def _round_list(values, digits=4) -> list[float]:
    return [round(float(v), digits) for v in values]


def check_resampled_claim(
    geometry: series.StackGeometry,
    shape_in: tuple[int, int, int],
    spacing_out: tuple[float, float, float],
    memory_bytes: int | None = None,
) -> None:
    """Refuse a series whose slice positions span more than the job can resample and
    mask (the output grid follows the positions, which a header can set anywhere within
    +-1e6 mm), before the output volume is allocated."""
    from medprep.ct import memory

    grid = resample.plan_grid(
        geometry.positions, geometry.offsets, shape_in[1:], geometry.pixel_spacing, spacing_out
    )
    voxels = math.prod(grid.shape)
    extent = float(geometry.positions[-1] - geometry.positions[0])
    claims.check_claim(
        int(voxels * memory.LUNG_BYTES_PER_VOXEL),
        what=(
            f"slices {extent:.6g} mm apart end to end, resampled to "
            f"{' x '.join(str(n) for n in grid.shape)} voxels (with the lung mask's "
            f"{memory.LUNG_BYTES_PER_VOXEL:g} bytes per voxel)"
        ),
        path=_common_folder([h.path for h in geometry.slices]),
        memory_bytes=memory_bytes,
    )


def preprocess(
    paths: Sequence[str | os.PathLike],
    settings: dict[str, Any] | None = None,
    *,
    series_uid: str | None = None,
    include_identifiers: bool = False,
    threads: int = 1,
) -> PreprocessResult:
    """Load, convert to HU, resample, mask the lungs, optionally crop; nothing written."""
    cfg = ct_settings(settings)
    loaded = load_series(
        paths,
        series_uid=series_uid,
        gantry_tilt=cfg.gantry_tilt,
        include_identifiers=include_identifiers,
        threads=threads,
        series_preferences=cfg.series,
        lossy_compression=cfg.lossy_compression,
    )
    geometry = loaded.geometry
    dz, dy, dx = cfg.spacing
    spacing_out = (float(dz), float(dy), float(dx))
    order = int(cfg.interpolation_order)
    assert loaded.volume is not None  # load_series always returns the stack
    shape_in = loaded.volume.shape
    check_resampled_claim(geometry, shape_in, spacing_out)
    volume, grid = resample.resample_stack(
        loaded.volume,
        geometry.positions,
        geometry.offsets,
        geometry.pixel_spacing,
        spacing_out,
        order=order,
        fill=hu.AIR_HU,
        threads=threads,
    )
    loaded.volume = None  # free the input stack before the mask
    # LPS x grows towards the patient's left: does the array's x (column) axis?
    towards_left = bool(geometry.row_cosine[0] >= 0)
    lungs = lung.lung_mask(volume, spacing_out, lung_settings(cfg, x_towards_left=towards_left))
    mask = lungs.mask
    warnings = list(loaded.warnings)
    start = np.array(grid.start)  # slice-frame z, y, x of voxel 0
    crop_box = None
    if cfg.crop.enabled:
        if lungs.bbox is None:
            warnings.append("crop to the lungs skipped: no lungs")
        else:
            margin = [int(np.ceil(cfg.crop.margin_mm / s)) for s in spacing_out]
            lo = [max(b.start - m, 0) for b, m in zip(lungs.bbox, margin, strict=True)]
            hi = [
                min(b.stop + m, n) for b, m, n in zip(lungs.bbox, margin, volume.shape, strict=True)
            ]
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            volume = np.ascontiguousarray(volume[box])
            mask = np.ascontiguousarray(mask[box])
            start = start + np.array(lo) * np.array(spacing_out)
            crop_box = {"start": lo, "stop": hi, "margin_mm": cfg.crop.margin_mm}
    origin = (
        geometry.origin
        + start[2] * geometry.row_cosine
        + start[1] * geometry.col_cosine
        + start[0] * geometry.normal
    )
    affine = nifti.affine_ras(
        origin, geometry.row_cosine, geometry.col_cosine, geometry.normal, spacing_out
    )
    if lungs.status == statuses.NO_LUNGS:
        largest = lungs.components[0]["volume_ml"] if lungs.components else 0
        warnings.append(
            f"no lungs found (enclosed air {largest} mL < {cfg.lung.no_lungs_below_ml} mL, "
            f"largest cross-section {lungs.peak_area_cm2} cm2 < {lung.NO_LUNGS_MAX_AREA_CM2:g} cm2): "
            "the mask is empty and tile_ct writes no patches"
        )
    for flag in lungs.qc_flags:
        if flag in ("lung_volume_low", "lung_volume_high"):
            warnings.append(
                f"QC {flag}: lung volume {lungs.volume_ml:.0f} mL outside "
                f"[{cfg.lung.min_volume_ml}, {cfg.lung.max_volume_ml}] mL"
            )
    spacing_in = (
        round(geometry.median_step, 4),
        geometry.pixel_spacing[0],
        geometry.pixel_spacing[1],
    )
    thickness = sorted({h.slice_thickness for h in geometry.slices if h.slice_thickness})
    lung_volume = round(lungs.volume_ml, 1)
    metadata = {
        "format": METADATA_FORMAT,
        "status": lungs.status,
        "series": loaded.info["chosen"],
        "other_series": loaded.info["other_series"],
        "series_ranking": loaded.info["series_ranking"],
        "rejected_files": loaded.info["rejected_files"],
        "duplicates": loaded.info["duplicates"],
        "geometry": {
            "shape_in": list(shape_in),
            "spacing_in": _round_list(spacing_in),
            "slice_steps_mm": {
                "min": round(float(geometry.steps.min()), 4),
                "median": round(geometry.median_step, 4),
                "max": round(float(geometry.steps.max()), 4),
            },
            "slice_thickness_mm": thickness,
            "slice_positions_mm": _round_list(geometry.positions, 3),
            "gantry_tilt_tag_deg": sorted(
                {h.gantry_tilt_deg for h in geometry.slices if h.gantry_tilt_deg is not None}
            ),
            "shear_tilt_deg": round(geometry.tilt_deg, 3),
            "tilt_corrected": geometry.sheared,
            "shape_out": list(volume.shape),
            "spacing_out": list(spacing_out),
            "interpolation_order": order,
            "orientation": {
                "row_cosine": _round_list(geometry.row_cosine, 6),
                "col_cosine": _round_list(geometry.col_cosine, 6),
                "normal": _round_list(geometry.normal, 6),
            },
            "origin_lps_mm": _round_list(origin),
            "affine_ras": [_round_list(r, 6) for r in affine],
            "array_axes": "z, y, x (NIfTI i, j, k = x, y, z)",
            "crop_box": crop_box,
        },
        "hu": {**loaded.info["hu_conversion"], **hu_statistics(volume, mask)},
        "lung": {
            "status": lungs.status,
            "volume_ml": lung_volume,
            "left_volume_ml": lungs.left_volume_ml,
            "right_volume_ml": lungs.right_volume_ml,
            "construction": lungs.construction,
            "components": lungs.components,
            "peak_axial_area_cm2": lungs.peak_area_cm2,
            "qc_flags": lungs.qc_flags,
            "settings": cfg.lung.as_dict(),
        },
        "normalise": cfg.normalise.as_dict(),
        "warnings": warnings,
        "identifiers_included": include_identifiers,
        "versions": dicom_io.library_versions(),
    }
    if include_identifiers:
        metadata["identifiers"] = loaded.info.get("identifiers", {})
    summary = {
        "status": lungs.status,
        "warnings": warnings,
        "lung_volume_ml": lung_volume,
        "spacing_in": _round_list(spacing_in),
        "spacing_out": list(spacing_out),
        "shape_out": list(volume.shape),
        "qc_flags": lungs.qc_flags,
        "series_uid_hash": loaded.selection.group.uid_hash,
        "slices": len(geometry.slices),
    }
    for line in warnings:
        log.warning("%s", line)
    return PreprocessResult(volume, mask, affine, spacing_out, lungs.status, metadata, summary, cfg)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` with fixed member timestamps (reproducible bytes)."""
    with atomic.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            zf.writestr(info, buffer.getvalue())


def write_outputs(
    result: PreprocessResult,
    *,
    volume: str | os.PathLike,
    mask: str | os.PathLike,
    metadata: str | os.PathLike,
    qc: str | os.PathLike,
    threads: int = 1,
) -> list[dict[str, str]]:
    """Write the volume, mask, metadata, QC picture (and ``arrays.npz`` if configured)."""
    from medprep.workflow.manifest import artifact

    nifti.write_nifti(volume, result.hu, result.affine_ras, threads)
    nifti.write_nifti(mask, result.mask, result.affine_ras, threads)
    atomic.write_png(qc, qc_picture.qc_image(result.hu, result.mask, result.spacing_out))
    artifacts = [
        artifact("preprocess/volume.nii.gz", volume),
        artifact("preprocess/lung_mask.nii.gz", mask),
    ]
    if result.settings.outputs.npz:
        npz = Path(volume).with_name("arrays.npz")
        norm = result.settings.normalise
        write_npz(
            npz,
            {
                "normalised": hu.normalise(result.hu, norm.min_hu, norm.max_hu, norm.mean),
                "mask": result.mask,
                "spacing": np.asarray(result.spacing_out),
                "affine_ras": result.affine_ras,
            },
        )
        artifacts.append(artifact("preprocess/arrays.npz", npz))
    atomic.write_json(metadata, result.metadata)
    artifacts += [
        artifact("preprocess/metadata.json", metadata),
        artifact("preprocess/qc.png", qc),
    ]
    return artifacts
