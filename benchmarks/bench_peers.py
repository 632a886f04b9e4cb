"""medprep against the peer tilers on one slide, side by side.

    .venv/bin/python benchmarks/bench_peers.py [--size 12000] [--workers 2] [--only lazyslide]

The slide is bench_wsi's synthetic pyramidal JPEG slide (``--size`` pixels square at
``--slide-mpp``, 0.5 um/px by default, real tissue texture over about a third of it). Every
tool is asked for the same thing: 256 px tiles at 0.5 um/px, no overlap, kept where at
least half of the tile is tissue (each tool's own tissue detection), written as JPEG
(quality 90 where the tool lets us choose):

- medprep: ``preprocess_wsi`` + ``tile_wsi`` into tar shards, ``--workers`` processes;
  coordinates-only: ``preprocess_wsi`` + ``tile_wsi`` with the ``coords`` container, which
  with no pixel filter on reads no pixels (the table has the grid, tissue-mask coverage
  and the artifact fractions; the pixel score columns are null);
- LazySlide 0.13: ``pp.find_tissues`` + ``pp.tile_tissues(mpp=0.5,
  background_fraction=0.5)``, then its slide reader on ``--workers`` forked processes,
  each tile JPEG-encoded (PIL, q90) into a tar; coordinates-only: up to ``tile_tissues``;
- TIAToolbox 2.1: ``SlidingWindowPatchExtractor(resolution=0.5, units="mpp",
  input_mask="otsu", min_mask_ratio=0.5)`` iterated in one process (its API), each patch
  into the tar the same way; coordinates-only: building the extractor (its coordinate list);
- histolab 0.7: ``GridTiler(level=0, check_tissue=True, tissue_percent=50)`` with
  ``TissueMask``, which writes one file per tile: PNG, because its JPEG path fails here
  (``cannot write mode RGBA as JPEG``: its tiles are RGBA and the Pillow 10 its pins allow
  refuses them); it tiles only at a pyramid level, so it honours 0.5 um/px only on a
  slide scanned at 0.5; no coordinates-only mode in its public API;
- the usual script: bench_wsi's baseline, one process, ``read_region`` of every grid tile,
  grey threshold, one PNG per kept tile (as the project's first script did).

Each peer is installed from PyPI into its own virtual environment under
``benchmarks/out/peer-venvs/`` (git-ignored, reused while the pins match); a peer that
cannot be installed or imported is skipped with the reason. Every variant runs in its own
process; the table gives seconds, tiles, tiles/s, the peak resident memory of the process
tree (sampled every 20 ms) and the ratio of medprep's speed to each. medprep runs before
and after the peers, and ``--rounds N`` repeats the whole sequence; the fastest run of each
variant counts (on a shared machine other jobs only ever slow a run down). Not a test: installs take minutes and timings depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
VENVS = OUT / "peer-venvs"

TILE = 256
MPP = 0.5
MIN_TISSUE = 0.5
QUALITY = 90


# (pip requirements, Python minor version it needs wheels for, why that version)
PEERS: dict[str, tuple[list[str], str]] = {
    "lazyslide": (["lazyslide==0.13.0"], "3.11"),
    "tiatoolbox": (["tiatoolbox==2.1.3"], "3.11"),
    # histolab 0.7.0 pins scikit-image < 0.19.4, which has wheels up to Python 3.10 only,
    # and openslide-python < 1.3.2, which loads the system OpenSlide (libopenslide.so.0)
    "histolab": (["histolab==0.7.0"], "3.10"),
}
PEER_IMPORTS = {
    "lazyslide": "import lazyslide, wsidata",
    "tiatoolbox": "from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor",
    "histolab": "import histolab.tiler, openslide",
}


# --- installing peers (parent, any Python) ----------------------------------------------


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` (e.g. "3.10"): this one, on PATH, or under pyenv."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += sorted(str(p / "bin" / "python3") for p in pyenv.glob(f"{version}.*"))
    for candidate in candidates:
        if not candidate:
            continue
        check = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode == 0 and check.stdout.strip() == str(
            tuple(map(int, version.split(".")))
        ):
            return candidate
    return None


def install_peer(name: str) -> tuple[str | None, str]:
    """The peer's venv Python, or None and the reason it cannot be used."""
    requirements, version = PEERS[name]
    folder = VENVS / name
    python = folder / "bin" / "python"
    stamp = folder / ".medprep-installed"
    log = VENVS / f"{name}.log"
    wanted = " ".join(requirements)
    if not (stamp.exists() and stamp.read_text() == wanted):
        base = find_python(version)
        if base is None:
            return None, f"needs Python {version} (wheels of its pinned dependencies), not found"
        shutil.rmtree(folder, ignore_errors=True)
        VENVS.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log, "w") as out:
            steps = [
                [base, "-m", "venv", str(folder)],
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements],
            ]
            for command in steps:
                if subprocess.run(command, stdout=out, stderr=out, check=False).returncode:
                    return None, f"cannot be installed from PyPI (pip log: {log})"
        stamp.write_text(wanted)
        print(f"installed {name} ({wanted}) in {time.perf_counter() - started:.0f} s", flush=True)
    check = subprocess.run(
        [str(python), "-c", PEER_IMPORTS[name]], capture_output=True, text=True, check=False
    )
    if check.returncode:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"installed but does not import: {last}"
    return str(python), "ok"


# --- children: one variant each, in the right environment -------------------------------


def _tar_writer(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return tarfile.open(path, "w")


def _add(tar, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(pixels) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., :3]).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


_LAZY = None


def _lazyslide_open(path: str, spec: dict) -> None:
    global _LAZY
    from wsidata import open_wsi

    _LAZY = (open_wsi(path), spec)


def _lazyslide_read(chunk: list[tuple[int, int]]) -> list[bytes]:
    import numpy as np
    from PIL import Image

    wsi, spec = _LAZY
    out = []
    for x, y in chunk:
        image = wsi.reader.get_region(x, y, spec["ops_w"], spec["ops_h"], level=spec["level"])
        image = np.asarray(image)
        if image.shape[:2] != (spec["h"], spec["w"]):
            image = np.asarray(Image.fromarray(image).resize((spec["w"], spec["h"])))
        out.append(_jpeg(image))
    return out


def child_lazyslide(slide: str, out: Path, workers: int, coords: bool) -> dict:
    import multiprocessing

    import lazyslide as zs
    from wsidata import open_wsi

    started = time.perf_counter()
    wsi = open_wsi(slide)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, TILE, mpp=MPP, background_fraction=1 - MIN_TISSUE)
    tiles = wsi["tiles"]
    spec = wsi.tile_spec("tiles")
    bounds = tiles.geometry.bounds
    xy = [(round(x), round(y)) for x, y in zip(bounds["minx"], bounds["miny"], strict=True)]
    note = f"reads level {spec.ops_level} at {spec.ops_width} px, tile mpp {spec.mpp}"
    if coords:
        return {"seconds": time.perf_counter() - started, "tiles": len(xy), "note": note}
    shape = {
        "ops_w": int(spec.ops_width),
        "ops_h": int(spec.ops_height),
        "w": int(spec.width),
        "h": int(spec.height),
        "level": int(spec.ops_level),
    }
    chunks = [xy[i : i + 64] for i in range(0, len(xy), 64)]
    kept = 0
    context = multiprocessing.get_context("fork")
    with (
        context.Pool(workers, _lazyslide_open, (slide, shape)) as pool,
        _tar_writer(out / "tiles.tar") as tar,
    ):
        for chunk, encoded in zip(chunks, pool.imap(_lazyslide_read, chunks), strict=True):
            for (x, y), data in zip(chunk, encoded, strict=True):
                _add(tar, f"x{x}_y{y}.jpg", data)
                kept += 1
    return {"seconds": time.perf_counter() - started, "tiles": kept, "note": note}


def child_tiatoolbox(slide: str, out: Path, workers: int, coords: bool) -> dict:
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor

    started = time.perf_counter()
    extractor = SlidingWindowPatchExtractor(
        input_img=slide,
        patch_size=(TILE, TILE),
        stride=(TILE, TILE),
        resolution=MPP,
        units="mpp",
        input_mask="otsu",
        min_mask_ratio=MIN_TISSUE,
    )
    note = "one process (the extractor is an iterator)"
    if coords:
        return {"seconds": time.perf_counter() - started, "tiles": len(extractor), "note": note}
    kept = 0
    with _tar_writer(out / "tiles.tar") as tar:
        for patch in extractor:
            _add(tar, f"{kept:07d}.jpg", _jpeg(patch))
            kept += 1
    return {"seconds": time.perf_counter() - started, "tiles": kept, "note": note}


def child_histolab(slide: str, out: Path, workers: int, coords: bool) -> dict:
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    wsi = Slide(slide, processed_path=str(out))
    tiler = GridTiler(
        tile_size=(TILE, TILE),
        level=0,
        check_tissue=True,
        tissue_percent=MIN_TISSUE * 100,
        pixel_overlap=0,
        prefix="t_",
        suffix=".png",
    )
    tiler.extract(wsi, extraction_mask=TissueMask())
    kept = sum(1 for _ in out.rglob("t_*.png"))
    note = "level 0 only; PNG (its JPEG writer fails on its RGBA tiles with Pillow 10)"
    return {"seconds": time.perf_counter() - started, "tiles": kept, "note": note}


def child_medprep(slide: str, out: Path, workers: int, coords: bool) -> dict:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import bench_wsi

    # "seconds" is the work after imports for every tool (the peers import theirs before
    # the clock starts): medprep's steps import their engines lazily, so do it here
    for module in MEDPREP_ENGINES:
        importlib.import_module(module)
    pre = bench_wsi.run_preprocess(Path(slide), out, workers, MPP)
    if coords:
        til = bench_wsi.run_tile(out, workers, container="coords")
        return {
            "seconds": pre["seconds"] + til["seconds"],
            "tiles": til["tiles"],
            "note": f"preprocess {pre['seconds']:.2f} s + tile_wsi coords "
            f"{til['seconds']:.2f} s ({til['reads']} reads)",
        }
    til = bench_wsi.run_tile(out, workers)
    return {
        "seconds": pre["seconds"] + til["seconds"],
        "tiles": til["tiles"],
        "note": f"preprocess {pre['seconds']:.2f} s + tile {til['seconds']:.2f} s",
    }


# What medprep's WSI steps import inside their functions (see medprep/wsi/steps.py).
MEDPREP_ENGINES = (
    "medprep.wsi.preprocess",
    "medprep.wsi.tiler",
    "medprep.wsi.marks",
    "scipy.ndimage",
    "PIL.Image",
    "pyarrow.parquet",
    "pandas",
    "openslide",
    "tifffile",
    "imagecodecs",
)


def child_script(slide: str, out: Path, workers: int, coords: bool) -> dict:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import bench_wsi

    result = bench_wsi.run_baseline(Path(slide), out)
    return {"seconds": result["seconds"], "tiles": result["tiles"], "note": "PNG per tile"}


CHILDREN = {
    "lazyslide": child_lazyslide,
    "tiatoolbox": child_tiatoolbox,
    "histolab": child_histolab,
    "medprep": child_medprep,
    "script": child_script,
}


# --- measuring (parent) -----------------------------------------------------------------


def run_child(python: str, variant: str, slide: Path, out: Path, workers: int, coords: bool):
    sys.path.insert(0, str(HERE))
    from bench_wsi import _tree_rss_kb

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    command = [python, __file__, "--child", variant, "--slide", str(slide), "--out", str(out)]
    command += ["--workers", str(workers)] + (["--coords"] if coords else [])
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss_kb(process.pid))
                time.sleep(0.02)

        started = time.perf_counter()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = process.communicate()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    if process.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["?"]
        return {"error": f"exit code {process.returncode}: {lines[-1][:160]} (log: {log})"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = peak / 1024
    result["process_seconds"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--slide-mpp", type=float, default=MPP)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", action="append", choices=sorted(PEERS), help="peers to run")
    parser.add_argument(
        "--skip-script", action="store_true", help="skip the usual one-process script"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence")
    parser.add_argument("--coords-only", action="store_true", help="coordinates-only variants")
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--slide")
    parser.add_argument("--out")
    parser.add_argument("--coords", action="store_true")
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.slide, Path(args.out), args.workers, args.coords)
        print(json.dumps(result))
        return

    peers = args.only or list(PEERS)
    pythons: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for name in peers:
        pythons[name], reasons[name] = install_peer(name)
        print(f"{name}: {reasons[name]}", flush=True)
    if args.install_only:
        return

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import bench_wsi

    slide = bench_wsi.build_slide(args.size, mpp=args.slide_mpp)
    n = args.workers
    runs = OUT / "peer-runs"
    print(
        f"slide {slide.name}: {args.size} x {args.size} at {args.slide_mpp} um/px; "
        f"{os.cpu_count()} CPUs; {n} workers; target {MPP} um/px, {TILE} px tiles, "
        f"tissue >= {MIN_TISSUE:.0%} of a tile, JPEG"
    )
    print(f"available parallelism on {n} processes: {bench_wsi.available_parallelism(n):.2f}x")
    results: dict[tuple[str, bool], dict] = {}

    def run(variant: str, coords: bool, python: str = sys.executable) -> None:
        key = (variant, coords)
        label = f"{variant}-{'coords' if coords else 'tiles'}"
        result = run_child(python, variant, slide, runs / label, n, coords)
        if key in results and "seconds" in results[key] and "seconds" in result:
            result = min(results[key], result, key=lambda r: r["seconds"])
        results[key] = result
        summary = result.get("error") or f"{result['seconds']:.2f} s, {result['tiles']} tiles"
        print(f"  ran {label}: {summary}", flush=True)

    modes = (True,) if args.coords_only else (False, True)
    for _ in range(args.rounds):
        for coords in modes:
            run("medprep", coords)
        for name in peers:
            if pythons[name] is None:
                continue
            if not args.coords_only:
                run(name, False, pythons[name])
            if name != "histolab":
                run(name, True, pythons[name])
        for coords in modes:
            run("medprep", coords)
    if not args.skip_script and not args.coords_only:
        run("script", False)

    honours = args.slide_mpp == MPP
    print()
    print(
        "seconds: the work itself, after imports; process s: the whole process (interpreter "
        "start and imports included);\nratios: medprep's tiles/s over the variant's "
        "(higher = medprep faster)"
    )
    for coords in modes:
        mode = "coordinates only (no pixels read or written)" if coords else "tiles written"
        ours = results[("medprep", coords)]
        our_rate = ours["tiles"] / ours["seconds"]
        our_process_rate = ours["tiles"] / ours["process_seconds"]
        print(f"{mode}:")
        print(
            f"  {'variant':11} {'seconds':>8} {'process s':>9} {'tiles':>6} {'tiles/s':>8} "
            f"{'peak MB':>8} {'ratio':>6} {'ratio (process)':>15}  notes"
        )
        fastest = None
        for variant in ("medprep", *peers, "script"):
            if variant in PEERS and pythons.get(variant) is None:
                if not coords:
                    print(f"  {variant:11} skipped: {reasons[variant]}")
                continue
            result = results.get((variant, coords))
            if result is None:
                if variant == "histolab" and coords:
                    print(f"  {variant:11} no coordinates-only mode in its public API")
                continue
            if "error" in result:
                print(f"  {variant:11} failed: {result['error']}")
                continue
            rate = result["tiles"] / result["seconds"]
            process_rate = result["tiles"] / result["process_seconds"]
            note = result.get("note", "")
            if variant == "histolab" and not honours:
                note += f"; CANNOT honour {MPP} um/px (reads level 0 at {args.slide_mpp})"
            print(
                f"  {variant:11} {result['seconds']:8.2f} {result['process_seconds']:9.2f} "
                f"{result['tiles']:6d} {rate:8.0f} {result['peak_mb']:8.0f} "
                f"{our_rate / rate:6.2f} {our_process_rate / process_rate:15.2f}  {note}"
            )
            if variant in PEERS and (fastest is None or rate > fastest[1]):
                fastest = (variant, rate, process_rate)
        if fastest:
            target = 3 if coords else 2
            print(
                f"  medprep vs the fastest peer ({fastest[0]}): {our_rate / fastest[1]:.2f}x "
                f"tiles/s, {our_process_rate / fastest[2]:.2f}x with process start "
                f"(target >= {target}x)"
            )
        script = results.get(("script", False))
        if not coords and script and "seconds" in script:
            print(
                f"  medprep vs the usual script: {script['seconds'] / ours['seconds']:.1f}x faster "
                "(target >= 10x)"
            )
        print()


if __name__ == "__main__":
    main()
