"""Stain vectors and normalisation, checked against torchstain's numpy Macenko on real H&E.

Two real H&E slides (tests/fixtures/wsi: CMU-1-Small-Region at 0.499 um/px, the TCGA crop
with the sample sheet's 0.25 um/px), preprocessed and tiled (256 px at 0.5 um/px, PNG) by
medprep's steps. Then:

- ``agreement``: on every tissue tile, medprep's Macenko (``medprep.wsi.stain``) and
  torchstain's (``NumpyMacenkoNormalizer``, the same defaults: Io 240, alpha 1, beta
  0.15) fitted on the tile: angle between their H and between their E vectors, relative
  difference of the strengths, and the normalised tiles (to Macenko's reference H&E)
  compared pixel by pixel (mean and largest absolute difference, in 0-255 levels);
- ``per-tile vs per-slide``: the angle of each tile's own vectors to the slide's
  (preprocess's, 32 regions), against the angle between the slide's vectors drawn from
  10 different random region sets, and the estimate at mask resolution (8 um/px);
- ``two stainings``: CMU-1 and the same pixels restained with Ruifrok's H&E in optical
  density (``tests/wsi_support.restained``), each preprocessed and tiled; the mean
  absolute difference of the tiles at the same place, raw, normalised with each slide's
  recorded vectors (medprep) and normalised per tile (torchstain);
- ``loader``: tiles per second through ``medprep.data.open_dataset`` (PNG decode) with
  ``stain=None``, ``"normalise"`` and ``"augment"``, one process.

torchstain is not a medprep dependency: ``.venv/bin/pip install torchstain==1.4.1`` (it
needs only numpy) before running.

    .venv/bin/python benchmarks/bench_stain.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import wsi_support as ws  # noqa: E402

from medprep.common import atomic  # noqa: E402
from medprep.data import index as dataset  # noqa: E402
from medprep.data import open_dataset  # noqa: E402
from medprep.data.reader import decode_image  # noqa: E402
from medprep.wsi import preprocess as wsi_preprocess  # noqa: E402
from medprep.wsi import resolution as res  # noqa: E402
from medprep.wsi import stain  # noqa: E402
from medprep.wsi.writers import read_table  # noqa: E402

SLIDES = {"CMU-1": (ws.CMU, None), "TCGA-crop": (ws.TCGA_NO_MPP, 0.25)}


def angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    cosine = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


def tiles_of(folder: Path) -> dict[tuple[int, int], np.ndarray]:
    table = read_table(folder / "tiles" / "tiles.parquet")
    out = {}
    for row in table.itertuples():
        data = (folder / "tiles" / row.file).read_bytes()[row.offset : row.offset + row.nbytes]
        out[(row.x, row.y)] = decode_image(data, row.member)
    return out


def slide_vectors(folder: Path) -> stain.StainVectors:
    record = atomic.read_json(folder / "preprocess" / "summary.json")["stain"]
    return stain.StainVectors.from_dict(record)


def torchstain_fit(tile: np.ndarray):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normaliser = NumpyMacenkoNormalizer()
    normaliser.fit(tile)
    return normaliser.HERef, normaliser.maxCRef


def torchstain_normalise(tile: np.ndarray) -> np.ndarray:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normalised, _, _ = NumpyMacenkoNormalizer().normalize(tile, stains=False)
    return normalised


def agreement(name: str, tiles: dict) -> list[str]:
    h_angles, e_angles, strengths, mean_diff, max_diff, failed = [], [], [], [], [], 0
    for tile in tiles.values():
        try:
            ts_vectors, ts_max = torchstain_fit(tile)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            failed += 1
            continue
        ours = stain.estimate_rgb(tile, min_pixels=2, min_angle_deg=0).vectors
        if ours is None:
            failed += 1
            continue
        h_angles.append(angle(ours.h, ts_vectors[:, 0]))
        e_angles.append(angle(ours.e, ts_vectors[:, 1]))
        strengths.append(np.max(np.abs(ours.max_concentrations / ts_max - 1)))
        difference = np.abs(
            stain.normalise(tile, ours).astype(int) - torchstain_normalise(tile).astype(int)
        )
        mean_diff.append(difference.mean())
        max_diff.append(difference.max())
    return [
        f"agreement {name:10s} tiles={len(h_angles)} torchstain-failed={failed}  "
        f"H-angle-deg max={max(h_angles):.2e}  E-angle-deg max={max(e_angles):.2e}  "
        f"strength-rel-diff max={max(strengths):.2e}  normalised |diff| mean={np.mean(mean_diff):.3f} "
        f"max={max(max_diff)}"
    ]


def stability(name: str, folder: Path, slide: Path, tiles: dict) -> list[str]:
    summary = atomic.read_json(folder / "preprocess" / "summary.json")
    ours = slide_vectors(folder)
    per_tile = [stain.estimate_rgb(t).vectors for t in tiles.values()]
    usable = [v for v in per_tile if v is not None]
    tile_h = np.array([angle(v.h, ours.h) for v in usable])
    tile_e = np.array([angle(v.e, ours.e) for v in usable])
    tile_max = np.array([v.max_concentrations / ours.max_concentrations for v in usable])
    # the slide's estimate from 10 different random sets of 32 regions
    mask = ws.steps.read_png(folder / "preprocess" / "mask.png") > 127
    geometry = wsi_preprocess.MaskGeometry(
        summary["mask"]["width"],
        summary["mask"]["height"],
        *summary["mask"]["downsample"],
        summary["mask"]["level"],
    )
    plan = res.ReadPlan(
        summary["level"], summary["level_downsample"], *summary["scale"], summary["resample"]
    )
    seeds = []
    for seed in range(10):
        regions = wsi_preprocess.stain_regions(
            mask, geometry, tuple(summary["dimensions"]), plan, seed=seed
        )
        pixels, _ = wsi_preprocess.read_stain_pixels(
            str(slide), regions, plan, tuple(summary["background"])
        )
        if seed == 0:  # the estimate's own time and peak memory on a slide's regions
            tracemalloc.start()
            start = time.perf_counter()
            stain.estimate_rgb(pixels)
            seconds = time.perf_counter() - start
            peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        seeds.append(stain.estimate_rgb(pixels).vectors)
    seed_h = [angle(v.h, ours.h) for v in seeds[1:]]
    seed_e = [angle(v.e, ours.e) for v in seeds[1:]]
    seed_max = np.array([v.max_concentrations / ours.max_concentrations for v in seeds[1:]])
    # what normalisation does to each tile's amount of each stain (mean concentration,
    # unmixed with the slide's vectors before and the reference's after): one factor for
    # every tile of the slide (per-slide) or one per tile (per-tile fits)
    unmix_slide = np.linalg.pinv(ours.matrix).T
    unmix_reference = np.linalg.pinv(stain.REFERENCE.matrix).T
    ratios = {"per-slide": [], "per-tile": []}
    for t in tiles.values():
        before = (stain.optical_density(t).reshape(-1, 3) @ unmix_slide).mean(axis=0)
        for kind, normalised in (
            ("per-slide", stain.normalise(t, ours)),
            ("per-tile", torchstain_normalise(t)),
        ):
            after = (stain.optical_density(normalised).reshape(-1, 3) @ unmix_reference).mean(0)
            ratios[kind].append(after / before)
    spread = {k: np.std(v, axis=0) / np.mean(v, axis=0) for k, v in ratios.items()}
    thumbnail = ws.steps.read_png(folder / "preprocess" / "thumbnail.png")[..., :3]
    coarse = stain.estimate_rgb(thumbnail[mask]).vectors
    return [
        f"per-tile   {name:10s} tiles={len(tiles)} degenerate={len(per_tile) - len(usable)}  "
        f"angle-to-slide-deg H median={np.median(tile_h):.1f} p90={np.percentile(tile_h, 90):.1f} "
        f"max={tile_h.max():.1f}  E median={np.median(tile_e):.1f} "
        f"p90={np.percentile(tile_e, 90):.1f} max={tile_e.max():.1f}  "
        f"strength/slide H p10-p90={np.percentile(tile_max[:, 0], 10):.2f}-"
        f"{np.percentile(tile_max[:, 0], 90):.2f} E p10-p90={np.percentile(tile_max[:, 1], 10):.2f}-"
        f"{np.percentile(tile_max[:, 1], 90):.2f}",
        f"estimate   {name:10s} {len(pixels)} region pixels: {seconds:.2f} s, "
        f"peak {peak_mb:.0f} MB (tracemalloc)",
        f"per-slide  {name:10s} 10 region sets  angle-to-seed-0-deg H max={max(seed_h):.2f} "
        f"E max={max(seed_e):.2f}  strength/seed-0 H {seed_max[:, 0].min():.3f}-"
        f"{seed_max[:, 0].max():.3f} E {seed_max[:, 1].min():.3f}-{seed_max[:, 1].max():.3f}",
        f"amounts    {name:10s} normalised/raw stain amount per tile, coefficient of variation "
        f"across tiles: per-slide H={spread['per-slide'][0]:.3f} E={spread['per-slide'][1]:.3f}  "
        f"per-tile (torchstain) H={spread['per-tile'][0]:.3f} E={spread['per-tile'][1]:.3f}",
        f"mask-res   {name:10s} 8 um/px tissue pixels  angle H-E={coarse.angle_deg:.1f} "
        f"(slide {ours.angle_deg:.1f})  strengths H={coarse.max_h:.2f} E={coarse.max_e:.2f} "
        f"(slide {ours.max_h:.2f}, {ours.max_e:.2f})",
    ]


def two_stainings(work: Path) -> list[str]:
    image = ws.slide_pixels(ws.CMU)
    ws.write_single_level(work / "original.tiff", image, 0.499)
    again = ws.restained(image, stain.estimate_rgb(image).vectors)
    ws.write_single_level(work / "restained.tiff", again, 0.499)
    folders = {}
    for name in ("original", "restained"):
        folder = work / "stainings" / name
        ws.preprocess(folder, work / f"{name}.tiff")
        ws.tile(folder, size=256, format="png")
        folders[name] = folder
    a, b = (tiles_of(folders[n]) for n in ("original", "restained"))
    va, vb = (slide_vectors(folders[n]) for n in ("original", "restained"))
    common = sorted(set(a) & set(b))
    raw = np.mean([np.abs(a[k].astype(int) - b[k]).mean() for k in common])
    slide = np.mean(
        [
            np.abs(stain.normalise(a[k], va).astype(int) - stain.normalise(b[k], vb)).mean()
            for k in common
        ]
    )
    per_tile = np.mean(
        [
            np.abs(
                torchstain_normalise(a[k]).astype(int) - torchstain_normalise(b[k]).astype(int)
            ).mean()
            for k in common
        ]
    )
    return [
        f"two-stainings CMU-1 vs Ruifrok restain  tiles={len(common)}  mean |diff| raw={raw:.2f}  "
        f"per-slide (medprep)={slide:.2f} ({raw / slide:.1f}x closer)  "
        f"per-tile (torchstain)={per_tile:.2f} ({raw / per_tile:.1f}x closer)"
    ]


def loader(work: Path, folders: dict[str, Path], repeats: int) -> list[str]:
    destination = work / "published"
    entries = []
    for name, folder in folders.items():
        target = destination / "wsi" / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(folder, target)
        entries.append(
            dataset.SampleEntry(
                name, "wsi", str(target / "tile.json"), str(target / "preprocess.json")
            )
        )
    out = destination / "dataset" / "bench"
    atomic.write_json(out / "manifest.json", dataset.build(entries, out))
    lines = []
    rates = {}
    for mode in (None, "normalise", "augment"):
        ds = open_dataset(destination, stain=mode)
        n = len(ds.tiles)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(n):
                ds.tiles[i]
            best = min(best, time.perf_counter() - start)
        rates[mode] = n / best
    for mode, rate in rates.items():
        lines.append(
            f"loader     stain={mode!s:9s} tiles={n} (256 px PNG)  tiles/s={rate:7.1f}  "
            f"ratio-to-none={rates[None] / rate:.2f}x time"
        )
    # the stain step alone, on decoded tiles
    ds = open_dataset(destination)
    tile, row = ds.tiles[0]
    matrix = stain.normalisation_matrix(ds.stain_vectors(row["sample"]))
    start = time.perf_counter()
    for _ in range(200):
        stain.apply_od_matrix(tile, matrix)
    per_tile = (time.perf_counter() - start) / 200
    lines.append(f"loader     apply_od_matrix alone: {per_tile * 1e3:.2f} ms per 256 x 256 tile")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(HERE / "out" / "stain"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "stain.txt"))
    args = parser.parse_args()
    try:
        import torchstain  # noqa: F401
    except ImportError:
        sys.exit("bench_stain needs torchstain: .venv/bin/pip install torchstain==1.4.1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "$ .venv/bin/python benchmarks/bench_stain.py",
        f"# {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}, {os.cpu_count()} cores, load "
        + " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "# torchstain 1.4.1 numpy backend; tiles 256 px at 0.5 um/px; Macenko Io 240, "
        "alpha 1, beta 0.15",
    ]
    folders = {}
    for name, (slide, mpp) in SLIDES.items():
        folder = work / name
        ws.preprocess(folder, slide, mpp_override=mpp)
        ws.tile(folder, size=256, format="png")
        folders[name] = folder
        tiles = tiles_of(folder)
        lines += agreement(name, tiles)
        lines += stability(name, folder, slide, tiles)
        print("\n".join(lines[-6:]), flush=True)
    lines += two_stainings(work)
    print(lines[-1], flush=True)
    lines += loader(work, folders, args.repeats)
    print("\n".join(lines[-4:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
