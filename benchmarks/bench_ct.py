"""Lung CT preprocessing: the reference baseline against medprep, side by side.

    .venv/bin/python benchmarks/bench_ct.py [--rows 512 --cols 512 --slices 300] [--repeats 1]

Writes a synthetic chest CT (0.7 mm pixels, 1.25 mm slices, real DICOM; both lungs joined to
the trachea by the main bronchi, as in a real chest at 1 mm, so that the reference's
"largest component" holds both lungs) under benchmarks/out/, then runs each variant in its own
process, end to end (DICOM folder in, outputs written): the reference with cubic and with
linear zoom, and medprep's preprocess_ct on 1 and 2 threads. Prints seconds, speed-up
ratios, lung-mask Dice against the reference, peak RSS against the int16 volume size, and the
memory estimate of ``medprep.ct.memory`` against the measured peak. Not a test: timings
depend on the machine.

A run on a 2-core VM shared with other jobs (load average about 3, so absolute seconds are
inflated; the ratios compare runs made side by side):

    | variant          | threads | seconds | medprep speed-up | peak RSS MB | x int16 in |
    | reference-cubic  | 1       | 33.79   | 6.4x             | 1817        | 12.1       |
    | reference-linear | 1       | 18.21   | 3.4x             | 1816        | 12.1       |
    | medprep          | 1       |  5.31   |                  |  463        |  3.1       |
    | medprep          | 2       |  5.01   |                  |  464        |  3.1       |
    | reference-cubic  | 2       | 29.82   | 6.0x             | 1817        | 12.1       |
    | reference-linear | 2       | 12.07   | 2.4x             | 1816        | 12.1       |

    lung-mask Dice against the reference: 0.994 (cubic and linear); lung volume 4331 mL for
    4316 mL of phantom lungs and airways; outputs byte-identical on 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant == "medprep-tile":
        from medprep.ct import tile
        from medprep.manifest import read_step_manifest, write_step_manifest

        rss_before = _rss_mb()
        started = time.perf_counter()
        pre = read_step_manifest(Path(args.folder) / "preprocess.json")
        artifacts, summary = tile.tile(
            pre,
            {},
            patches_path=out / "patches.npy",
            table_path=out / "patches.parquet",
            summary_path=out / "summary.json",
            threads=args.threads,
        )
        write_step_manifest(
            out / "tile.json",
            sample="bench",
            modality="ct",
            step="tile",
            artifacts=artifacts,
            summary=summary,
        )
        seconds = time.perf_counter() - started
        info = {"patches": summary["patches"], "candidates": summary["candidates"]}
    elif args.variant.startswith("reference"):
        import ct_reference

        rss_before = _rss_mb()
        started = time.perf_counter()
        info = ct_reference.run(args.folder, out, order=3 if args.variant.endswith("cubic") else 1)
        seconds = time.perf_counter() - started
    else:
        from medprep.ct import preprocess
        from medprep.manifest import write_step_manifest

        rss_before = _rss_mb()
        started = time.perf_counter()
        files = sorted(str(p) for p in Path(args.folder).iterdir())
        result = preprocess.preprocess(files, {}, threads=args.threads)
        artifacts = preprocess.write_outputs(
            result,
            volume=out / "volume.nii.gz",
            mask=out / "lung_mask.nii.gz",
            metadata=out / "metadata.json",
            qc=out / "qc.png",
            threads=args.threads,
        )
        write_step_manifest(
            out / "preprocess.json",
            sample="bench",
            modality="ct",
            step="preprocess",
            artifacts=artifacts,
            summary=result.summary,
        )
        seconds = time.perf_counter() - started
        info = {"shape_out": result.summary["shape_out"], "status": result.status}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": _rss_mb(),
                "rss_after_imports_mb": rss_before,
                **info,
            }
        )
    )


def _run_child(variant: str, folder: Path, threads: int) -> dict:
    out = OUT / f"run-{variant}-{threads}t"
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--threads",
        str(threads),
        "--folder",
        str(folder),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["out"] = out
    return result


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(bool)
    b = b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _medprep_mask_on_reference_grid(run: dict, ref: dict, truth: dict) -> np.ndarray:
    """medprep's mask sampled (nearest) at the centres of the reference's zoomed voxels."""
    from medprep.ct.nifti import read_nifti

    mask, _ = read_nifti(run["out"] / "lung_mask.nii.gz")
    meta = json.loads((run["out"] / "metadata.json").read_text())
    spacing_out = meta["geometry"]["spacing_out"]
    shape_in = ref["shape_in"]
    spacing_in = (truth["spacing"][0], truth["spacing"][1], truth["spacing"][2])
    maps = []
    for axis in range(3):
        n_ref = ref["shape_out"][axis]
        # zoom maps output index o to input index o * (n_in - 1) / (n_out - 1)
        mm = np.arange(n_ref) * (shape_in[axis] - 1) / max(1, n_ref - 1) * spacing_in[axis]
        maps.append(np.clip(np.rint(mm / spacing_out[axis]).astype(int), 0, mask.shape[axis] - 1))
    return mask[np.ix_(*maps)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per variant; the fastest counts"
    )
    parser.add_argument("--child")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)

    from medprep.ct import memory
    from medprep.ct.phantom import write_chest_phantom

    folder = OUT / f"phantom-{args.rows}x{args.cols}x{args.slices}"
    truth_file = folder.with_suffix(".json")
    if not truth_file.exists():
        started = time.perf_counter()
        truth = write_chest_phantom(
            folder,
            rows=args.rows,
            cols=args.cols,
            slices=args.slices,
            pixel_mm=0.7,
            slice_mm=1.25,
            seed=0,
            bronchi=True,
        )
        truth = {
            k: v
            for k, v in truth.items()
            if k in ("lung_volume_ml", "airway_volume_ml", "spacing", "shape")
        }
        truth_file.write_text(json.dumps(truth))
        print(f"phantom written in {time.perf_counter() - started:.1f} s: {folder}")
    truth = json.loads(truth_file.read_text())
    total_bytes = sum(p.stat().st_size for p in folder.iterdir())
    input_int16_mb = args.rows * args.cols * args.slices * 2 / 2**20

    variants = [
        ("reference-cubic", 1),
        ("reference-linear", 1),
        ("medprep", 1),
        ("medprep", 2),
        ("reference-cubic", 2),
        ("reference-linear", 2),
    ]
    runs: dict[tuple[str, int], dict] = {}
    for variant, threads in variants:
        best = None
        for _ in range(args.repeats):
            result = _run_child(variant, folder, threads)
            if best is None or result["seconds"] < best["seconds"]:
                best = result
        runs[(variant, threads)] = best
        print(
            f"  {variant:17s} {threads} thread(s): {best['seconds']:6.2f} s, peak RSS {best['peak_rss_mb']:7.0f} MB",
            flush=True,
        )

    ours1, ours2 = runs[("medprep", 1)], runs[("medprep", 2)]
    output_int16_mb = float(np.prod(ours1["shape_out"])) * 2 / 2**20
    print()
    print(
        f"scan: {args.rows} x {args.cols} x {args.slices} DICOM ({total_bytes / 2**20:.0f} MB), "
        f"int16 volume in {input_int16_mb:.0f} MB, out {output_int16_mb:.0f} MB (1 mm)"
    )
    print(
        f"phantom lung volume {truth['lung_volume_ml']:.0f} mL + airways {truth['airway_volume_ml']:.0f} mL"
    )
    print()
    print(
        "| variant | threads | seconds | medprep speed-up | peak RSS MB | x int16 in | x int16 out |"
    )
    print("|---|---|---|---|---|---|---|")
    for (variant, threads), r in runs.items():
        ours = runs[("medprep", threads)]
        ratio = r["seconds"] / ours["seconds"]
        print(
            f"| {variant} | {threads} | {r['seconds']:.2f} | {ratio:.1f}x | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / input_int16_mb:.1f} | {r['peak_rss_mb'] / output_int16_mb:.1f} |"
        )
    print()
    meta = json.loads((ours1["out"] / "metadata.json").read_text())
    print(
        f"medprep lung volume {meta['lung']['volume_ml']:.0f} mL "
        f"(phantom truth lungs + airways {truth['lung_volume_ml'] + truth['airway_volume_ml']:.0f} mL)"
    )
    for variant in ("reference-cubic", "reference-linear"):
        ref = runs[(variant, 1)]
        ref_mask = np.load(ref["out"] / "mask.npy")
        ours_on_ref = _medprep_mask_on_reference_grid(
            ours1, ref | {"shape_in": truth["shape"]}, truth
        )
        print(f"lung-mask Dice medprep vs {variant}: {_dice(ours_on_ref, ref_mask):.4f}")
    same = all(
        _sha(ours1["out"] / n) == _sha(ours2["out"] / n)
        for n in ("volume.nii.gz", "lung_mask.nii.gz", "metadata.json", "qc.png")
    )
    print(f"outputs byte-identical on 1 and 2 threads: {same}")
    for threads, r in ((1, ours1), (2, ours2)):
        estimate = memory.preprocess_ct_mb(total_bytes, threads=threads)
        print(
            f"memory estimate preprocess_ct_mb({total_bytes} bytes, threads={threads}) = "
            f"{estimate:.0f} MB vs measured peak {r['peak_rss_mb']:.0f} MB"
        )
    real_voxel = truth["spacing"][0] * truth["spacing"][1] * truth["spacing"][2]
    estimate = memory.preprocess_ct_mb(
        total_bytes, input_voxel_mm3=real_voxel, input_slice_mm=truth["spacing"][0]
    )
    print(f"  with the real input voxel ({real_voxel:.3f} mm3): {estimate:.0f} MB")
    tiled = _run_child("medprep-tile", ours1["out"], 1)
    manifest = json.loads((ours1["out"] / "preprocess.json").read_text())
    estimate = memory.tile_ct_mb(manifest, threads=1)
    print(
        f"tile_ct: {tiled['seconds']:.2f} s, {tiled['patches']} of {tiled['candidates']} patches, "
        f"peak RSS {tiled['peak_rss_mb']:.0f} MB; estimate tile_ct_mb(shape "
        f"{manifest['summary']['shape_out']}) = {estimate:.0f} MB"
    )
    print(f"RSS after imports: {ours1['rss_after_imports_mb']:.0f} MB (medprep child)")


if __name__ == "__main__":
    main()
