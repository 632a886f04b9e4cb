"""Region labels for CT: annotated points (nodules, candidates) and the patches they label.

Two sources give an annotation's centre in patient coordinates (DICOM LPS, mm, as LUNA16
and ITK use them) and its diameter:

- a CSV (LUNA16 ``annotations.csv`` or ``candidates.csv`` style): ``coordX, coordY,
  coordZ`` (mm), optional ``diameter_mm``, optional ``class`` or ``label`` (an integer;
  default 1) and optional ``seriesuid``. Rows naming another series are left out; with a
  ``seriesuid`` column a file meant for one sample must name its chosen series.
- the LIDC-IDRI reader XML of the scan (``medprep.ct.lidc``): each reading of a nodule of
  3 mm or more gives a centroid and a volume from its filled outlines; readings of
  different readers whose centroids lie within ``merge_radius_mm`` (default: the larger
  of the two readings' equivalent radii, so that each centroid lies inside the other
  reading's nodule) are one nodule. Its centre is the mean of the readings' centroids,
  its diameter the mean of their equivalent diameters (of the sphere with the reading's
  volume), ``readers`` how many readers marked it; label 1.

World to voxel: the published NIfTI affine maps voxel (i, j, k) = (x, y, z) indices to RAS
mm; LPS is RAS with x and y negated, so voxel = inverse(affine) @ diag(-1, -1, 1) @ lps,
and the array index (z, y, x) is (k, j, i).

Patches (``place``, ``grid_labels``): one patch per annotation, centred on the voxel nearest its
centre (``distance_mm`` is the rounding, at most half a voxel diagonal). A grid patch gets
the label of an annotation whose sphere (radius diameter / 2, a point without a diameter)
meets the patch's centre region, the box of half the patch size per axis around its
centre; of several, the nearest centre's; otherwise the background label 0. Annotations
outside the scan or outside the lung mask keep their patch, flagged (``outside_scan``,
``outside_lung``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medprep.common import claims
from medprep.common.errors import InputError
from medprep.ct.nifti import LPS_TO_RAS

if TYPE_CHECKING:  # lidc is imported where it is used: reading a CSV does not load it
    from medprep.ct.lidc import ReadingExtent, SliceFrame

BACKGROUND = 0
DEFAULT_LABEL = 1
CSV_SUFFIXES = (".csv",)
XML_SUFFIXES = (".xml",)
COORDINATES = ("coordX", "coordY", "coordZ")
LABEL_COLUMNS = ("class", "label")
# a class label is a small integer (stored as int64; JSON numbers beyond 2**53 lose digits)
MAX_LABEL = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotated point: a nodule or a candidate."""

    id: str  # unique within the sample: "csv-<line>" or "lidc-<n>"
    centre_lps: tuple[float, ...]  # x, y, z (mm), DICOM patient coordinates
    diameter_mm: float | None  # None: a point (no size given)
    label: int = DEFAULT_LABEL
    readers: int = 0  # LIDC: readers who marked it; 0 for a CSV row
    source: str = "csv"

    @property
    def radius_mm(self) -> float:
        return 0.0 if self.diameter_mm is None else self.diameter_mm / 2.0


def kind_of(path: str) -> str | None:
    """``csv``, ``xml`` or None from a file name's suffix."""
    lowered = str(path).lower()
    if lowered.endswith(CSV_SUFFIXES):
        return "csv"
    if lowered.endswith(XML_SUFFIXES):
        return "xml"
    return None


# ---- CSV


def _number(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}, column '{column}': {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}, column '{column}': {text!r} is not a finite number")
    return value


def _coordinate(text: str, column: str, where: str) -> float:
    """A number of mm that can be a place or a size in a scan (``claims.MAX_COORDINATE``)."""
    value = _number(text, column, where)
    problem = claims.coordinate_problem(value, "mm")
    if problem:
        raise ValueError(f"{where}, column '{column}': {problem}")
    return value


def _split_rows(text: str) -> tuple[list[tuple[int, str | list[str]]], bool]:
    """(line number, cells) of the non-blank rows, the header first, and whether the
    text is unquoted. Unquoted rows (LUNA16's files) are split on commas lazily: this
    returns them as (line number, text) and ``_cells`` splits the ones that are read."""
    if '"' not in text:
        lines = text.splitlines()
        return [(n + 1, lines[n]) for n in range(len(lines)) if lines[n].strip()], True
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, str | list[str]]] = []
    for cells in reader:
        if any(c.strip() for c in cells):
            rows.append((reader.line_num, cells))
    return rows, False


def _cells(row: str | list[str]) -> list[str]:
    return row.split(",") if isinstance(row, str) else row


def _candidates(text: str, rows: list, column: int, keep_series, unquoted: bool) -> list:
    """The rows that may be of the chosen series. In an unquoted file the series named
    in ``column`` are found by one regular expression; rows whose text holds none of
    the accepted ones are left out unsplit (a cohort's file: half a million rows)."""
    if not unquoted:
        return rows
    import re

    field = re.compile(rf"^[ \t]*(?:[^,\r\n]*,){{{column}}}([^,\r\n]*)", re.M)
    wanted = [uid for uid in {m.strip() for m in field.findall(text)} if keep_series(uid)]
    if not wanted:
        return []
    return sorted({row for uid in wanted for row in rows if uid in row[1]})


def parse_csv(
    text: str, *, keep_series=None, require_series: bool = False
) -> tuple[list[Annotation], dict[str, int]]:
    """Annotations of a LUNA16-style CSV (the file's text).

    ``keep_series``: a function of a row's ``seriesuid`` that tells whether it names the
    chosen series (None: keep every row); rows of other series are left out unread.
    ``require_series``: a file with a ``seriesuid`` column must have a row for the chosen
    series (a per-sample file naming only other series is the wrong file). Returns
    (annotations, counts of rows read, kept and left out). Raises ``ValueError`` naming
    the line and column.
    """
    rows_of, unquoted = _split_rows(text)
    header_line, first = rows_of[0] if rows_of else (1, [])
    header = [c.strip() for c in _cells(first)]
    missing = [c for c in COORDINATES if c not in header]
    if missing:
        raise ValueError(
            f"line {header_line}: missing column(s) {', '.join(missing)} (a LUNA16-style "
            f"CSV has seriesuid, coordX, coordY, coordZ and diameter_mm or class; found "
            f"{header})"
        )
    label_column = next((c for c in LABEL_COLUMNS if c in header), None)
    # the column whose series rows are matched against ``keep_series`` (None: keep every row)
    uid_column = (
        header.index("seriesuid") if keep_series is not None and "seriesuid" in header else None
    )
    by_series = uid_column is not None
    data = rows_of[1:]
    if uid_column is not None:
        data = _candidates(text, data, uid_column, keep_series, unquoted)
    rows = len(rows_of) - 1
    annotations = []
    for line, raw in data:
        cells = _cells(raw)
        where = f"line {line}"
        if len(cells) > len(header):
            raise ValueError(f"{where}: more fields than the header's {len(header)} columns")
        if uid_column is not None:
            uid = cells[uid_column].strip() if uid_column < len(cells) else ""
            if not keep_series(uid):
                continue
        row = {name: value.strip() for name, value in zip(header, cells, strict=False)}
        centre = tuple(_coordinate(row.get(c, ""), c, where) for c in COORDINATES)
        diameter = None
        if row.get("diameter_mm"):
            diameter = _coordinate(row["diameter_mm"], "diameter_mm", where)
            if diameter < 0:
                raise ValueError(
                    f"{where}, column 'diameter_mm': {row['diameter_mm']!r} is negative"
                )
        label = DEFAULT_LABEL
        if label_column and row.get(label_column):
            raw_label = row[label_column]
            value = _number(raw_label, label_column, where)
            if value != int(value):
                raise ValueError(
                    f"{where}, column '{label_column}': {raw_label!r} is not an integer"
                )
            if abs(value) > MAX_LABEL:
                raise ValueError(
                    f"{where}, column '{label_column}': {raw_label!r} is beyond +-{MAX_LABEL}"
                )
            label = int(value)
        annotations.append(Annotation(f"csv-{line}", centre, diameter, label, 0, "csv"))
    other = rows - len(annotations) if by_series else 0
    if require_series and by_series and rows and not annotations:
        raise ValueError(
            f"none of its {rows} rows names the chosen series (column 'seriesuid'): "
            "the annotations of another scan?"
        )
    return annotations, {"rows": rows, "kept": len(annotations), "other_series": other}


def series_matcher(series_uid_hash: str):
    """A function telling whether a ``seriesuid`` names the chosen series.

    The preprocess step publishes only the hash of the series' identity
    (``medprep.ct.series.uid_hash``): the SeriesInstanceUID of a DICOM series, or
    ``volume:<file name>`` for a MetaImage/NIfTI input (a LUNA16 ``<seriesuid>.mhd``
    matches its ``seriesuid``). The UID itself never has to be stored.
    """
    import functools

    from medprep.ct.series import uid_hash
    from medprep.storage import VOLUME_SUFFIXES

    @functools.lru_cache(maxsize=4096)
    def matches(uid: str) -> bool:
        if not uid:
            return False
        keys = [uid, *(f"volume:{uid}{suffix}" for suffix in VOLUME_SUFFIXES)]
        return any(uid_hash(key) == series_uid_hash for key in keys)

    return matches


def read_csv(
    path: str | os.PathLike, *, series_uid_hash: str | None, require_series: bool
) -> tuple[list[Annotation], dict[str, int]]:
    """``parse_csv`` of a file, its rows matched to the chosen series by hash."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise InputError(f"annotation CSV is not UTF-8 text ({error.reason})", path=path) from None
    keep = series_matcher(series_uid_hash) if series_uid_hash else None
    try:
        return parse_csv(text, keep_series=keep, require_series=require_series)
    except (ValueError, csv.Error) as error:
        raise InputError(f"annotation CSV: {error}", path=path) from None


# ---- LIDC XML


def merge_readings(
    extents: Sequence[tuple[int, ReadingExtent]], merge_radius_mm: float | None = None
) -> list[list[int]]:
    """Groups (indices into ``extents``) of readings of one nodule.

    ``extents``: (reader, ``lidc.ReadingExtent``) per reading. Greedy, largest readings
    first: a reading joins the first group that has no reading of its reader and whose
    mean centroid is within the merge radius (``merge_radius_mm``, or the larger of the
    two equivalent radii: the reading's and the group's mean)."""
    order = sorted(range(len(extents)), key=lambda i: -extents[i][1].volume_mm3)
    groups: list[list[int]] = []
    for i in order:
        reader, extent = extents[i]
        centre = np.asarray(extent.centroid_lps)
        radius = extent.equivalent_diameter_mm / 2.0
        for group in groups:
            if any(extents[j][0] == reader for j in group):
                continue
            mean = np.mean([extents[j][1].centroid_lps for j in group], axis=0)
            size = float(np.mean([extents[j][1].equivalent_diameter_mm for j in group])) / 2.0
            limit = merge_radius_mm if merge_radius_mm is not None else max(radius, size)
            if float(np.linalg.norm(centre - mean)) <= limit:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def from_lidc(
    annotations,
    frames: Mapping[str, SliceFrame],
    slice_spacing_mm: float,
    *,
    merge_radius_mm: float | None = None,
) -> list[Annotation]:
    """One ``Annotation`` per nodule of 3 mm or more of an LIDC XML (``lidc.LidcAnnotations``).

    ``frames``: ``lidc.SliceFrame`` per SOP Instance UID of the scan's slices;
    ``slice_spacing_mm``: the distance between slices (for the readings' volumes)."""
    from medprep.ct import lidc

    readings = annotations.large_nodules()
    extents = []
    for reading in readings:
        try:
            extents.append((reading.reader, lidc.reading_extent(reading, frames, slice_spacing_mm)))
        except KeyError as error:
            raise InputError(
                f"LIDC XML: {error.args[0]} (the XML of another scan, or slices missing)"
            ) from None
    out = []
    groups = merge_readings(extents, merge_radius_mm)
    # stable ids: nodules ordered by position (z, y, x of the centre)
    merged = []
    for group in groups:
        centre = np.mean([extents[i][1].centroid_lps for i in group], axis=0)
        diameter = float(np.mean([extents[i][1].equivalent_diameter_mm for i in group]))
        merged.append((tuple(float(v) for v in centre), diameter, len(group)))
    merged.sort(key=lambda m: (m[0][2], m[0][1], m[0][0]))
    for n, (centre, diameter, readers) in enumerate(merged, start=1):
        out.append(Annotation(f"lidc-{n}", centre, diameter, DEFAULT_LABEL, readers, "lidc"))
    return out


def read_lidc(
    path: str | os.PathLike,
    dicom_files: Sequence[str],
    *,
    series_uid_hash: str | None = None,
    threads: int = 1,
) -> list[Annotation]:
    """Nodules of the LIDC XML at ``path``, placed through the DICOM headers of the scan.

    ``series_uid_hash``: the chosen series' (preprocess summary); an XML that names
    another series is refused (the readers' outlines belong to other slices)."""
    from medprep.ct import dicom_io, lidc, series

    path = os.fspath(path)
    parsed = lidc.parse_lidc_xml(path)
    if series_uid_hash and parsed.series_uid:
        named = series.uid_hash(parsed.series_uid)
        if named != series_uid_hash:
            raise InputError(
                f"the LIDC XML annotates series {named} (UID hash), not the chosen series "
                f"{series_uid_hash}",
                path=path,
            )
    scanned = dicom_io.scan_headers(list(dicom_files), threads)
    headers = [h for h in scanned if isinstance(h, series.SliceHeader)]
    if not headers:
        raise InputError("LIDC XML needs the scan's DICOM slices (the input holds none)", path=path)
    frames = lidc.frames_from_headers(headers)
    positions = sorted(
        float(np.dot(h.position, series.slice_normal(h.orientation)))
        for h in headers
        if h.position is not None and h.orientation is not None
    )
    steps = np.diff(positions)
    steps = steps[steps > 1e-3]
    spacing = float(np.median(steps)) if steps.size else 1.0
    try:
        return from_lidc(parsed, frames, spacing)
    except InputError as error:
        raise error.with_context(path=path) from None


# ---- geometry


def world_to_voxel(affine_ras: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """(n, 3) voxel coordinates (z, y, x; fractional) of (n, 3) LPS points (mm)."""
    points = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    homogeneous = np.c_[points, np.ones(len(points))].T
    ijk = (np.linalg.inv(np.asarray(affine_ras, dtype=np.float64)) @ LPS_TO_RAS @ homogeneous)[:3]
    return ijk[::-1].T


def voxel_to_world(affine_ras: np.ndarray, voxels_zyx: np.ndarray) -> np.ndarray:
    """(n, 3) LPS points (mm) of (n, 3) voxel coordinates (z, y, x)."""
    voxels = np.atleast_2d(np.asarray(voxels_zyx, dtype=np.float64))
    homogeneous = np.c_[voxels[:, ::-1], np.ones(len(voxels))].T
    return (LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64) @ homogeneous)[:3].T


@dataclasses.dataclass(frozen=True)
class PlacedAnnotation:
    annotation: Annotation
    voxel_zyx: np.ndarray  # fractional voxel coordinates of the centre
    start: np.ndarray  # (3,) start voxel of the patch centred on it
    distance_mm: float  # from the patch centre to the annotation's centre
    outside_scan: bool
    outside_lung: bool


def place(
    annotations: Sequence[Annotation],
    affine_ras: np.ndarray,
    mask: np.ndarray,
    size: Sequence[int],
) -> list[PlacedAnnotation]:
    """The patch of ``size`` voxels (z, y, x) centred on each annotation, and its flags."""
    if not annotations:
        return []
    size_zyx = np.asarray(size)
    centres = world_to_voxel(affine_ras, np.array([a.centre_lps for a in annotations]))
    out = []
    for annotation, voxel in zip(annotations, centres, strict=True):
        start = np.rint(voxel - (size_zyx - 1) / 2.0).astype(np.int64)
        middle = start + (size_zyx - 1) / 2.0
        world = voxel_to_world(affine_ras, middle[None])[0]
        distance = float(np.linalg.norm(world - np.asarray(annotation.centre_lps)))
        nearest = np.rint(voxel).astype(np.int64)
        inside = bool(np.all(nearest >= 0) and np.all(nearest < np.asarray(mask.shape)))
        in_lung = inside and bool(mask[tuple(nearest)])
        out.append(PlacedAnnotation(annotation, voxel, start, distance, not inside, not in_lung))
    return out


def grid_labels(
    starts: np.ndarray,
    size: Sequence[int],
    spacing: Sequence[float],
    placed: Sequence[PlacedAnnotation],
) -> tuple[np.ndarray, np.ndarray]:
    """Label and labelling annotation (index into ``placed``, -1 for none) of grid patches.

    A patch takes the label of an annotation whose sphere meets the patch's centre
    region (the box of half the patch size per axis around its centre, in mm); of
    several, the one whose centre is nearest the patch centre; background otherwise."""
    n = len(starts)
    labels = np.full(n, BACKGROUND, dtype=np.int64)
    which = np.full(n, -1, dtype=np.int64)
    if not n or not placed:
        return labels, which
    spacing_zyx = np.asarray(spacing, dtype=np.float64)
    size_zyx = np.asarray(size)
    middles = (starts + (size_zyx - 1) / 2.0) * spacing_zyx  # (n, 3) mm, voxel axes
    half = size_zyx * spacing_zyx / 4.0  # half the centre region's extent
    best = np.full(n, np.inf)
    for index, item in enumerate(placed):
        centre = item.voxel_zyx * spacing_zyx
        # distance from the annotation's centre to the nearest point of each centre box
        gap = np.maximum(np.abs(middles - centre) - half, 0.0)
        meets = np.sqrt((gap**2).sum(axis=1)) <= item.annotation.radius_mm
        distance = np.sqrt(((middles - centre) ** 2).sum(axis=1))
        better = meets & (distance < best)
        labels[better] = item.annotation.label
        which[better] = index
        best[better] = distance[better]
    return labels, which
