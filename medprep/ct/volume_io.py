"""CT volumes as input: MetaImage (``.mhd`` + its data file, e.g. LUNA16) and NIfTI.

The thin reading edges (SimpleITK for MetaImage, nibabel for NIfTI) return the voxel array
and its geometry in DICOM patient coordinates (LPS mm); the rest of the engine then treats
the volume like a sorted DICOM stack: one ``SliceHeader`` per slice, ``stack_geometry`` for
the order along the slice normal and any shear. NIfTI world coordinates are RAS: x and y
flip on the way in, and ``nifti.affine_ras`` flips them back on the way out, so a world
point maps to the same anatomy in the input and in the published volume.

Values are taken as Hounsfield units (neither format says what its numbers are; NIfTI's
``scl_slope``/``scl_inter`` are applied). They must plausibly be HU: a CT of the chest or
body has air around or inside it, so at least ``MIN_AIR_FRACTION`` of the voxels lie within
``AIR_WINDOW_HU``; otherwise the sample fails (e.g. stored values without their rescale,
values normalised to 0-1, or an MR volume).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from medprep.common import claims
from medprep.common.errors import InputError
from medprep.ct import hu, metaimage, series

AIR_WINDOW_HU = (-1100.0, -900.0)
MIN_AIR_FRACTION = 0.001


def volume_kind(path: str) -> str | None:
    lowered = path.lower()
    if lowered.endswith(".mhd"):
        return "MetaImage"
    if lowered.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    return None


def volume_input(paths: Sequence[str]) -> str | None:
    """The volume file among a sample's files, or None when they are DICOM files.

    A sample holds one volume: its header (``.mhd``, ``.nii``, ``.nii.gz``) and, for
    MetaImage, its data file. Several volumes, or a volume mixed with other files, fail.
    """
    volumes = [p for p in paths if volume_kind(p)]
    if not volumes:
        return None
    if len(volumes) > 1:
        raise InputError(
            f"{len(volumes)} volume files in one sample ({', '.join(os.path.basename(p) for p in volumes[:3])}); "
            "give each volume its own sample",
            path=os.path.dirname(volumes[0]),
        )
    data_files: set[str] = set()
    if volume_kind(volumes[0]) == "MetaImage":
        # the header's own data files, checked to be the sample's files (see metaimage)
        header = metaimage.read_header(volumes[0], paths)
        data_files = {os.path.realpath(p) for p in header.data_files}
    others = [p for p in paths if p not in volumes and os.path.realpath(p) not in data_files]
    if others:
        raise InputError(
            f"a volume file and {len(others)} other file(s) in one sample (e.g. "
            f"{os.path.basename(others[0])}); a sample is a DICOM series or one volume",
            path=volumes[0],
        )
    return volumes[0]


@dataclasses.dataclass
class RawVolume:
    """Voxels (z, y, x) and where they are: ``origin`` (LPS mm) of voxel 0, ``axes`` whose
    columns are the unit directions (LPS) of the x, y and z indices, ``spacing`` (x, y, z)."""

    values: np.ndarray
    origin: np.ndarray
    axes: np.ndarray
    spacing: tuple[float, ...]
    kind: str
    info: dict[str, Any]


def read_metaimage(path: str, sample_files: Sequence[str]) -> RawVolume:
    """Voxels of the MetaImage at ``path``, whose data files must be among ``sample_files``
    (see ``medprep.ct.metaimage``: SimpleITK reads a header written by medprep)."""
    import tempfile

    import SimpleITK as sitk

    header = metaimage.read_header(path, sample_files)
    metaimage.check_claim(header)
    with tempfile.TemporaryDirectory(prefix="medprep-mhd-") as folder:
        checked = os.path.join(folder, "checked.mhd")
        with open(checked, "w", encoding="latin-1") as f:
            f.write(metaimage.sanitised_header(header))
        try:
            image = sitk.ReadImage(checked)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            cause = next(
                (line for line in reversed(lines) if "rror" in line), lines[-1] if lines else ""
            )
            cause = cause.replace(checked, os.path.basename(path))
            raise InputError(
                f"cannot read MetaImage: {cause[:200] or 'SimpleITK gave no reason'}", path=path
            ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"MetaImage is not a 3D greyscale volume ({image.GetDimension()}D, "
            f"{image.GetNumberOfComponentsPerPixel()} component(s))",
            path=path,
        )
    axes = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return RawVolume(
        values=sitk.GetArrayFromImage(image),  # a copy: a view dies with the image
        origin=np.array(image.GetOrigin(), dtype=float),
        axes=axes,
        spacing=tuple(float(s) for s in image.GetSpacing()),
        kind="MetaImage",
        info={"pixel_type": image.GetPixelIDTypeAsString()},
    )


def read_nifti(path: str) -> RawVolume:
    import nibabel as nib

    try:
        # whichever image class nibabel picks for the file (typed FileBasedImage, which has
        # no dataobj or affine)
        image: Any = nib.load(path)
        check_nifti_claim(image.header, path)
        values = np.asanyarray(image.dataobj)  # scl_slope / scl_inter applied
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds on bad files
        raise InputError(
            f"cannot read NIfTI: {type(error).__name__}: {error}", path=path
        ) from error
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise InputError(f"NIfTI is not a 3D volume (shape {values.shape})", path=path)
    ras = np.asarray(image.affine, dtype=float)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 0):
        raise InputError(f"NIfTI affine is not usable: {ras[:3].tolist()}", path=path)
    return RawVolume(
        values=values.transpose(2, 1, 0),  # (i, j, k) = (x, y, z) -> (z, y, x)
        origin=lps[:3, 3],
        axes=lps[:3, :3] / spacing,
        spacing=tuple(float(s) for s in spacing),
        kind="NIfTI",
        info={
            "datatype": str(image.get_data_dtype()),
            "sform_code": int(image.header["sform_code"]),
        },
    )


def check_nifti_claim(header: Any, path: str) -> None:
    """Refuse a NIfTI header whose voxels its file cannot back, before they are read.

    A single ``.nii`` holds its voxels after ``vox_offset``; a pair header (``ni1``, whose
    voxels live in a separate ``.img``) named ``.nii`` is refused, not read as voxels.
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(348)
    # nibabel reports a single file's magic whatever the file holds: read it there
    magic = head[4:8] if head[:4] in (b"\x1c\x02\0\0", b"\0\0\x02\x1c") else head[344:348]
    magic = magic.rstrip(b"\0")
    if magic not in (b"n+1", b"n+2"):
        raise InputError(
            f"not a single-file NIfTI (magic {magic!r}; a .hdr/.img pair is not read)", path=path
        )
    ndim = int(header["dim"][0])
    dims = [int(n) for n in header["dim"][1 : 1 + ndim]] if 1 <= ndim <= 7 else []
    if not dims or any(n < 1 for n in dims):
        raise InputError(f"NIfTI dimensions are not usable: {header['dim'].tolist()}", path=path)
    if any(n > metaimage.MAX_SIDE for n in dims):
        raise InputError(
            f"NIfTI dimensions {' x '.join(str(n) for n in dims)}: each side must be "
            f"1..{metaimage.MAX_SIDE}",
            path=path,
        )
    bytes_per_voxel = max(1, int(header["bitpix"]) // 8)
    claimed = math.prod(dims) * bytes_per_voxel
    size = os.path.getsize(path)
    compressed = path.lower().endswith(".gz")
    claims.check_claim(
        claimed,
        what=f"{' x '.join(str(n) for n in dims)} voxels of {bytes_per_voxel} byte(s)",
        path=path,
        stored_bytes=size if compressed else size - int(header["vox_offset"]),
        max_ratio=claims.DEFLATE_MAX_RATIO if compressed else None,
    )


def to_hu(values: np.ndarray, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """int16 HU of a volume taken as HU, after checking that it plausibly is."""
    data = np.asarray(values)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputError("volume holds NaN or infinite values", path=path)
    low, high = AIR_WINDOW_HU
    air = float(np.count_nonzero((data >= low) & (data <= high))) / max(1, data.size)
    if air < MIN_AIR_FRACTION:
        raise InputError(
            f"values do not look like HU: {100 * air:.2f}% of voxels within {low:g}..{high:g} "
            f"(air), values {float(data.min()):g}..{float(data.max()):g}; a CT volume must hold "
            "Hounsfield units (apply the rescale before exporting)",
            path=path,
        )
    below = int(np.count_nonzero(data < hu.HU_FLOOR))
    out = np.empty(data.shape, dtype=np.int16)
    if np.issubdtype(data.dtype, np.floating):
        np.clip(np.rint(data), hu.HU_FLOOR, hu.HU_CEILING, out=out, casting="unsafe")
    else:
        np.clip(data, hu.HU_FLOOR, hu.HU_CEILING, out=out, casting="unsafe")
    info = {
        "values_taken_as_hu": True,
        "air_fraction": round(air, 4),
        "clamped_below_floor": below,
        "warnings": (
            [
                f"{below} voxel(s) below {hu.HU_FLOOR} HU (padding or outside the field of view) "
                f"raised to {hu.HU_FLOOR}"
            ]
            if below
            else []
        ),  # fmt: skip
    }
    return out, info


def stack_of(volume: RawVolume, path: str) -> tuple[np.ndarray, series.SeriesGroup]:
    """The volume's slices as headers of one series, sorted later by ``stack_geometry``."""
    row, col, axis_z = volume.axes[:, 0], volume.axes[:, 1], volume.axes[:, 2]
    sx, sy, sz = volume.spacing
    nz, ny, nx = volume.values.shape
    orientation = tuple(float(v) for v in (*row, *col))
    base = series.SliceHeader(
        index=0,
        path=path,
        modality="CT",
        series_uid=f"volume:{os.path.basename(path)}",
        rows=ny,
        cols=nx,
        orientation=orientation,
        pixel_spacing=(sy, sx),
        position=tuple(float(v) for v in volume.origin),
        slice_thickness=sz,
        has_pixel_data=True,
    )
    problem = series.invalid_value(base)
    if problem:
        raise InputError(problem.replace("ImageOrientationPatient", "direction").replace(
            "PixelSpacing", "spacing").replace("ImagePositionPatient", "origin"), path=path)  # fmt: skip
    if not (np.isfinite(sz) and sz > 0) or nz < 2:
        raise InputError(f"volume needs at least 2 slices with a positive spacing ({nz}, {sz:g} mm)",
                         path=path)  # fmt: skip
    if not series.MIN_PIXEL_SPACING_MM <= sz <= series.MAX_PIXEL_SPACING_MM:
        raise InputError(
            f"slice spacing {sz:g} mm is outside [{series.MIN_PIXEL_SPACING_MM:g}, "
            f"{series.MAX_PIXEL_SPACING_MM:g}] mm (a damaged header)",
            path=path,
        )
    headers = tuple(
        dataclasses.replace(
            base, index=k, position=tuple(float(v) for v in volume.origin + k * sz * axis_z)
        )
        for k in range(nz)
    )
    group = series.SeriesGroup(base.series_uid, orientation, ny, nx, (sy, sx), headers)
    return volume.values, group


def read_volume(path: str, sample_files: Sequence[str]) -> tuple[RawVolume, series.SeriesGroup]:
    """The volume at ``path``, one of ``sample_files`` (the files it may refer to)."""
    kind = volume_kind(path)
    raw = read_metaimage(path, sample_files) if kind == "MetaImage" else read_nifti(path)
    values, group = stack_of(raw, path)
    return raw, group
