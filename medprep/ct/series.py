"""DICOM series logic on plain data: classify files, group them into series, pick one,
sort its slices along the slice normal and describe its geometry.

Nothing here touches files; ``medprep.ct.dicom_io`` turns files into ``SliceHeader``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medprep.common.errors import InputError
from medprep.ct.settings import SeriesSettings

if TYPE_CHECKING:  # pydicom is loaded by medprep.ct.dicom_io, which reads the files
    from pydicom import Dataset

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
STRUCTURED_REPORT_PREFIX = "1.2.840.10008.5.1.4.1.1.88"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A series whose slice normal is within this angle of the patient z axis counts as axial.
AXIAL_MAX_ANGLE_DEG = 45.0
# Positions closer than this along the normal are the same slice (duplicates).
DUPLICATE_TOLERANCE_MM = 0.01
# Files named at most in one warning (the rest are counted).
MAX_NAMED_FILES = 5
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
    position: tuple[float, ...] | None = None  # x, y, z
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
    frame: int | None = None  # frame index (0-based) of a multi-frame (Enhanced CT) file
    frame_of_reference_uid: str = ""
    lossy: bool = False  # lossy transfer syntax or LossyImageCompression 01
    kernel: str = ""  # ConvolutionKernel, values joined with "\\"
    # the parsed header (pixel data left on disk), kept so pixels decode without a reparse
    dataset: Dataset | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Rejected:
    index: int
    path: str
    reason: str
    series_uid: str = ""


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID, so outputs can tell series apart without it."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else ""


# Direction cosines within one series may differ by this much (writer rounding, jitter);
# series are never split by rounding values into bins.
ORIENTATION_TOLERANCE = 1e-4
# Relative difference of PixelSpacing tolerated within one series.
SPACING_TOLERANCE = 1e-4
# ImageOrientationPatient: both cosines of unit length and perpendicular within this.
ORTHONORMAL_TOLERANCE = 1e-3
# Sanity bounds: no CT has pixels this large, nor positions this far from the isocentre.
MAX_PIXEL_SPACING_MM = 100.0
# Pixels or slices closer than this are one place (DUPLICATE_TOLERANCE_MM): a spacing below
# it is a damaged header (1e-30 mm once reached the resampler and failed there).
MIN_PIXEL_SPACING_MM = DUPLICATE_TOLERANCE_MM
MAX_COORDINATE_MM = 1e6
MAX_INTERCEPT = 1e5
MIN_SLOPE, MAX_SLOPE = 1e-4, 1e3


def _show(value) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float | int) else repr(value)


def invalid_value(header: SliceHeader) -> str | None:
    """The first number that cannot enter geometry or HU, as ``invalid Tag value: why``.

    PixelSpacing finite and within [0.01, 100] mm; ImageOrientationPatient finite and orthonormal;
    ImagePositionPatient finite; RescaleSlope finite and positive; RescaleIntercept finite;
    SliceThickness (used to rank series) finite and not negative.
    """

    def bad(tag: str, value, why: str) -> str:
        return f"invalid {tag} {_show(value)}: {why}"

    spacing = header.pixel_spacing
    if spacing is not None:
        if not all(math.isfinite(v) for v in spacing):
            return bad("PixelSpacing", spacing, "not finite")
        if not all(MIN_PIXEL_SPACING_MM <= v <= MAX_PIXEL_SPACING_MM for v in spacing):
            return bad(
                "PixelSpacing",
                spacing,
                f"must be in [{MIN_PIXEL_SPACING_MM:g}, {MAX_PIXEL_SPACING_MM:g}] mm",
            )
    orientation = header.orientation
    if orientation is not None:
        if not all(math.isfinite(v) for v in orientation):
            return bad("ImageOrientationPatient", orientation, "not finite")
        row = np.asarray(orientation[:3], dtype=float)
        col = np.asarray(orientation[3:6], dtype=float)
        norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
        if any(abs(n - 1) > ORTHONORMAL_TOLERANCE for n in norms):
            return bad(
                "ImageOrientationPatient",
                orientation,
                f"row/column cosines of length {norms[0]:.4g}/{norms[1]:.4g}, not 1",
            )
        if abs(float(row @ col)) > ORTHONORMAL_TOLERANCE:
            return bad(
                "ImageOrientationPatient",
                orientation,
                f"row and column cosines not perpendicular (dot product {float(row @ col):.4g})",
            )
    position = header.position
    if position is not None:
        if not all(math.isfinite(v) for v in position):
            return bad("ImagePositionPatient", position, "not finite")
        if not all(abs(v) <= MAX_COORDINATE_MM for v in position):
            return bad("ImagePositionPatient", position, f"beyond {MAX_COORDINATE_MM:g} mm")
    slope = header.rescale_slope
    if slope is not None and not (math.isfinite(slope) and MIN_SLOPE <= slope <= MAX_SLOPE):
        return bad("RescaleSlope", slope, f"must be finite and in [{MIN_SLOPE:g}, {MAX_SLOPE:g}]")
    intercept = header.rescale_intercept
    if intercept is not None and not (math.isfinite(intercept) and abs(intercept) <= MAX_INTERCEPT):
        return bad("RescaleIntercept", intercept, f"must be finite, within +-{MAX_INTERCEPT:g}")
    thickness = header.slice_thickness
    if thickness is not None and not (math.isfinite(thickness) and thickness >= 0):
        return bad("SliceThickness", thickness, "must be finite and not negative")
    return None


def rejection_reason(header: SliceHeader) -> str | None:
    """Why this file cannot be a slice of a CT volume, or None if it can.

    Reasons starting with ``invalid`` name a tag whose value is unusable: such a file is an
    error (not skipped) when it belongs to the chosen series or when no series is left.
    """
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
    if header.frames > 1 and header.frame is None:
        return f"multi-frame image ({header.frames} frames) without per-frame functional groups"
    if header.samples_per_pixel != 1:
        return "not a greyscale image"
    missing = [
        name
        for name, value in (
            ("ImagePositionPatient", header.position),
            ("ImageOrientationPatient", header.orientation),
            ("PixelSpacing", header.pixel_spacing),
        )
        if not value
    ]
    if missing and not header.series_uid:
        # an empty UID alone is fine (grouped by geometry); with more missing, name it too
        missing.insert(0, "SeriesInstanceUID")
    if missing or header.rows < 1 or header.cols < 1:
        return "missing " + ", ".join(missing or ["Rows/Columns"])
    return invalid_value(header)


@dataclasses.dataclass(frozen=True)
class SeriesGroup:
    """Files of one series with the same orientation, matrix and pixel spacing (within
    tolerances). Files with an empty SeriesInstanceUID are grouped by geometry: frame of
    reference, SeriesNumber, kernel, matrix, orientation and pixel spacing."""

    series_uid: str
    orientation: tuple[float, ...]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    slices: tuple[SliceHeader, ...]

    @property
    def key(self) -> str:
        """The UID, or for an empty UID a stand-in made of what grouped the files."""
        if self.series_uid:
            return self.series_uid
        first = self.slices[0]
        return "|".join(
            [
                "blank-uid",
                first.frame_of_reference_uid,
                str(first.series_number),
                first.kernel,
                f"{self.rows}x{self.cols}",
                ",".join(f"{v:.4f}" for v in self.orientation),
                ",".join(f"{v:.4f}" for v in self.pixel_spacing),
            ]
        )

    @property
    def uid_hash(self) -> str:
        return uid_hash(self.key)

    @functools.cached_property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation)

    @property
    def axial_angle_deg(self) -> float:
        return math.degrees(math.acos(min(1.0, abs(float(self.normal[2])))))

    @property
    def is_axial(self) -> bool:
        return self.axial_angle_deg <= AXIAL_MAX_ANGLE_DEG

    @functools.cached_property
    def _sorted_distances(self) -> np.ndarray:
        return np.sort(np.array([s.position for s in self.slices], dtype=float) @ self.normal)

    def _distances(self) -> np.ndarray:
        return self._sorted_distances

    @property
    def unique_positions(self) -> int:
        d = self._distances()
        return int(1 + np.count_nonzero(np.diff(d) > DUPLICATE_TOLERANCE_MM)) if d.size else 0

    @property
    def extent_mm(self) -> float:
        d = self._distances()
        return float(d[-1] - d[0]) if d.size else 0.0

    @property
    def median_step_mm(self) -> float | None:
        d = self._distances()
        steps = np.diff(d)
        steps = steps[steps > DUPLICATE_TOLERANCE_MM]
        return float(np.median(steps)) if steps.size else None

    @property
    def slice_thickness_mm(self) -> float | None:
        """Median SliceThickness tag (0 and absent count as unknown)."""
        values = [s.slice_thickness for s in self.slices if s.slice_thickness]
        return float(np.median(values)) if values else None

    @property
    def thickness_for_ranking(self) -> float | None:
        return self.slice_thickness_mm or self.median_step_mm

    @property
    def kernel(self) -> str:
        return self.slices[0].kernel

    @property
    def image_type(self) -> tuple[str, ...]:
        return self.slices[0].image_type

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0].upper() == "DERIVED"

    def describe(self, include_identifiers: bool = False) -> dict:
        """Facts about the series for metadata; free text (SeriesDescription) and the UID
        only with ``include_identifiers``."""
        out = {
            "series_uid_hash": self.uid_hash,
            "series_uid_empty": not self.series_uid,
            "series_number": self.slices[0].series_number,
            "files": len(self.slices),
            "slices": self.unique_positions,
            "slice_thickness_mm": _rounded(self.slice_thickness_mm),
            "slice_step_mm": _rounded(self.median_step_mm),
            "extent_mm": _rounded(self.extent_mm, 2),
            "kernel": self.kernel,
            "image_type": list(self.image_type),
            "matrix": [self.rows, self.cols],
            "pixel_spacing_mm": list(self.pixel_spacing),
            "axial": self.is_axial,
        }
        if include_identifiers:
            out["series_uid"] = self.series_uid
            out["description"] = self.slices[0].series_description
        return out


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _exact_key(h: SliceHeader) -> tuple:
    if h.series_uid:
        return (h.series_uid, h.rows, h.cols)
    return ("", h.frame_of_reference_uid, h.series_number, h.kernel, h.rows, h.cols)


def _placed(header: SliceHeader) -> tuple[tuple[float, ...], tuple[float, float]]:
    """The orientation and pixel spacing of a header that may be grouped.

    Only headers that passed ``rejection_reason`` are grouped, and it refuses a missing
    ImageOrientationPatient or PixelSpacing.
    """
    assert header.orientation is not None and header.pixel_spacing is not None
    return header.orientation, header.pixel_spacing


def _position(header: SliceHeader) -> tuple[float, ...]:
    """The ImagePositionPatient of a grouped header (``rejection_reason`` refuses it missing)."""
    assert header.position is not None
    return header.position


def _same_geometry(a: SliceHeader, b: SliceHeader) -> bool:
    (a_orientation, a_spacing), (b_orientation, b_spacing) = _placed(a), _placed(b)
    if max(abs(x - y) for x, y in zip(a_orientation, b_orientation, strict=True)) > (
        ORIENTATION_TOLERANCE
    ):
        return False
    return all(
        abs(x - y) <= SPACING_TOLERANCE * max(abs(x), abs(y))
        for x, y in zip(a_spacing, b_spacing, strict=True)
    )


def _series_group(members: Sequence[SliceHeader]) -> SeriesGroup:
    first = members[0]
    orientation, pixel_spacing = _placed(first)
    return SeriesGroup(
        first.series_uid, orientation, first.rows, first.cols, pixel_spacing, tuple(members)
    )


def group_series(headers: Iterable[SliceHeader]) -> list[SeriesGroup]:
    """Group by series UID (or geometry, when the UID is empty), matrix, and orientation and
    pixel spacing compared with tolerances against each group's first file.

    ``headers`` are those that ``rejection_reason`` accepted (their geometry is present).
    """
    buckets: dict[tuple, list[list[SliceHeader]]] = collections.defaultdict(list)
    for h in sorted(headers, key=lambda h: (h.index, h.frame or 0)):
        candidates = buckets[_exact_key(h)]
        for members in candidates:
            if _same_geometry(members[0], h):
                members.append(h)
                break
        else:
            candidates.append([h])
    groups = [_series_group(members) for lists in buckets.values() for members in lists]
    groups.sort(key=lambda g: (g.uid_hash, g.orientation, g.rows, g.cols))
    return groups


def split_from_series(
    chosen: SeriesGroup, others: Sequence[SeriesGroup], folder: str | None = None
) -> tuple[str, ...]:
    """Warnings naming the files that carry the chosen series' UID but were grouped apart
    (another matrix, pixel spacing or orientation): they are not in the volume, and the
    stack has a gap where they were. File names are relative to ``folder`` when given.
    """
    if not chosen.series_uid:
        return ()
    out = []
    for group in others:
        if group.series_uid != chosen.series_uid:
            continue
        why = []
        if (group.rows, group.cols) != (chosen.rows, chosen.cols):
            why.append(f"{group.rows} x {group.cols} pixels, not {chosen.rows} x {chosen.cols}")
        a, b = group.pixel_spacing, chosen.pixel_spacing
        if (
            a is not None
            and b is not None
            and any(
                abs(x - y) > SPACING_TOLERANCE * max(abs(x), abs(y))
                for x, y in zip(a, b, strict=True)
            )
        ):
            why.append(f"pixel spacing {_show(a)} mm, not {_show(b)}")
        names = sorted(
            {os.path.relpath(h.path, folder) if folder else h.path for h in group.slices}
        )
        shown = ", ".join(names[:MAX_NAMED_FILES])
        if len(names) > MAX_NAMED_FILES:
            shown += f" and {len(names) - MAX_NAMED_FILES} more"
        out.append(
            f"{len(names)} file(s) of the chosen series left out of the volume "
            f"({'; '.join(why) or 'another orientation'}): {shown}"
        )
    return tuple(out)


def _matches(patterns: Sequence[str], text: str) -> bool:
    return bool(text) and any(re.search(p, text, re.IGNORECASE) for p in patterns)


# Criteria in order of importance; each maps a series to a number, higher is better.
CRITERIA = ("eligible", "not_avoided", "original", "preferred", "coverage", "thickness",
            "slices", "pixels")  # fmt: skip
# a series covering less than this fraction of the longest candidate's extent is partial
PARTIAL_COVERAGE = 0.5
# runner-up this close (relative) in thickness and slice count is a near-tie
NEAR_TIE = 0.1


def _facts(group: SeriesGroup, prefs: SeriesSettings, by_sheet: bool) -> dict:
    description = group.slices[0].series_description
    avoided_kernel = _matches(prefs.avoid_kernels, group.kernel)
    avoided_description = _matches(prefs.avoid_descriptions, description)
    preferred = _matches(prefs.prefer_kernels, group.kernel) or _matches(
        prefs.prefer_descriptions, description
    )
    thickness = group.thickness_for_ranking
    return {
        "eligible": group.unique_positions >= 2 and (group.is_axial or by_sheet),
        "avoided_kernel": avoided_kernel,
        "avoided_description": avoided_description,
        "preferred": preferred,
        "thickness": thickness,
        "group": group,
    }


def _score(facts: dict, prefs: SeriesSettings, longest: float) -> tuple:
    group = facts["group"]
    thickness = facts["thickness"] if facts["thickness"] is not None else 1e6
    sign = -1 if prefs.slice_thickness == "thinnest" else 1
    return (
        int(facts["eligible"]),
        int(not (facts["avoided_kernel"] or facts["avoided_description"])),
        int(not (prefs.avoid_derived and group.derived)),
        int(facts["preferred"]),
        int(group.extent_mm >= PARTIAL_COVERAGE * longest),
        sign * round(thickness, 2),
        group.unique_positions,
        -round(min(group.pixel_spacing), 4),
    )


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} mm"


def _loss(criterion: str, loser: dict, winner: dict, prefs: SeriesSettings) -> str:
    """Why ``loser`` ranks below ``winner`` at ``criterion`` (no free text quoted)."""
    g, w = loser["group"], winner["group"]
    if criterion == "eligible":
        if g.unique_positions < 2:
            return "a single slice"
        return f"not axial (normal {g.axial_angle_deg:.0f} degrees from the patient axis)"
    if criterion == "not_avoided":
        if loser["avoided_kernel"]:
            return f"kernel {g.kernel} matches ct.series.avoid_kernels"
        return "SeriesDescription matches ct.series.avoid_descriptions"
    if criterion == "original":
        return f"derived image (ImageType {'/'.join(g.image_type)})"
    if criterion == "preferred":
        return f"kernel {g.kernel or 'unknown'} (and description) not in the preferred patterns"
    if criterion == "coverage":
        return f"partial coverage ({g.extent_mm:.0f} mm against {w.extent_mm:.0f} mm)"
    if criterion == "thickness":
        word = "thicker" if prefs.slice_thickness == "thinnest" else "thinner"
        return f"{word} slices ({_mm(loser['thickness'])} against {_mm(winner['thickness'])})"
    if criterion == "slices":
        return f"fewer slices ({g.unique_positions} against {w.unique_positions})"
    if criterion == "pixels":
        return f"coarser pixels ({min(g.pixel_spacing):g} mm against {min(w.pixel_spacing):g} mm)"
    return "same rank as the chosen series; order by UID hash"


@dataclasses.dataclass(frozen=True)
class Selection:
    group: SeriesGroup
    reason: str
    others: tuple[SeriesGroup, ...]
    ranking: tuple[dict, ...] = ()  # per series, best first: facts, rank, reason (no free text)
    warnings: tuple[str, ...] = ()


def sheet_match(group: SeriesGroup, wanted: str) -> str | None:
    """How the sample sheet's ``series_uid`` names this series: ``UID``, ``UID hash`` or
    ``SeriesNumber``; None when it does not."""
    wanted = str(wanted).strip()
    if group.series_uid and wanted == group.series_uid:
        return "UID"
    if wanted.lower() == group.uid_hash:
        return "UID hash"
    number = group.slices[0].series_number
    if re.fullmatch(r"\d+(\.0+)?", wanted) and number is not None and int(float(wanted)) == number:
        return "SeriesNumber"
    return None


def _single_slice_message(groups: Sequence[SeriesGroup]) -> str:
    n = len(groups)
    what = "1 series of one slice" if n == 1 else f"{n} series of one slice each"
    return f"{what}: a single slice is not a volume (at least 2 slices are needed)"


def select_series(
    groups: Sequence[SeriesGroup],
    series_uid: str | None = None,
    preferences: SeriesSettings | None = None,
) -> Selection:
    """Rank the series and take the best, or the one the sample sheet names.

    The sheet's ``series_uid`` may be the full UID, the published 12-character hash or the
    SeriesNumber. Otherwise, in order: at least 2 slices and axial; not matching an avoid
    pattern; original rather than derived; matching a prefer pattern; covering at least half
    the longest extent; thinnest (or thickest) slices; most slices; finest pixels; then UID
    hash (stable, independent of file order).
    """
    prefs = preferences or SeriesSettings()
    if not groups:
        raise InputError("no usable CT series")
    matched: dict[int, str] = {}
    if series_uid:
        matched = {id(g): how for g in groups if (how := sheet_match(g, series_uid)) is not None}
        if not matched:
            available = ", ".join(
                f"{g.uid_hash} (SeriesNumber {g.slices[0].series_number}, "
                f"{g.unique_positions} slices)"
                for g in groups
            )
            raise InputError(
                f"series_uid from the sample sheet is not among the CT series found "
                f"(the sheet may give the UID, the UID hash or the SeriesNumber; series "
                f"found: {available})"
            )
    elif all(g.unique_positions < 2 for g in groups):
        raise InputError(_single_slice_message(groups))
    elif not any(g.is_axial and g.unique_positions >= 2 for g in groups):
        raise InputError(
            f"no axial CT series among {len(groups)} series (slice normals more than "
            f"{AXIAL_MAX_ANGLE_DEG:g} degrees from the patient axis); set series_uid in "
            "the sample sheet to use a non-axial one"
        )
    facts = [_facts(g, prefs, bool(matched)) for g in groups]
    longest = max((f["group"].extent_mm for f in facts if f["eligible"]), default=0.0)
    scores = {id(f["group"]): _score(f, prefs, longest) for f in facts}

    def order(f: dict) -> tuple:
        g = f["group"]
        return (0 if id(g) in matched or not matched else 1,
                tuple(-v for v in scores[id(g)]), g.uid_hash)  # fmt: skip

    facts.sort(key=order)
    best = facts[0]
    chosen = best["group"]

    def deciding(loser: dict) -> str:
        if matched and id(loser["group"]) not in matched:
            return "sheet"
        a, b = scores[id(loser["group"])], scores[id(chosen)]
        return next((c for c, x, y in zip(CRITERIA, a, b, strict=True) if x != y), "tie")

    candidates = [f for f in facts if f["eligible"]]
    if matched:
        reason = f"series_uid from the sample sheet (matched by {matched[id(chosen)]})"
        if len(matched) > 1:
            reason += f", best ranked of {len(matched)} series with that {matched[id(chosen)]}"
    elif len(candidates) == 1:
        reason = f"largest axial CT series ({chosen.unique_positions} slices)"
    else:
        runner = candidates[1]
        criterion = deciding(runner)
        if criterion == "slices":
            reason = (
                f"largest axial CT series ({chosen.unique_positions} slices of "
                f"{len(candidates)} axial series)"
            )
        else:
            reason = (
                f"best ranked of {len(candidates)} axial series; the next one ranks lower: "
                f"{_loss(criterion, runner, best, prefs)}"
            )
    warnings = []
    ranking = []
    for rank, f in enumerate(facts, start=1):
        g = f["group"]
        if g is chosen:
            why = "chosen: " + reason
        elif deciding(f) == "sheet":
            why = "not chosen: not the series named by series_uid in the sample sheet"
        else:
            why = "not chosen: " + _loss(deciding(f), f, best, prefs)
        ranking.append({"rank": rank, **g.describe(False), "chosen": g is chosen, "reason": why})
    if not matched and len(candidates) > 1:
        runner = candidates[1]
        criterion = deciding(runner)
        r = runner["group"]
        close = (
            r.derived == chosen.derived
            and r.unique_positions >= (1 - NEAR_TIE) * chosen.unique_positions
            and _close(runner["thickness"], best["thickness"])
        )
        if close and criterion not in ("coverage",):
            warnings.append(
                f"near-tie between series {chosen.uid_hash} and {r.uid_hash} "
                f"({chosen.unique_positions} and {r.unique_positions} slices, "
                f"{_mm(best['thickness'])} and {_mm(runner['thickness'])}, kernels "
                f"{chosen.kernel or 'unknown'} and {r.kernel or 'unknown'}): took "
                f"{chosen.uid_hash} because the other has "
                f"{_loss(criterion, runner, best, prefs)}; to take the other, set series_uid "
                f"in the sample sheet to {r.uid_hash}"
                + (
                    f" or SeriesNumber {r.slices[0].series_number}"
                    if r.slices[0].series_number is not None
                    else ""
                )  # fmt: skip
            )
    others = tuple(f["group"] for f in facts[1:])
    return Selection(chosen, reason, others, tuple(ranking), tuple(warnings))


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= NEAR_TIE * max(a, b)


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
            float(np.dot(_position(h), normal)),
            h.instance_number if h.instance_number is not None else 1 << 30,
            h.index,
        ),
    )
    kept: list[SliceHeader] = []
    duplicates: list[SliceHeader] = []
    last = None
    for h in ordered:
        d = float(np.dot(_position(h), normal))
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
