"""Region labels of tiles from polygon annotations (a QuPath GeoJSON export).

The file is a GeoJSON ``FeatureCollection`` (or a bare list of features, as older QuPath
versions wrote) in level-0 pixel coordinates: x to the right, y down, as OpenSlide's
``read_region`` takes them. Each feature is a ``Polygon`` or ``MultiPolygon`` (holes are
the rings after the first) with its class in ``properties.classification.name`` (QuPath)
or else ``properties.name``; QuPath's ``properties.classification.color`` (``[r, g, b]``,
or the older packed ``colorRGB``) is the colour the overlay draws it in.

Where polygons of different classes overlap, the smaller polygon is on top (the more
specific region: a necrosis drawn inside a tumour outline), and of two of the same area
the later feature in the file. So every point of the slide has at most one class, and
the class areas of a tile add up to at most its area; the rest is the background.

A tile's ``label`` is the class covering the largest share of it, the background (the
part under no annotation) competing like any class; ties go to the background, then to
the class met first in the file. ``label_fraction`` is that share. The shares are exact
areas (the polygons clipped to the tile box, found through an STRtree), not counts of
raster cells: ``benchmarks/bench_labels.py`` measures both ways.

Everything here takes and returns plain data (numpy arrays, shapely geometries,
dataclasses); ``read_annotations`` is the only function that reads a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medprep.common import claims
from medprep.common.errors import InputError

# make_valid's repair of an invalid polygon is accepted when it changes the polygon's area
# (GEOS: |shell| - |holes|) by at most this fraction: it then only removed slivers, spikes
# or a small twisted loop. A figure eight or a hole outside its shell changes far more.
MAX_REPAIR_CHANGE = 0.01

# Colours of classes whose features carry none (tab10, without its grey).
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)

# Geometries that cover no area: skipped (counted in the warnings), they cannot label a tile.
NO_AREA_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")
GEOJSON_SUFFIXES = (".geojson", ".json")


@dataclass(frozen=True)
class Region:
    """One polygon annotation: its 0-based feature index in the file, class and shape."""

    index: int
    label: str
    geometry: Any  # shapely Polygon or MultiPolygon, valid, level-0 pixels
    colour: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Annotations:
    """The polygon annotations of one slide, ready for tile queries.

    ``classes`` are the annotated classes in order of first appearance in the file;
    ``geometries`` the regions' shapes (prepared), ``region_class`` each one's index in
    ``classes`` and ``rank`` its place in the stack (higher = on top: smaller regions,
    then later ones).
    """

    regions: tuple[Region, ...]
    classes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    geometries: np.ndarray  # shapely (Multi)Polygons, prepared
    region_class: np.ndarray  # int, index into classes
    rank: np.ndarray  # int, 0 = bottom
    warnings: list[str] = field(default_factory=list)


# ---- parsing


def _fail(path: str | None, cause: str) -> InputError:
    return InputError(cause, path=path)


def _class_name(properties: Any) -> str | None:
    if not isinstance(properties, dict):
        return None
    classification = properties.get("classification")
    if isinstance(classification, dict):
        name = classification.get("name")
    elif isinstance(classification, str):
        name = classification
    else:
        name = None
    if not (isinstance(name, str) and name.strip()):
        name = properties.get("name")
    return name.strip() if isinstance(name, str) and name.strip() else None


def _colour(properties: Any) -> tuple[int, int, int] | None:
    """QuPath's class colour: ``color`` as [r, g, b] or ``colorRGB`` as a packed int."""
    classification = properties.get("classification") if isinstance(properties, dict) else None
    if not isinstance(classification, dict):
        return None
    value = classification.get("color", classification.get("colorRGB"))
    if isinstance(value, list) and len(value) >= 3:
        if all(isinstance(v, int) and 0 <= v <= 255 for v in value[:3]):
            return (value[0], value[1], value[2])
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    return None


def _ring(coordinates: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coordinates, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: coordinates are not a list of [x, y] numbers") from None
    if ring.ndim != 2 or ring.shape[1] < 2:
        raise ValueError(f"{where}: coordinates are not a list of [x, y] numbers")
    ring = ring[:, :2]
    if not np.isfinite(ring).all():
        raise ValueError(f"{where}: coordinates are not all finite numbers")
    far = np.abs(ring) > claims.MAX_COORDINATE
    if far.any():
        point = int(np.argwhere(far)[0][0])
        raise ValueError(
            f"{where}: coordinate [{ring[point, 0]:g}, {ring[point, 1]:g}] is beyond "
            f"+-{claims.MAX_COORDINATE:g} pixels, outside any slide"
        )
    distinct = len(np.unique(ring, axis=0))
    if distinct < 3:
        raise ValueError(f"{where}: a ring needs at least 3 distinct points, it has {distinct}")
    return ring


def _polygon(coordinates: Any, where: str):
    import shapely

    if not isinstance(coordinates, list) or not coordinates:
        raise ValueError(f"{where}: a polygon needs a list of rings")
    rings = [_ring(ring, where) for ring in coordinates]
    return shapely.Polygon(rings[0], holes=rings[1:])


def _geometry(geometry: Any, where: str):
    """A shapely (Multi)Polygon from a GeoJSON geometry; None for point and line types."""
    import shapely

    if not isinstance(geometry, dict) or "type" not in geometry:
        raise ValueError(f"{where}: has no geometry")
    kind = geometry["type"]
    if kind in NO_AREA_TYPES:
        return None
    if kind == "Polygon":
        return _polygon(geometry.get("coordinates"), where)
    if kind == "MultiPolygon":
        parts = geometry.get("coordinates")
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"{where}: a MultiPolygon needs a list of polygons")
        return shapely.MultiPolygon([_polygon(p, where) for p in parts])
    if kind == "GeometryCollection":
        members = [_geometry(g, where) for g in geometry.get("geometries") or []]
        parts = [p for m in members if m is not None for p in shapely.get_parts(m)]
        return shapely.MultiPolygon(parts) if parts else None
    raise ValueError(f"{where}: geometry type {kind!r} is not supported (Polygon, MultiPolygon)")


def polygonal(geometry):
    """The polygonal part of a geometry (a make_valid or difference result) as one
    (Multi)Polygon, or None when it has no area."""
    import shapely

    parts = [
        p
        for p in shapely.get_parts(geometry)
        if shapely.get_type_id(p) in (3, 6)  # Polygon, MultiPolygon
    ]
    parts = [q for p in parts for q in shapely.get_parts(p) if q.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def repaired(geometry, where: str, tolerance: float = MAX_REPAIR_CHANGE):
    """``geometry`` if valid, else its make_valid repair when that is a small change.

    Refuses (ValueError naming GEOS's reason) a geometry with no area, or whose repair
    changes its area by more than ``tolerance`` of it (a figure eight, a hole that is
    not inside its shell): what was meant cannot be told then.
    """
    import shapely

    if shapely.is_valid(geometry):
        if geometry.area <= 0:
            raise ValueError(f"{where}: polygon has no area")
        return geometry
    reason = shapely.is_valid_reason(geometry)
    fixed = polygonal(shapely.make_valid(geometry))
    before = float(geometry.area)
    after = float(fixed.area) if fixed is not None else 0.0
    if fixed is None or after <= 0:
        raise ValueError(f"{where}: invalid polygon with no area ({reason})")
    if abs(after - before) > tolerance * max(after, abs(before)):
        raise ValueError(
            f"{where}: invalid polygon ({reason}); repairing it would change its area from "
            f"{before:.0f} to {after:.0f} px^2, so what was drawn is unclear: fix it in the "
            "annotation tool"
        )
    return fixed


def parse_features(data: Any, path: str | None = None) -> tuple[list[Region], list[str]]:
    """The polygon annotations of a parsed GeoJSON document, and warnings.

    Raises InputError naming ``path`` and the 0-based feature index for a feature
    without a class or with a geometry that is malformed or cannot be repaired.
    """
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise _fail(path, "not a GeoJSON FeatureCollection")
    if not isinstance(features, list):
        raise _fail(path, "the FeatureCollection has no list of features")
    regions = []
    skipped = 0
    for index, feature in enumerate(features):
        where = f"feature {index}"
        if not isinstance(feature, dict):
            raise _fail(path, f"{where}: is not a GeoJSON Feature")
        properties = feature.get("properties")
        try:
            geometry = _geometry(feature.get("geometry"), where)
            if geometry is None:
                skipped += 1
                continue
            label = _class_name(properties)
            if label is None:
                raise ValueError(
                    f"{where}: has no class (properties.classification.name or properties.name)"
                )
            geometry = repaired(geometry, where)
        except ValueError as error:
            raise _fail(path, str(error)) from None
        regions.append(Region(index, label, geometry, _colour(properties)))
    warnings = []
    if skipped:
        warnings.append(f"annotations: {skipped} point or line feature(s) cover no area, skipped")
    if not regions:
        raise _fail(path, "no Polygon or MultiPolygon annotation in the file")
    return regions, warnings


def stacking(areas: np.ndarray) -> np.ndarray:
    """Each region's rank in the stack from its area (0 = bottom): smaller regions on top
    of larger ones, and of equal areas the later on top of the earlier."""
    order = sorted(range(len(areas)), key=lambda i: (-areas[i], i))  # bottom to top
    rank = np.empty(len(areas), dtype=np.int64)
    rank[order] = np.arange(len(areas))
    return rank


def build(regions: list[Region], warnings: list[str] | None = None) -> Annotations:
    """Annotations from parsed regions: classes, stacking order, a colour for every class."""
    import shapely

    classes: list[str] = []
    for region in regions:
        if region.label not in classes:
            classes.append(region.label)
    geometries = np.array([r.geometry for r in regions], dtype=object)
    shapely.prepare(geometries)
    colours: dict[str, tuple[int, int, int]] = {}
    for region in regions:
        if region.colour is not None:
            colours.setdefault(region.label, region.colour)
    spare = iter(c for c in PALETTE if c not in colours.values())
    for k, name in enumerate(classes):
        if name not in colours:
            colours[name] = next(spare, PALETTE[k % len(PALETTE)])
    return Annotations(
        tuple(regions),
        tuple(classes),
        colours,
        geometries,
        np.array([classes.index(r.label) for r in regions], dtype=np.int64),
        stacking(shapely.area(geometries)),
        list(warnings or []),
    )


def read_annotations(path: str | os.PathLike) -> Annotations:
    """Read and check a GeoJSON annotation file (InputError naming the file otherwise)."""
    name = os.fspath(path)
    if not name.lower().endswith(GEOJSON_SUFFIXES):
        raise _fail(name, "annotations must be GeoJSON (.geojson or .json, e.g. a QuPath export)")
    try:
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise _fail(name, "not a GeoJSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise _fail(
            name, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except OSError as error:
        raise _fail(name, f"cannot read the annotations: {error.strerror or error}") from None
    regions, warnings = parse_features(data, name)
    return build(regions, warnings)


def check_extent(annotations: Annotations, width: int, height: int, path: str | None) -> list[str]:
    """Warnings for regions reaching outside the slide; an error when none lies on it
    (coordinates in another frame: microns, a downsampled image)."""
    import shapely

    bounds = shapely.bounds(np.array([r.geometry for r in annotations.regions], dtype=object))
    outside = (
        (bounds[:, 2] <= 0)
        | (bounds[:, 3] <= 0)
        | (bounds[:, 0] >= width)
        | (bounds[:, 1] >= height)
    )
    if outside.all():
        raise _fail(
            path,
            f"no annotation lies on the slide ({width} x {height} level-0 pixels): "
            "coordinates must be level-0 pixels",
        )
    beyond = (
        (bounds[:, 0] < 0) | (bounds[:, 1] < 0) | (bounds[:, 2] > width) | (bounds[:, 3] > height)
    )
    if beyond.any():
        return [f"annotations: {int(beyond.sum())} region(s) reach beyond the slide's edges"]
    return []


# ---- tile fractions


def _clipped(geometry, box: tuple[float, float, float, float]):
    """``geometry`` clipped to the box, valid (clip_by_rect may leave a ring touching
    itself along the box's edge; then make_valid, which keeps the area)."""
    import shapely

    piece = shapely.clip_by_rect(geometry, *box)
    return piece if shapely.is_valid(piece) else shapely.make_valid(piece)


def box_fractions(
    annotations: Annotations, x: np.ndarray, y: np.ndarray, width: float, height: float
) -> np.ndarray:
    """Share of each box covered by each class: (len(classes), n), exact areas.

    Boxes are level-0 ``[x, x + width) x [y, y + height)``. A box whose top region
    contains it is that region's whole; a box on the border of a single region gets the
    area of the region clipped to it; only boxes where several regions meet are resolved
    by the stacking order, on the regions clipped to the box (small geometries).
    """
    import shapely

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = np.zeros((len(annotations.classes), len(x)), dtype=np.float64)
    if len(x) == 0 or len(annotations.geometries) == 0:
        return out
    tile_area = float(width) * float(height)
    boxes = shapely.box(x, y, x + width, y + height)
    tree = shapely.STRtree(annotations.geometries)
    box_index, region = tree.query(boxes)  # bounding boxes overlap
    geoms = annotations.geometries[region]  # prepared: the predicates below are fast
    inside = shapely.contains_properly(geoms, boxes[box_index])
    hit = inside.copy()
    hit[~inside] = shapely.intersects(geoms[~inside], boxes[box_index[~inside]])
    box_index, region, inside = box_index[hit], region[hit], inside[hit]
    # per box, its regions from the top of the stack down
    order = np.lexsort((-annotations.rank[region], box_index))
    box_index, region, inside = box_index[order], region[order], inside[order]
    first = np.flatnonzero(np.r_[True, box_index[1:] != box_index[:-1]])
    count = np.diff(np.r_[first, len(box_index)])
    top = first[inside[first]]  # the top region holds the whole box
    out[annotations.region_class[region[top]], box_index[top]] = tile_area
    single = first[~inside[first] & (count == 1)]  # one region, across its border
    # clipping to the box: the same area as an intersection, a few times faster
    out[annotations.region_class[region[single]], box_index[single]] = [
        shapely.clip_by_rect(
            annotations.geometries[r], x[b], y[b], x[b] + width, y[b] + height
        ).area
        for r, b in zip(region[single], box_index[single], strict=True)
    ]
    for j in np.flatnonzero(~inside[first] & (count > 1)):  # several regions meet in the box
        start, b = first[j], box_index[first[j]]
        box = (x[b], y[b], x[b] + width, y[b] + height)
        covered, covered_area = None, 0.0  # the part of the box under regions above
        last = start + count[j] - 1
        for k in range(start, last + 1):
            label = annotations.region_class[region[k]]
            if inside[k]:  # the region holds the box: it gets all that is not covered
                out[label, b] += tile_area - covered_area
                break
            piece = _clipped(annotations.geometries[region[k]], box)
            area = piece.area
            if covered is not None and shapely.intersects(piece, covered):
                area -= shapely.intersection(piece, covered).area
            out[label, b] += area
            covered_area += area
            if k < last:
                covered = piece if covered is None else shapely.union(covered, piece)
    return np.clip(out / tile_area, 0.0, 1.0)


@dataclass(frozen=True)
class TileLabels:
    """Labels of a set of tiles. ``names[0]`` is the background; ``index`` is the label of
    each tile as an index into ``names``; ``fractions`` (len(names), n) the shares."""

    names: tuple[str, ...]
    index: np.ndarray
    fractions: np.ndarray

    @property
    def annotated(self) -> np.ndarray:
        """Tiles whose label is an annotated class (not the background)."""
        return self.index > 0

    def take(self, which: np.ndarray) -> TileLabels:
        return TileLabels(self.names, self.index[which], self.fractions[:, which])

    def columns(self, class_fractions: bool = False) -> dict[str, Any]:
        """Tile table columns: ``label``, ``label_fraction`` and, with ``class_fractions``,
        ``label_fraction_<class>`` for the background and every class."""
        n = len(self.index)
        columns: dict[str, Any] = {
            "label": [self.names[i] for i in self.index],
            "label_fraction": self.fractions[self.index, np.arange(n)] if n else np.zeros(0),
        }
        if class_fractions:
            for k, name in enumerate(self.names):
                columns[f"label_fraction_{name}"] = self.fractions[k]
        return columns

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.index, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, found, strict=True) if c}


def assign(fractions: np.ndarray, classes: tuple[str, ...], background: str) -> TileLabels:
    """The label of each tile from its class shares (len(classes), n): the largest share,
    the uncovered part counting for ``background``; ties go to the background, then to
    the earlier class. A class named like the background adds to it."""
    names = (background, *[c for c in classes if c != background])
    full = np.zeros((len(names), fractions.shape[1]), dtype=np.float64)
    for k, name in enumerate(classes):
        full[names.index(name)] += fractions[k]
    full[0] = np.clip(full[0] + 1.0 - fractions.sum(axis=0), 0.0, 1.0)
    index = np.argmax(full, axis=0) if fractions.shape[1] else np.zeros(0, dtype=np.int64)
    return TileLabels(names, index.astype(np.int64), full)


@dataclass(frozen=True)
class GridLabels:
    """Labels of the selected positions of a tile grid: ``tiles`` in row-major order of the
    positions, ``lookup`` (``grid.shape``) each position's index in ``tiles``, -1 if none."""

    tiles: TileLabels
    lookup: np.ndarray

    def drop_unannotated(self, selected: np.ndarray) -> int:
        """Unselect the positions labelled background; returns how many were dropped."""
        rows, cols = np.nonzero(self.lookup >= 0)
        drop = ~self.tiles.annotated[self.lookup[rows, cols]] & selected[rows, cols]
        selected[rows[drop], cols[drop]] = False
        return int(drop.sum())

    def at(self, grid, x: np.ndarray, y: np.ndarray) -> TileLabels:
        """Labels of tiles given by their level-0 origins (grid positions)."""
        rows = np.searchsorted(grid.ys, np.asarray(y))
        cols = np.searchsorted(grid.xs, np.asarray(x))
        return self.tiles.take(self.lookup[rows, cols])


def label_grid(annotations: Annotations, grid, selected: np.ndarray, background: str) -> GridLabels:
    """Labels of the selected positions of a tile grid (``medprep.wsi.grid.Grid``)."""
    rows, cols = np.nonzero(selected)
    fractions = box_fractions(
        annotations, grid.xs[cols], grid.ys[rows], grid.width_l0, grid.height_l0
    )
    lookup = np.full(grid.shape, -1, dtype=np.int64)
    lookup[rows, cols] = np.arange(len(rows))
    return GridLabels(assign(fractions, annotations.classes, background), lookup)


# ---- overlay


def outlines(annotations: Annotations) -> list[tuple[tuple[int, int, int], list[np.ndarray]]]:
    """Every region's rings (exterior and holes, level-0 (n, 2) arrays) with its class
    colour, bottom region first, so the overlay draws them as they stack."""
    import shapely

    order = sorted(annotations.regions, key=lambda r: (-r.geometry.area, r.index))  # bottom to top
    drawn = []
    for region in order:
        rings = []
        for polygon in shapely.get_parts(region.geometry):
            rings.append(np.asarray(polygon.exterior.coords))
            rings += [np.asarray(hole.coords) for hole in polygon.interiors]
        drawn.append((annotations.colours[region.label], rings))
    return drawn
