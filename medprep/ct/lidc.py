"""LIDC-IDRI reader annotations (the per-scan XML) as plain dataclasses, and their geometry.

An LIDC XML file (``LidcReadMessage``) holds one ``readingSession`` per radiologist. Each
session lists ``unblindedReadNodule`` elements: a nodule of 3 mm or more has one ``roi`` per
slice it appears on (an outline of ``edgeMap`` x/y pixel points on the slice given by
``imageSOP_UID`` and ``imageZposition``, ``inclusion`` TRUE for the nodule's outline and
FALSE for a hole to cut out) and ``characteristics`` (subtlety, malignancy, ...); a nodule
under 3 mm is a single point and has no characteristics. ``nonNodule`` elements are single
points of findings that are not nodules.

Pixel points are (x = column, y = row) indices of the slice. The readers were asked to
draw the outline just outside the nodule; ``filled_outlines`` returns the polygon's
interior together with its outline pixels, the larger (conservative) area;
``boundary=False`` gives the pixels strictly inside alone.

Geometry: ``SliceFrame`` holds what maps a slice's pixel to patient coordinates (DICOM LPS,
mm); ``reading_points_lps`` turns a reading's filled outlines into patient coordinates and
``reading_extent`` gives its centroid, volume and diameters. Only the XML is read here
(the standard library's parser); DICOM headers come from the caller.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

import numpy as np

from medprep.common import claims
from medprep.common.errors import InputError

SMALL_NODULE_MM = 3.0  # LIDC: nodules below this size are marked by one point


@dataclasses.dataclass(frozen=True)
class Outline:
    """One ``roi``: a closed polygon of pixel points on one slice."""

    sop_uid: str
    z_position: float  # imageZposition (mm), as the reader's software recorded it
    inclusion: bool  # False: a region to subtract (a hole in the nodule)
    points: np.ndarray  # (n, 2) int: x (column), y (row)


@dataclasses.dataclass(frozen=True)
class NoduleReading:
    """One radiologist's reading of one nodule."""

    reader: int  # index of the reading session in the file (0, 1, ...)
    nodule_id: str  # as the reader's software named it; unique within a session only
    outlines: tuple[Outline, ...]
    characteristics: dict[str, int]  # empty for nodules under 3 mm

    @property
    def is_small(self) -> bool:
        """A nodule under 3 mm: a single marked point, without characteristics."""
        return not self.characteristics and all(len(o.points) == 1 for o in self.outlines)

    @property
    def sop_uids(self) -> list[str]:
        return sorted({o.sop_uid for o in self.outlines})


@dataclasses.dataclass(frozen=True)
class NonNodule:
    reader: int
    non_nodule_id: str
    sop_uid: str
    z_position: float
    point: tuple[int, int]  # x (column), y (row)


@dataclasses.dataclass(frozen=True)
class LidcAnnotations:
    series_uid: str
    study_uid: str
    readers: int  # number of reading sessions
    nodules: tuple[NoduleReading, ...]
    non_nodules: tuple[NonNodule, ...]

    def large_nodules(self) -> list[NoduleReading]:
        """Readings of nodules of 3 mm or more (those with outlines)."""
        return [n for n in self.nodules if not n.is_small]


@dataclasses.dataclass(frozen=True)
class SliceFrame:
    """Where a slice's pixels are in patient space (DICOM LPS, mm)."""

    # LPS x, y, z:
    origin: tuple[float, ...]  # ImagePositionPatient: centre of pixel (0, 0)
    row_cosine: tuple[float, ...]  # direction of increasing column index (x)
    col_cosine: tuple[float, ...]  # direction of increasing row index (y)
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    shape: tuple[int, int]  # rows, columns

    def to_lps(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n, 3) patient coordinates of pixel centres (row, column)."""
        rows = np.asarray(rows, dtype=np.float64)[:, None]
        cols = np.asarray(cols, dtype=np.float64)[:, None]
        return (
            np.asarray(self.origin)[None]
            + cols * self.pixel_spacing[1] * np.asarray(self.row_cosine)[None]
            + rows * self.pixel_spacing[0] * np.asarray(self.col_cosine)[None]
        )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ET.Element, name: str, default: str = "") -> str:
    child = _child(element, name)
    return (child.text or "").strip() if child is not None and child.text else default


def _point(element: ET.Element, where: str) -> tuple[int, int]:
    try:
        x, y = int(_text(element, "xCoord")), int(_text(element, "yCoord"))
    except ValueError:
        raise ValueError(f"{where}: a point without integer xCoord/yCoord") from None
    for name, value in (("xCoord", x), ("yCoord", y)):
        problem = claims.coordinate_problem(float(value), "pixels")
        if problem:
            raise ValueError(f"{where}: {name} {problem}")
    return x, y


def _float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: imageZposition {text!r} is not a number") from None
    problem = claims.coordinate_problem(value, "mm")
    if problem:
        raise ValueError(f"{where}: imageZposition {problem}")
    return value


def _parse_roi(roi: ET.Element, where: str) -> Outline:
    sop = _text(roi, "imageSOP_UID")
    if not sop:
        raise ValueError(f"{where}: roi without imageSOP_UID")
    inclusion = _text(roi, "inclusion", "TRUE").upper()
    if inclusion not in ("TRUE", "FALSE"):
        raise ValueError(f"{where}: inclusion {inclusion!r} is neither TRUE nor FALSE")
    points = [_point(e, where) for e in _children(roi, "edgeMap")]
    if not points:
        raise ValueError(f"{where}: roi without edgeMap points")
    return Outline(
        sop_uid=sop,
        z_position=_float(_text(roi, "imageZposition"), where),
        inclusion=inclusion == "TRUE",
        points=np.asarray(points, dtype=np.int64).reshape(-1, 2),
    )


def parse_lidc_xml(source: str | os.PathLike | bytes) -> LidcAnnotations:
    """Parse an LIDC ``LidcReadMessage`` (a path, or the XML as bytes).

    Raises ``InputError`` naming the file and the problem when it is not LIDC XML or an
    element is malformed. Reader identifiers (``servicingRadiologistID``) are not kept.
    """
    path = None if isinstance(source, bytes) else os.fspath(source)
    try:
        root = ET.fromstring(source) if isinstance(source, bytes) else ET.parse(source).getroot()
    except (ET.ParseError, OSError) as error:
        raise InputError(f"not readable as LIDC XML ({error})", path=path) from None
    if _local(root.tag) != "LidcReadMessage":
        raise InputError(
            f"not an LIDC annotation file (root element {_local(root.tag)!r}, "
            "expected 'LidcReadMessage')",
            path=path,
        )
    header = _child(root, "ResponseHeader")
    series_uid = _text(header, "SeriesInstanceUid") if header is not None else ""
    study_uid = _text(header, "StudyInstanceUID") if header is not None else ""
    nodules: list[NoduleReading] = []
    others: list[NonNodule] = []
    sessions = _children(root, "readingSession")
    try:
        for reader, session in enumerate(sessions):
            for element in _children(session, "unblindedReadNodule"):
                nodule_id = _text(element, "noduleID")
                where = f"reading {reader + 1}, nodule {nodule_id!r}"
                characteristics = {}
                found = _child(element, "characteristics")
                if found is not None:
                    for item in found:
                        if item.text and item.text.strip().lstrip("-").isdigit():
                            characteristics[_local(item.tag)] = int(item.text.strip())
                outlines = tuple(_parse_roi(r, where) for r in _children(element, "roi"))
                if not outlines:
                    raise ValueError(f"{where}: nodule without roi")
                nodules.append(NoduleReading(reader, nodule_id, outlines, characteristics))
            for element in _children(session, "nonNodule"):
                ident = _text(element, "nonNoduleID")
                where = f"reading {reader + 1}, non-nodule {ident!r}"
                locus = _child(element, "locus")
                if locus is None:
                    raise ValueError(f"{where}: no locus")
                others.append(
                    NonNodule(
                        reader,
                        ident,
                        _text(element, "imageSOP_UID"),
                        _float(_text(element, "imageZposition"), where),
                        _point(locus, where),
                    )
                )
    except ValueError as error:
        raise InputError(str(error), path=path) from None
    return LidcAnnotations(series_uid, study_uid, len(sessions), tuple(nodules), tuple(others))


def polygon_mask(points: np.ndarray, shape: tuple[int, int], *, boundary: bool = True):
    """Boolean (rows, cols) mask of a closed polygon of (x, y) pixel points: the pixels
    strictly inside the outline, plus the outline's own pixels when ``boundary``."""
    from skimage.draw import line, polygon

    points = np.asarray(points).reshape(-1, 2)
    mask = np.zeros(shape, dtype=bool)
    if len(points) >= 3:
        rr, cc = polygon(points[:, 1], points[:, 0], shape=shape)
        mask[rr, cc] = True
    # the outline's pixels, joined where consecutive points are not adjacent
    ends = np.roll(points, -1, axis=0)
    pieces = [
        line(int(a[1]), int(a[0]), int(b[1]), int(b[0])) for a, b in zip(points, ends, strict=True)
    ]
    rr = np.concatenate([p[0] for p in pieces])
    cc = np.concatenate([p[1] for p in pieces])
    inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    mask[rr[inside], cc[inside]] = boundary
    return mask


def filled_outlines(
    reading: NoduleReading, shape: tuple[int, int], *, boundary: bool = True
) -> dict[str, np.ndarray]:
    """Per slice (SOP Instance UID), the reading's area: inclusion outlines filled (with
    their outline pixels when ``boundary``), the pixels strictly inside exclusion outlines
    subtracted (an exclusion's outline lies in the nodule, around the hole)."""
    out: dict[str, np.ndarray] = {}
    for outline in sorted(reading.outlines, key=lambda o: not o.inclusion):
        if outline.inclusion:
            area = polygon_mask(outline.points, shape, boundary=boundary)
            out[outline.sop_uid] = out.get(outline.sop_uid, np.zeros(shape, bool)) | area
        elif outline.sop_uid in out:
            out[outline.sop_uid] &= ~polygon_mask(outline.points, shape, boundary=False)
    return out


def reading_points_lps(
    reading: NoduleReading,
    frames: Mapping[str, SliceFrame],
    *,
    boundary: bool = True,
) -> dict[str, np.ndarray]:
    """Per slice, the (n, 3) patient coordinates (LPS mm) of the reading's filled pixels.

    ``frames`` maps SOP Instance UID to the slice's ``SliceFrame``; a slice the reading
    names that is not in ``frames`` raises ``KeyError`` naming the UID's position."""
    out = {}
    for sop in reading.sop_uids:
        if sop not in frames:
            raise KeyError(
                f"reading {reading.reader + 1} nodule {reading.nodule_id!r}: slice "
                "not among the given DICOM slices"
            )
    for sop, area in filled_outlines(
        reading, next(iter(frames.values())).shape, boundary=boundary
    ).items():
        rows, cols = np.nonzero(area)
        out[sop] = frames[sop].to_lps(rows, cols)
    return out


@dataclasses.dataclass(frozen=True)
class ReadingExtent:
    centroid_lps: tuple[float, ...]  # x, y, z: mean of the filled pixels (mm)
    volume_mm3: float  # filled area x slice spacing, summed
    max_diameter_mm: float  # the longest in-plane distance between outline points
    equivalent_diameter_mm: float  # of the sphere with the same volume
    slices: int


def reading_extent(
    reading: NoduleReading,
    frames: Mapping[str, SliceFrame],
    slice_spacing_mm: float,
    *,
    boundary: bool = True,
) -> ReadingExtent:
    """Centroid, volume and diameters of a reading (a nodule of 3 mm or more, or a point)."""
    per_slice = reading_points_lps(reading, frames, boundary=boundary)
    points = np.concatenate(list(per_slice.values())) if per_slice else np.zeros((0, 3))
    if not len(points):
        raise ValueError(f"reading {reading.reader + 1} nodule {reading.nodule_id!r}: empty")
    frame = next(iter(frames.values()))
    pixel_area = frame.pixel_spacing[0] * frame.pixel_spacing[1]
    volume = len(points) * pixel_area * slice_spacing_mm
    longest = 0.0
    for outline in reading.outlines:
        if not outline.inclusion or len(outline.points) < 2:
            continue
        xy = outline.points.astype(np.float64) * np.array(frame.pixel_spacing[::-1])
        gaps = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        longest = max(longest, float(gaps.max()))
    return ReadingExtent(
        centroid_lps=tuple(float(v) for v in points.mean(axis=0)),
        volume_mm3=float(volume),
        max_diameter_mm=longest,
        equivalent_diameter_mm=float((6.0 * volume / np.pi) ** (1.0 / 3.0)),
        slices=len(per_slice),
    )


def frames_from_headers(headers: Iterable) -> dict[str, SliceFrame]:
    """``SliceFrame`` per SOP Instance UID from ``medprep.ct.series.SliceHeader``-like
    objects (``sop_instance_uid``, ``position``, ``orientation``, ``pixel_spacing``,
    ``rows``, ``cols``)."""
    out = {}
    for h in headers:
        if not h.sop_instance_uid or h.position is None or h.orientation is None:
            continue
        out[h.sop_instance_uid] = SliceFrame(
            origin=tuple(float(v) for v in h.position),
            row_cosine=tuple(float(v) for v in h.orientation[:3]),
            col_cosine=tuple(float(v) for v in h.orientation[3:]),
            pixel_spacing=(float(h.pixel_spacing[0]), float(h.pixel_spacing[1])),
            shape=(int(h.rows), int(h.cols)),
        )
    return out
