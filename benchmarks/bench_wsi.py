"""Whole-slide tiling: the usual one-process script against medprep's tiler, side by side.

    .venv/bin/python benchmarks/bench_wsi.py [--size 30000] [--workers 2] [--slide-tile 256]

Builds (once; reused while its parameters match) two pyramidal JPEG slides of size x size
pixels, q90, with tissue texture from the real CMU-1-Small-Region slide over about a third
of the area, under benchmarks/out/: one at 0.5 um/px and one at ``--resample-mpp`` (0.2527,
Aperio's 40x). ``--slide-tile`` is the slides' own JPEG tile edge: 256 lines up with the
256 px output grid (the best case for reading tile by tile); 240 is the layout Aperio
scanners write (CMU-1 itself), where a 256 px read touches up to four slide tiles. Then
times, each in its own process, 256 px tiles, JPEG q90, tissue >= 50% of a tile:

1. baseline: the usual script: one process, ``read_region`` of every grid tile at level 0,
   grayscale threshold, one PNG file per kept tile;
2. read-only limits: the tiles medprep keeps, one read each on all workers (each opens
   the slide once), no encoding or writing: through OpenSlide's ``read_region``, and
   through the direct tile decoding of ``medprep.wsi.tiff_read``;
3. medprep: ``preprocess_wsi`` + ``tile_wsi`` (tar shards) at 0.5 um/px with 1 and with N
   workers, and with N workers reading through OpenSlide only (``MEDPREP_DIRECT_READS=0``);
4. resampling: the 0.5 slide tiled at 0.502 um/px (a 0.4% resample, like a 0.498 scan
   served at 0.5 with no tolerance), and the 0.2527 slide tiled natively and at 0.5 um/px.

Prints seconds, tiles/s, the ratios the tiler is held to, and the peak memory of each
variant (resident set of the whole process tree, sampled every 20 ms) next to the
estimate of ``medprep.wsi.memory``. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
REPO = HERE.parent
sys.path.insert(0, str(REPO))

TEXTURE = REPO / "tests" / "fixtures" / "wsi" / "CMU-1-Small-Region.svs"
TILE = 256
QUALITY = 90
MIN_TISSUE = 0.5
# the baseline's tissue test: grey level below this counts as tissue
BASELINE_GRAY_THRESHOLD = 220
# wsi.resolution.tolerance's default (config.yaml); the other variants use 0 on purpose
DEFAULT_TOLERANCE = 0.025


# --- building the slide -----------------------------------------------------------------


def build_slide(size: int, slide_tile: int = TILE, mpp: float = 0.5) -> Path:
    from medprep.demo.synthetic_slide import write_synthetic_slide

    OUT.mkdir(parents=True, exist_ok=True)
    name = f"bench-{size}"
    if slide_tile != TILE:
        name += f"-t{slide_tile}"
    if mpp != 0.5:
        name += f"-mpp{mpp:g}"
    path = OUT / f"{name}.svs"
    params = {"size": size, "mpp": mpp, "quality": QUALITY, "tissue_fraction": 1 / 3, "seed": 0}
    if slide_tile != TILE:
        params["slide_tile"] = slide_tile
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return path
    started = time.perf_counter()
    info = write_synthetic_slide(
        path,
        size,
        size,
        texture_slide=TEXTURE,
        mpp=mpp,
        quality=QUALITY,
        tissue_fraction=1 / 3,
        seed=0,
        tile_size=slide_tile,
    )
    stamp.write_text(json.dumps(params))
    print(
        f"built {path.name}: {size} x {size} at {mpp} um/px, levels {info.level_sizes}, "
        f"{path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s"
    )
    return path


# --- variants (each runs in a child process) --------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the pool
    workers, reaped when the pool closes): on a shared machine the CPU a variant needs
    varies far less than its wall time."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_baseline(slide: Path, out: Path) -> dict:
    import numpy as np
    import openslide

    out.mkdir(parents=True, exist_ok=True)
    handle = openslide.OpenSlide(str(slide))
    width, height = handle.dimensions
    started = time.perf_counter()
    reads = kept = 0
    for y in range(0, height - TILE + 1, TILE):
        for x in range(0, width - TILE + 1, TILE):
            tile = handle.read_region((x, y), 0, (TILE, TILE)).convert("RGB")
            reads += 1
            gray = np.asarray(tile.convert("L"))
            if (gray < BASELINE_GRAY_THRESHOLD).mean() >= MIN_TISSUE:
                tile.save(out / f"{x}_{y}.png")
                kept += 1
    return {"seconds": time.perf_counter() - started, "tiles": kept, "reads": reads}


_READ_ONLY_SLIDE = None


def _open_for_reads(path: str) -> None:
    global _READ_ONLY_SLIDE
    import openslide

    _READ_ONLY_SLIDE = openslide.OpenSlide(path)


def _read_tiles(chunk: list[tuple[int, int]]) -> int:
    for x, y in chunk:
        _READ_ONLY_SLIDE.read_region((x, y), 0, (TILE, TILE))
    return len(chunk)


_DIRECT = None


def _open_direct(path: str) -> None:
    global _DIRECT
    from medprep.wsi.slide import SlideReader

    _DIRECT = SlideReader(path, direct=True)
    if not _DIRECT.direct_levels:
        raise SystemExit(f"no direct reads for {path}: {_DIRECT.direct_reason}")


def _read_tiles_direct(chunk: list[tuple[int, int]]) -> int:
    for x, y in chunk:
        _DIRECT.read_rgba(0, x, y, TILE, TILE)
    assert _DIRECT.openslide_reads == 0
    return len(chunk)


def run_read_only_direct(slide: Path, table: Path, workers: int) -> dict:
    """The read-only limit of the direct path: the same tiles, one direct read each."""
    import pyarrow.parquet as pq

    from medprep.common.parallel import run_parallel

    columns = pq.read_table(table, columns=["x", "y"]).to_pydict()
    coordinates = list(zip(columns["x"], columns["y"], strict=True))
    chunks = [coordinates[i : i + 64] for i in range(0, len(coordinates), 64)]
    started = time.perf_counter()
    reads = sum(run_parallel(_read_tiles_direct, chunks, workers, _open_direct, (str(slide),)))
    return {"seconds": time.perf_counter() - started, "tiles": reads, "reads": reads}


def run_read_only(slide: Path, table: Path, workers: int) -> dict:
    import pyarrow.parquet as pq

    from medprep.common.parallel import run_parallel

    columns = pq.read_table(table, columns=["x", "y"]).to_pydict()
    coordinates = list(zip(columns["x"], columns["y"], strict=True))
    chunks = [coordinates[i : i + 64] for i in range(0, len(coordinates), 64)]
    started, cpu = time.perf_counter(), cpu_seconds()
    reads = sum(run_parallel(_read_tiles, chunks, workers, _open_for_reads, (str(slide),)))
    return {
        "seconds": time.perf_counter() - started,
        "cpu": cpu_seconds() - cpu,
        "tiles": reads,
        "reads": reads,
    }


def run_read_cost(slide: Path, table: Path, out: Path, samples: int = 400) -> dict:
    """Where one process's time per tile goes: reading a tile alone, reading it as part of
    an 8 x 8 block, and the work the tiler adds per tile (encode, grey image, QC, tar).
    Milliseconds per 256 px tile; reads on a fresh handle, the file in the page cache."""
    import numpy as np
    import openslide
    import pyarrow.parquet as pq

    from medprep.wsi import qc, writers

    slide.read_bytes()  # page cache, so neither read pass pays for the disk
    columns = pq.read_table(table, columns=["x", "y"]).to_pydict()
    kept = list(zip(columns["x"], columns["y"], strict=True))
    picked = kept[:: max(1, len(kept) // samples)][:samples]
    block = 8 * TILE
    origins = sorted({(x // block * block, y // block * block) for x, y in picked})[:12]

    def per_tile_ms(started: float, tiles: int) -> float:
        return (time.perf_counter() - started) * 1000 / tiles

    handle = openslide.OpenSlide(str(slide))
    started = time.perf_counter()
    for x, y in picked:
        handle.read_region((x, y), 0, (TILE, TILE))
    tile_read = per_tile_ms(started, len(picked))
    handle = openslide.OpenSlide(str(slide))
    started = time.perf_counter()
    for x, y in origins:
        handle.read_region((x, y), 0, (block, block))
    block_read = per_tile_ms(started, len(origins) * 64)

    from medprep.wsi.slide import SlideReader

    direct = SlideReader(slide, direct=True)
    started = time.perf_counter()
    for x, y in picked:
        direct.read_rgba(0, x, y, TILE, TILE)
    direct_read = per_tile_ms(started, len(picked))
    direct.close()

    tiles = [np.asarray(handle.read_region((x, y), 0, (TILE, TILE))) for x, y in picked[:200]]
    started = time.perf_counter()
    encoded = [writers.encode_tile(t, "jpeg", QUALITY) for t in tiles]
    encode = per_tile_ms(started, len(tiles))
    started = time.perf_counter()
    grays = [qc.gray_levels(t) for t in tiles]
    gray = per_tile_ms(started, len(tiles))
    started = time.perf_counter()
    for t, g in zip(tiles, grays, strict=True):
        qc.tile_scores(t, "brightfield", 20.0, g)
    scores = per_tile_ms(started, len(tiles))
    shards = out / "tar"
    shards.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    container = writers.TarShardContainer(shards, max_members=len(encoded))
    for i, data in enumerate(encoded):
        container.add(f"t{i}", data, "jpg")
    container.close()
    tar = per_tile_ms(started, len(tiles))
    return {
        "seconds": 0.0,
        "tiles": len(picked),
        "reads": len(picked) + len(origins),
        "ms_per_tile": {
            "read alone": tile_read,
            "read in 8 x 8 blocks": block_read,
            "direct read (stored tiles decoded)": direct_read,
            "JPEG encode": encode,
            "grey image": gray,
            "QC scores": scores,
            "tar member": tar,
        },
    }


def run_preprocess(
    slide: Path, out: Path, workers: int, mpp: float = 0.5, tolerance: float = 0.0
) -> dict:
    from medprep.common import atomic
    from medprep.wsi import steps

    folder = out / "S"
    folder.mkdir(parents=True, exist_ok=True)
    download = folder / "download.json"
    atomic.write_json(download, {"format": 1, "files": [{"path": str(slide)}]})
    started = time.perf_counter()
    summary = steps.run_preprocess(
        download,
        mask_path=folder / "preprocess" / "mask.png",
        thumbnail_path=folder / "preprocess" / "thumbnail.png",
        summary_path=folder / "preprocess" / "summary.json",
        manifest_path=folder / "preprocess.json",
        sample="bench",
        resolution={"mpp": mpp, "tolerance": tolerance},
        threads=workers,
    )["summary"]
    return {
        "seconds": time.perf_counter() - started,
        "tiles": 0,
        "reads": 0,
        "tissue_area_mm2": summary["tissue_area_mm2"],
        "resample": summary.get("resample"),
    }


def run_tile(out: Path, workers: int, container: str = "tar") -> dict:
    from medprep.common import atomic
    from medprep.wsi import steps

    folder = out / "S"
    started, cpu = time.perf_counter(), cpu_seconds()
    manifest = steps.run_tile(
        folder / "download.json",
        folder / "preprocess.json",
        table_path=folder / "tiles" / "tiles.parquet",
        overlay_path=folder / "tiles" / "overlay.png",
        summary_path=folder / "tiles" / "summary.json",
        manifest_path=folder / "tile.json",
        sample="bench",
        tile={
            "size": TILE,
            "format": "jpeg",
            "quality": QUALITY,
            "container": container,
            "min_tissue": MIN_TISSUE,
        },
        threads=workers,
    )
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    summary = manifest["summary"]
    detail = atomic.read_json(
        next(a["path"] for a in manifest["artifacts"] if a["name"].endswith("/summary.json"))
    )
    return {
        "seconds": seconds,
        "cpu": cpu,
        "tiles": summary["tiles"],
        "reads": summary["read_calls"],
        "candidates": summary["candidates"],
        "tile_mpp": detail["tile_mpp"],
        "prereduce": detail.get("resample_prereduce", 1),
    }


def child(args: argparse.Namespace) -> None:
    slide = Path(args.slide)
    out = Path(args.out)
    if args.variant == "baseline":
        result = run_baseline(slide, out)
    elif args.variant == "read_only":
        result = run_read_only(slide, Path(args.table), args.workers)
    elif args.variant == "read_only_direct":
        result = run_read_only_direct(slide, Path(args.table), args.workers)
    elif args.variant == "read_cost":
        result = run_read_cost(slide, Path(args.table), out)
    elif args.variant == "preprocess":
        result = run_preprocess(slide, out, args.workers, args.mpp, args.tolerance)
    else:
        result = run_tile(out, args.workers)
    print(json.dumps(result))


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def available_parallelism(workers: int) -> float:
    """Speed-up of ``workers`` processes over one on pure CPU work: how many cores this
    run really gets (other jobs on a shared machine lower it)."""
    import multiprocessing

    n = 4_000_000
    started = time.perf_counter()
    for _ in range(workers):
        _spin(n)
    serial = time.perf_counter() - started
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        started = time.perf_counter()
        pool.map(_spin, [n] * workers)
        parallel = time.perf_counter() - started
    return serial / parallel


# --- measuring --------------------------------------------------------------------------


def _tree_rss_kb(pid: int) -> int:
    """Resident set of ``pid`` and all its descendants, in kB."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{current}/task/{current}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(
    variant: str,
    slide: Path,
    out: Path,
    workers: int = 1,
    table: Path | None = None,
    *,
    mpp: float = 0.5,
    tolerance: float = 0.0,
    direct: bool = True,
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--slide",
        str(slide),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    if table is not None:
        command += ["--table", str(table)]
    command += ["--mpp", str(mpp), "--tolerance", str(tolerance)]
    env = dict(os.environ, MEDPREP_DIRECT_READS="1" if direct else "0")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"variant {variant} failed with exit code {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = peak / 1024
    result["out"] = str(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slide-tile", type=int, default=TILE, help="the slide's JPEG tile edge")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the fast variants")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the variants the targets compare (2 workers, the 0.2527 slide, read-only "
        "OpenSlide), preprocessing once; for a busy machine",
    )
    parser.add_argument("--variant")
    parser.add_argument("--slide")
    parser.add_argument("--out")
    parser.add_argument("--table")
    parser.add_argument("--mpp", type=float, default=0.5, help="target (child processes)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="(child processes)")
    parser.add_argument(
        "--resample-mpp",
        type=float,
        default=0.2527,
        help="scan resolution of the second slide, tiled at 0.5 um/px (resampled) and natively",
    )
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    import shutil

    from medprep.wsi import memory
    from medprep.wsi.slide import inspect_slide

    slide = build_slide(args.size, args.slide_tile)
    fine = build_slide(args.size, args.slide_tile, mpp=args.resample_mpp)
    info = inspect_slide(slide)
    n = args.workers
    print(
        f"slide {slide} ({info.dimensions[0]} x {info.dimensions[1]}, {info.mpp_x} um/px); "
        f"{os.cpu_count()} CPUs; start method {os.environ.get('MEDPREP_START_METHOD', 'spawn')}"
    )
    print(f"second slide {fine} ({args.resample_mpp} um/px, same layout)")
    print(f"available parallelism on {n} processes: {available_parallelism(n):.2f}x (ideal {n})")
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    # Fast variants run in interleaved rounds and the best round counts: on a shared
    # machine other jobs only ever slow a run down.
    rounds: dict[str, list[dict]] = {}

    def record(key: str, result: dict) -> None:
        rounds.setdefault(key, []).append(result)

    def tiling(
        key: str, source: Path, workers: int, mpp: float, direct: bool = True, tolerance=0.0
    ) -> None:
        folder = runs / key
        if not (args.quick and f"preprocess-{key}" in rounds):  # --quick: preprocess once
            record(
                f"preprocess-{key}",
                measure(
                    "preprocess", source, folder, workers, mpp=mpp, tolerance=tolerance,
                    direct=direct,
                ),
            )  # fmt: skip
        record(f"tile-{key}", measure("tile", source, folder, workers, direct=direct))

    resampled_mpp = 0.5 * 1.004  # like a 0.498 um/px scan served at 0.5: resampled, r ~ 1
    for _ in range(args.repeats):
        for workers in (n,) if args.quick else (1, n):
            tiling(f"medprep-{workers}", slide, workers, 0.5)
        if not args.quick:
            tiling("openslide", slide, n, 0.5, direct=False)
            tiling("near", slide, n, resampled_mpp)
        tiling("fine-native", fine, n, args.resample_mpp)
        # the default tolerance (2.5%): 2 x 2 averages (0.5054 um, within it), no resizing
        tiling("fine-resampled", fine, n, 0.5, tolerance=DEFAULT_TOLERANCE)
        # tolerance 0: nothing coarser than 0.5 um/px in between, one wide bicubic pass
        tiling("fine-bicubic", fine, n, 0.5)
        table = runs / f"medprep-{n}" / "S" / "tiles" / "tiles.parquet"
        record("read_only", measure("read_only", slide, runs / "read-only", n, table))
        if not args.quick:
            record(
                "read_only_direct",
                measure("read_only_direct", slide, runs / "read-only-direct", n, table),
            )

    def best(key: str) -> dict | None:
        results = rounds.get(key)
        if not results:
            return None  # not run (--quick)
        chosen = dict(min(results, key=lambda r: r["seconds"]))
        chosen["peak_mb"] = max(r["peak_mb"] for r in results)
        chosen["all_seconds"] = [round(r["seconds"], 2) for r in results]
        if all("cpu" in r for r in results):
            chosen["cpu"] = min(r["cpu"] for r in results)
        return chosen

    ours = {
        w: (best(f"preprocess-medprep-{w}"), best(f"tile-medprep-{w}"))
        for w in ((n,) if args.quick else (1, n))
    }
    read_only = best("read_only")
    read_direct = best("read_only_direct")
    baseline = None if args.skip_baseline else measure("baseline", slide, runs / "baseline")
    print()
    print(f"{'variant':52} {'seconds':>8} {'tiles':>6} {'reads':>6} {'tiles/s':>8} {'peak MB':>8}")

    def row(label: str, seconds: float, tiles: int, reads: int, peak: float) -> None:
        rate = f"{tiles / seconds:8.0f}" if tiles else f"{'':8}"
        print(f"{label:52} {seconds:8.2f} {tiles:6d} {reads:6d} {rate} {peak:8.0f}")

    def result_row(label: str, result: dict | None) -> None:
        if result is None:
            return
        row(label, result["seconds"], result["tiles"], result["reads"], result["peak_mb"])

    if baseline:
        result_row("1 baseline: 1 process, PNG per tile", baseline)
    result_row(f"2 read-only limit, OpenSlide, {n} workers", read_only)
    result_row(f"2 read-only limit, direct tile decoding, {n} workers", read_direct)
    for workers, (pre, til) in ours.items():
        row(f"3 medprep preprocess, {workers} worker(s)", pre["seconds"], 0, 0, pre["peak_mb"])
        result_row(f"3 medprep tile, {workers} worker(s)", til)
        row(
            f"3 medprep preprocess + tile, {workers} worker(s)",
            pre["seconds"] + til["seconds"],
            til["tiles"],
            til["reads"],
            max(pre["peak_mb"], til["peak_mb"]),
        )
    through_openslide = best("tile-openslide")
    result_row(f"3 medprep tile, {n}w, all reads through OpenSlide", through_openslide)
    near = best("tile-near")
    result_row(f"4 medprep tile, {n}w, target {resampled_mpp:g} (resampled)", near)
    fine_native = best("tile-fine-native")
    fine_resampled = best("tile-fine-resampled")
    fine_bicubic = best("tile-fine-bicubic")
    result_row(f"4 {args.resample_mpp} um/px slide, {n}w, native", fine_native)
    averaged = fine_resampled["tile_mpp"] != 0.5  # the averaged level is used as it is
    after = f" = {fine_resampled['tile_mpp']:g} um" if averaged else " + Lanczos"
    result_row(
        f"4 {args.resample_mpp} slide, {n}w, to 0.5, box /{fine_resampled['prereduce']}{after}",
        fine_resampled,
    )
    result_row(f"4 {args.resample_mpp} slide, {n}w, to 0.5, tolerance 0 (bicubic)", fine_bicubic)

    def rate(result: dict) -> float:
        return result["tiles"] / result["seconds"]

    pre_n, tile_n = ours[n]
    total_n = pre_n["seconds"] + tile_n["seconds"]
    print()
    print("ratios (targets on a 2-core machine):")
    if baseline:
        print(
            f"  medprep {n}w preprocess + tile vs baseline:        "
            f"{baseline['seconds'] / total_n:6.1f}x faster (target >= 10x)"
        )
        print(
            f"  medprep {n}w tile only vs baseline:                "
            f"{baseline['seconds'] / tile_n['seconds']:6.1f}x faster"
        )
    if read_direct:
        print(
            f"  direct read-only / OpenSlide read-only:            "
            f"{rate(read_direct) / rate(read_only):6.2f}x"
        )
    print(
        f"  medprep {n}w tile throughput / OpenSlide read-only: "
        f"{rate(tile_n) / rate(read_only):6.2f}  (target >= 1.2)"
    )
    if through_openslide:
        print(
            f"  medprep {n}w tile, direct / through OpenSlide:      "
            f"{rate(tile_n) / rate(through_openslide):6.2f}x"
        )
    if 1 in ours:
        print(
            f"  medprep tile 1 -> {n} workers:                      "
            f"{ours[1][1]['seconds'] / tile_n['seconds']:6.2f}x (target >= 1.7)"
        )
    if near:
        print(
            f"  resampled (target {resampled_mpp:g}) / native tiles/s, 0.5 slide: "
            f"{rate(near) / rate(tile_n):6.2f}  (target >= 0.7)"
        )
    area = rate(fine_resampled) * fine_resampled["tile_mpp"] ** 2
    area /= rate(fine_native) * args.resample_mpp**2
    print(
        f"  {args.resample_mpp} slide, resampled to 0.5 / native: tiles/s "
        f"{rate(fine_resampled) / rate(fine_native):5.2f}, tissue area/s {area:5.2f}  "
        f"(target >= 0.7; tile mpp {fine_resampled['tile_mpp']:g}, pre-reduction "
        f"{fine_resampled['prereduce']}, averaged pixels "
        f"{args.resample_mpp * fine_resampled['prereduce']:.4g} um)"
    )
    print(
        f"  {args.resample_mpp} slide, bicubic (tolerance 0) / native: tiles/s "
        f"{rate(fine_bicubic) / rate(fine_native):5.2f}; pre-reduced / bicubic "
        f"{rate(fine_resampled) / rate(fine_bicubic):5.2f}x"
    )
    source_tiles = (0.5 / args.resample_mpp) ** 2
    print(
        f"  decode bound: a 0.5 um/px tile needs {source_tiles:.2f} stored 0.2527 um/px tiles "
        f"decoded, so resampled / native tiles/s <= native tile cost / ({source_tiles:.2f} x "
        "decode + the rest); see read_cost below"
    )

    def cpu_ms(result: dict) -> float:
        return result["cpu"] * 1000 / result["tiles"]

    print(
        "  CPU ms per tile (all processes, least of the rounds; steadier than seconds on a "
        f"busy machine): OpenSlide read-only {cpu_ms(read_only):.2f}, medprep tile "
        f"{cpu_ms(tile_n):.2f} ({cpu_ms(read_only) / cpu_ms(tile_n):.2f}x less), 0.2527 native "
        f"{cpu_ms(fine_native):.2f}, resampled {cpu_ms(fine_resampled):.2f} (tiles per CPU "
        f"second {cpu_ms(fine_native) / cpu_ms(fine_resampled):.2f}x native), bicubic "
        f"{cpu_ms(fine_bicubic):.2f} (pre-reduced {cpu_ms(fine_bicubic) / cpu_ms(fine_resampled):.2f}x "
        "faster)"
    )
    peak = max(max(p["peak_mb"], t["peak_mb"]) for p, t in ours.values())
    print(f"  peak memory of medprep:                            {peak:6.0f} MB (target < 1500)")
    print(f"  read calls: {tile_n['reads']} for {tile_n['candidates']} candidate tiles")

    cost = measure("read_cost", slide, runs / "read-cost", 1, table)["ms_per_tile"]
    print(
        "  one process, ms per 256 px tile: " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items())
    )
    print(f"  available parallelism after the runs: {available_parallelism(n):.2f}x")
    print(
        "  seconds of every round (best counts): "
        + ", ".join(
            f"{key} {values['all_seconds']}"
            for key, values in (
                ("read-only", read_only),
                ("read-only direct", read_direct),
                *((f"tile {w}w", t) for w, (_, t) in ours.items()),
                ("tile via OpenSlide", through_openslide),
                ("tile resampled", near),
                ("fine native", fine_native),
                ("fine resampled", fine_resampled),
                ("fine bicubic", fine_bicubic),
            )
            if values
        )
    )
    print()
    print("memory estimates (medprep.wsi.memory) vs measured peaks:")
    for workers, (pre, til) in ours.items():
        tile_estimate = memory.estimate_tile_mem_mb(
            workers, TILE, 8, level_ratio=1.0, tiles=til["tiles"]
        )
        pre_estimate = memory.estimate_preprocess_mem_mb(
            info.dimensions, info.mpp_x, workers=workers
        )
        print(
            f"  {workers} worker(s): preprocess {pre_estimate} MB estimated, "
            f"{pre['peak_mb']:.0f} MB measured; tile {tile_estimate} MB estimated, "
            f"{til['peak_mb']:.0f} MB measured"
        )
    resampled_estimate = memory.estimate_tile_mem_mb(
        n, TILE, 8, level_ratio=0.5 / args.resample_mpp, tiles=fine_resampled["tiles"]
    )
    print(
        f"  {n} worker(s), resampled x{0.5 / args.resample_mpp:.2f}: tile {resampled_estimate} MB "
        f"estimated, {fine_resampled['peak_mb']:.0f} MB measured"
    )


if __name__ == "__main__":
    main()
