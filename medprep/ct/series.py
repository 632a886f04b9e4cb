"""DICOM series logic on plain data: classify files, group them into series, pick one,
sort its slices along the slice normal and describe its geometry.

Nothing here touches files; ``medprep.ct.dicom_io`` turns files into ``SliceHeader``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np

from medprep.errors import InputError

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
STRUCTURED_REPORT_PREFIX = "1.2.840.10008.5.1.4.1.1.88"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A series whose slice normal is within this angle of the patient z axis counts as axial.
AXIAL_MAX_ANGLE_DEG = 45.0
# Positions closer than this along the normal are the same slice (duplicates).
DUPLICATE_TOLERANCE_MM = 0.01
# A step this many times the median step is a gap (missing slices).
GAP_FACTOR = 1.5


@dataclasses.dataclass(frozen=True, eq=False)
class SliceHeader:
    """What the loader needs from one DICOM file, read without its pixels."""

    index: int  # position in the list of input files
    path: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    modality: str = ""
    series_uid: str = ""
    series_number: int | None = None
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    rows: int = 0
    cols: int = 0
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None  # row cosines then column cosines
    pixel_spacing: tuple[float, float] | None = None  # between rows, between columns (mm)
    instance_number: int | None = None
    slice_thickness: float | None = None
    frames: int = 1
    samples_per_pixel: int = 1
    has_pixel_data: bool = False
    pixel_data_truncated: bool = False
    transfer_syntax: str = ""
    preamble: bool = True
    gantry_tilt_deg: float | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    rescale_type: str | None = None
    modality_lut: tuple[tuple[int, ...], int] | None = None  # (LUT entries, first stored value)
    pixel_representation: int = 0
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_data_offset: int | None = None  # file offset of native pixel data, else None
    padding_value: int | None = None
    padding_range_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class Rejected:
    index: int
    path: str
    reason: str
    series_uid: str = ""


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID, so outputs can tell series apart without it."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else ""


def rejection_reason(header: SliceHeader) -> str | None:
    """Why this file cannot be a slice of a CT volume, or None if it can."""
    sop = header.sop_class_uid
    image_type = {t.upper() for t in header.image_type}
    if sop == DICOMDIR_SOP_CLASS:
        return "DICOMDIR"
    if sop.startswith(STRUCTURED_REPORT_PREFIX) or header.modality == "SR":
        return "structured report (dose report)"
    if sop.startswith(SECONDARY_CAPTURE_PREFIX) or "SCREEN SAVE" in image_type:
        return "secondary capture"
    if header.modality != "CT":
        return f"modality {header.modality or 'missing'} (not CT)"
    if image_type & {"LOCALIZER", "SCOUT", "TOPOGRAM"}:
        return "localizer"
    if header.frames > 1:
        return f"multi-frame image ({header.frames} frames; only single-frame CT slices are read)"
    if header.samples_per_pixel != 1:
        return "not a greyscale image"
    missing = [
        name
        for name, value in (
            ("SeriesInstanceUID", header.series_uid),
            ("ImagePositionPatient", header.position),
            ("ImageOrientationPatient", header.orientation),
            ("PixelSpacing", header.pixel_spacing),
        )
        if not value
    ]
    if missing or header.rows < 1 or header.cols < 1:
        return "missing " + ", ".join(missing or ["Rows/Columns"])
    return None


@dataclasses.dataclass(frozen=True)
class SeriesGroup:
    """Files sharing series UID, orientation, matrix size and pixel spacing."""

    series_uid: str
    orientation: tuple[float, ...]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    slices: tuple[SliceHeader, ...]

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation)

    @property
    def axial_angle_deg(self) -> float:
        return math.degrees(math.acos(min(1.0, abs(float(self.normal[2])))))

    @property
    def is_axial(self) -> bool:
        return self.axial_angle_deg <= AXIAL_MAX_ANGLE_DEG

    @property
    def unique_positions(self) -> int:
        d = np.sort([float(np.dot(s.position, self.normal)) for s in self.slices])
        return int(1 + np.count_nonzero(np.diff(d) > DUPLICATE_TOLERANCE_MM)) if d.size else 0

    def describe(self, include_identifiers: bool = False) -> dict:
        out = {
            "series_uid_hash": uid_hash(self.series_uid),
            "files": len(self.slices),
            "slices": self.unique_positions,
            "matrix": [self.rows, self.cols],
            "pixel_spacing_mm": list(self.pixel_spacing),
            "axial": self.is_axial,
            "description": self.slices[0].series_description,
            "series_number": self.slices[0].series_number,
        }
        if include_identifiers:
            out["series_uid"] = self.series_uid
        return out


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def group_series(headers: Iterable[SliceHeader]) -> list[SeriesGroup]:
    buckets: dict[tuple, list[SliceHeader]] = collections.defaultdict(list)
    for h in headers:
        key = (
            h.series_uid,
            tuple(round(v, 3) for v in h.orientation),
            h.rows,
            h.cols,
            tuple(round(v, 4) for v in h.pixel_spacing),
        )
        buckets[key].append(h)
    groups = []
    for (uid, _, rows, cols, spacing), members in buckets.items():
        members.sort(key=lambda h: h.index)
        groups.append(SeriesGroup(uid, members[0].orientation, rows, cols, spacing, tuple(members)))
    groups.sort(key=lambda g: (uid_hash(g.series_uid), g.orientation, g.rows, g.cols))
    return groups


@dataclasses.dataclass(frozen=True)
class Selection:
    group: SeriesGroup
    reason: str
    others: tuple[SeriesGroup, ...]


def select_series(groups: Sequence[SeriesGroup], series_uid: str | None = None) -> Selection:
    """The sample sheet's ``series_uid`` if given, else the largest axial CT series."""
    if not groups:
        raise InputError("no usable CT series")
    if series_uid:
        matching = [g for g in groups if g.series_uid == series_uid]
        if not matching:
            available = ", ".join(
                f"{uid_hash(g.series_uid)} ({g.unique_positions} slices)" for g in groups
            )
            raise InputError(
                f"series_uid from the sample sheet is not among the CT series found "
                f"(series found, by UID hash: {available})"
            )
        chosen = max(matching, key=_size_key)
        reason = "series_uid from the sample sheet"
        if len(matching) > 1:
            reason += f" (largest of {len(matching)} orientation/matrix groups with that UID)"
    else:
        axial = [g for g in groups if g.is_axial]
        if not axial:
            raise InputError(
                f"no axial CT series among {len(groups)} series (slice normals more than "
                f"{AXIAL_MAX_ANGLE_DEG:g} degrees from the patient axis); set series_uid in "
                "the sample sheet to use a non-axial one"
            )
        chosen = max(axial, key=_size_key)
        reason = f"largest axial CT series ({chosen.unique_positions} slices"
        reason += f" of {len(axial)} axial series)" if len(axial) > 1 else ")"
    others = tuple(g for g in groups if g is not chosen)
    return Selection(chosen, reason, others)


def _size_key(group: SeriesGroup) -> tuple:
    # most slices, then finest pixels, then a stable order independent of file order
    return (group.unique_positions, -min(group.pixel_spacing), uid_hash(group.series_uid))


@dataclasses.dataclass(frozen=True)
class StackGeometry:
    """The chosen slices in order along the normal, and where each one is.

    Coordinates are in the slice frame: ``positions`` along the normal (mm), ``offsets``
    (rows: slices; columns: along the row direction, along the column direction; mm) of
    each slice's first pixel relative to the first slice's, after removing the part along
    the normal. Non-zero offsets mean a sheared stack (gantry tilt).
    """

    slices: tuple[SliceHeader, ...]
    duplicates: tuple[SliceHeader, ...]
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (y: between rows, x: between columns)
    positions: np.ndarray
    offsets: np.ndarray
    origin: np.ndarray  # patient position (LPS) of the first slice's first pixel
    tilt_deg: float
    warnings: tuple[str, ...]

    @property
    def sheared(self) -> bool:
        return self.tilt_deg > 0

    @property
    def steps(self) -> np.ndarray:
        return np.diff(self.positions)

    @property
    def median_step(self) -> float:
        return float(np.median(self.steps)) if len(self.slices) > 1 else float("nan")


def stack_geometry(group: SeriesGroup) -> StackGeometry:
    """Sort by position on the slice normal, drop duplicates, measure spacing and shear."""
    normal = group.normal
    row = np.asarray(group.orientation[:3], dtype=float)
    col = np.asarray(group.orientation[3:6], dtype=float)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    # ties on position: keep the lowest instance number, then the first file
    ordered = sorted(
        group.slices,
        key=lambda h: (
            float(np.dot(h.position, normal)),
            h.instance_number if h.instance_number is not None else 1 << 30,
            h.index,
        ),
    )
    kept: list[SliceHeader] = []
    duplicates: list[SliceHeader] = []
    last = None
    for h in ordered:
        d = float(np.dot(h.position, normal))
        if last is not None and d - last <= DUPLICATE_TOLERANCE_MM:
            duplicates.append(h)
            continue
        kept.append(h)
        last = d
    points = np.array([h.position for h in kept], dtype=float)
    positions = points @ normal
    rel = points - points[0]
    in_plane = rel - np.outer(positions - positions[0], normal)
    offsets = np.stack([in_plane @ row, in_plane @ col], axis=1)
    warnings: list[str] = []
    if duplicates:
        warnings.append(f"{len(duplicates)} duplicate slice(s) at an already used position dropped")
    shear = float(np.max(np.linalg.norm(offsets, axis=1))) if len(kept) > 1 else 0.0
    tilt_deg = 0.0
    if shear > 0.05 * min(group.pixel_spacing):
        tilt_deg = math.degrees(
            math.atan2(float(np.linalg.norm(offsets[-1])), float(positions[-1] - positions[0]))
        )
    if len(kept) > 1:
        steps = np.diff(positions)
        median = float(np.median(steps))
        if steps.max() - steps.min() > 0.01 + 0.01 * median:
            warnings.append(
                f"uneven slice spacing {steps.min():.2f}-{steps.max():.2f} mm "
                f"(median {median:.2f} mm); resampled from the real positions"
            )
        gaps = np.flatnonzero(steps > GAP_FACTOR * median)
        if gaps.size:
            widest = int(gaps[np.argmax(steps[gaps])])
            warnings.append(
                f"{gaps.size} step(s) wider than {GAP_FACTOR:g}x the median step, the widest "
                f"{steps[widest]:.2f} mm after slice {widest + 1} of {len(kept)} "
                "(missing slices?); interpolated across"
            )
    return StackGeometry(
        slices=tuple(kept),
        duplicates=tuple(duplicates),
        row_cosine=row,
        col_cosine=col,
        normal=normal,
        pixel_spacing=(float(group.pixel_spacing[0]), float(group.pixel_spacing[1])),
        positions=positions,
        offsets=offsets,
        origin=points[0],
        tilt_deg=tilt_deg,
        warnings=tuple(warnings),
    )


def describe_rejections(rejected: Sequence[Rejected]) -> str:
    counts = collections.Counter(r.reason for r in rejected)
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda x: -x[1]))
