"""Region labels of tiles: exact areas through an STRtree against a rasterised label mask.

A synthetic slide of 224 x 224 tiles of 256 level-0 pixels (50,176 tiles) and --polygons
freehand-like outlines (--vertices points each, a fifth with a hole, three classes, some
overlapping). Both ways start from the same parsed annotations (``labels.build``, timed
on its own) and give every tile its class shares under the same stacking order:

- ``strtree``: what the tiler uses (``labels.box_fractions``): boxes queried against an
  STRtree of the polygons; a box inside its top polygon counted whole, one on a single
  polygon's border clipped to it, and only where several polygons meet the clipped
  pieces stacked;
- ``raster/<d>``: the polygons painted bottom to top into a label image of d level-0
  pixels per cell (PIL, holes left unpainted), then each class's share of each tile by
  ``grid.mask_coverage``, as the tissue mask is used. d = 16 is the tissue mask's
  resolution at 8 um/px for 0.5 um/px tiles.

The errors are the raster's class shares minus the exact ones, over all tiles and
classes (the largest, and the mean over tiles that a polygon border crosses), and the
fraction of tiles whose label differs.

    .venv/bin/python benchmarks/bench_labels.py
    .venv/bin/python benchmarks/bench_labels.py --polygons 500 --vertices 400
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from medprep.wsi import grid as grids  # noqa: E402
from medprep.wsi import labels  # noqa: E402

TILE = 256
SIDE = 224  # tiles per side


def outlines(n: int, vertices: int, extent: int, seed: int) -> list[labels.Region]:
    """Smooth star-shaped blobs with radial noise (valid), some with a hole."""
    import shapely

    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    regions = []
    for i in range(n):
        cx, cy = rng.uniform(0, extent, 2)
        radius = rng.uniform(400, 4000)
        harmonics = rng.normal(0, 0.08, (6, 2))
        wobble = sum(
            a * np.sin((k + 2) * angles) + b * np.cos((k + 2) * angles)
            for k, (a, b) in enumerate(harmonics)
        )
        r = radius * (1 + wobble + rng.normal(0, 0.01, vertices))
        shell = np.column_stack([cx + r * np.cos(angles), cy + r * np.sin(angles)])
        holes = []
        if i % 5 == 0:
            hr = 0.3 * radius
            holes.append(np.column_stack([cx + hr * np.cos(angles), cy + hr * np.sin(angles)]))
        polygon = shapely.Polygon(shell, holes)
        if not polygon.is_valid:
            continue
        regions.append(labels.Region(i, ("Tumor", "Stroma", "Necrosis")[i % 3], polygon))
    return regions


def raster_fractions(annotations: labels.Annotations, grid: grids.Grid, d: float) -> np.ndarray:
    """Class shares of every grid tile from a label image of ``d`` level-0 px per cell."""
    import shapely
    from PIL import Image, ImageDraw

    width = int(np.ceil((grid.xs[-1] + grid.width_l0) / d))
    height = int(np.ceil((grid.ys[-1] + grid.height_l0) / d))
    label_image = np.zeros((height, width), dtype=np.int32)
    for k in np.argsort(annotations.rank):  # bottom to top
        region = annotations.regions[k]
        x0, y0, x1, y1 = (np.asarray(region.geometry.bounds) / d).tolist()
        left, top = max(int(x0), 0), max(int(y0), 0)
        right, bottom = min(int(np.ceil(x1)) + 1, width), min(int(np.ceil(y1)) + 1, height)
        if right <= left or bottom <= top:
            continue
        crop = Image.new("L", (right - left, bottom - top), 0)
        draw = ImageDraw.Draw(crop)
        offset = np.array([left, top])
        for polygon in shapely.get_parts(region.geometry):
            draw.polygon([tuple(p) for p in np.asarray(polygon.exterior.coords) / d - offset],
                         fill=1)  # fmt: skip
            for hole in polygon.interiors:
                draw.polygon([tuple(p) for p in np.asarray(hole.coords) / d - offset], fill=0)
        painted = np.asarray(crop).astype(bool)
        label_image[top:bottom, left:right][painted] = annotations.region_class[k] + 1
    out = np.zeros((len(annotations.classes), grid.count))
    for c in range(len(annotations.classes)):
        out[c] = grids.mask_coverage(label_image == c + 1, grid, d, d).ravel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polygons", type=int, default=500)
    parser.add_argument("--vertices", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=float, nargs="+", default=[16.0, 4.0])
    args = parser.parse_args()

    grid = grids.make_grid(TILE * SIDE, TILE * SIDE, 1.0, 1.0, TILE, TILE)
    regions = outlines(args.polygons, args.vertices, TILE * SIDE, args.seed)

    start = time.perf_counter()
    annotations = labels.build(regions)
    build_s = time.perf_counter() - start
    rows, cols = np.nonzero(np.ones(grid.shape, dtype=bool))

    start = time.perf_counter()
    exact = labels.box_fractions(
        annotations, grid.xs[cols], grid.ys[rows], grid.width_l0, grid.height_l0
    )
    exact_s = time.perf_counter() - start
    exact_label = labels.assign(exact, annotations.classes, "background").index
    border = ((exact > 1e-9) & (exact < 1 - 1e-9)).any(axis=0)

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"$ .venv/bin/python benchmarks/bench_labels.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}, {os.cpu_count()} cores, load {load}")
    print(
        f"# {grid.count} tiles of {TILE} px, {len(regions)} polygons of {args.vertices} vertices "
        f"({int(border.sum())} tiles on a border)"
    )
    print(f"build (shared)    seconds={build_s:7.3f}")
    print(f"strtree (exact)   seconds={exact_s:7.3f}")
    for d in args.cells:
        start = time.perf_counter()
        approx = raster_fractions(annotations, grid, d)
        seconds = time.perf_counter() - start
        error = np.abs(approx - exact)
        differ = labels.assign(approx, annotations.classes, "background").index != exact_label
        print(
            f"raster/{d:<4g}       seconds={seconds:7.3f}  ratio-to-strtree={seconds / exact_s:5.2f}"
            f"  max-abs-error={error.max():.4f}  mean-abs-error-on-borders="
            f"{error[:, border].max(axis=0).mean():.4f}  labels-differ={differ.mean():.4%}"
        )


if __name__ == "__main__":
    main()
