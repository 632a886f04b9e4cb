"""Lung CT preprocessing: the reference baseline against medprep, side by side.

    .venv/bin/python benchmarks/bench_ct.py [--rows 512 --cols 512 --slices 300] [--repeats 1]
    .venv/bin/python benchmarks/bench_ct.py --scan lidc --slices 133   # the real LIDC-IDRI-0001
    .venv/bin/python benchmarks/bench_ct.py --scan lidc --slices 265   # the same at 1.25 mm

Scans: a synthetic chest CT (``--scan phantom``, default: 0.7 mm pixels, 1.25 mm slices,
real DICOM; both lungs joined to the trachea by the main bronchi, as in a real chest at
1 mm, so that the reference's "largest component" holds both lungs) written under
benchmarks/out/, or the real LIDC-IDRI-0001 (``--scan lidc``: its 133 slices from
../shared/data, or 265 slices at 1.25 mm made from them). Each variant runs in its own
process, end to end (DICOM folder in, outputs written): the reference with cubic and with
linear zoom (on the first thread count), and medprep's preprocess_ct + tile_ct (through
``medprep.ct.steps``) on each thread count. Prints seconds, speed-up ratios, lung volumes
and lung-mask Dice against the reference, peak RSS against the int16 volume size, the
memory estimate of ``medprep.ct.memory`` against the measured peak, whether the outputs
are byte-identical across thread counts, and the deflate comparison (zlib level 1 against
ISA-L). Not a test: timings depend on the machine; outputs are in benchmarks/results/
(``ct.txt`` the phantom, ``ct-lidc.txt`` the real scan).
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
    # Both sides import their libraries before the clock starts (the reference always
    # did), timed apart: the engine is measured, and the imports are printed beside it.
    started = time.perf_counter()
    if args.variant.startswith("reference"):
        import ct_reference

        ct_reference.measure.label  # noqa: B018 - skimage loads its submodules lazily
        import_seconds = time.perf_counter() - started
        before = set(sys.modules)
        rss_before = _rss_mb()
        started = time.perf_counter()
        info = ct_reference.run(args.folder, out, order=3 if args.variant.endswith("cubic") else 1)
        seconds = time.perf_counter() - started
    else:  # medprep: preprocess then tile, as the workflow runs them
        # what preprocess imports before its memory peak anyway (the peak is not moved);
        # nibabel (NIfTI header), PIL (QC picture) and pyarrow (tile table) stay on the
        # clock, listed as imported while timed
        import isal.isal_zlib
        import pydicom
        import scipy.sparse

        import medprep.ct.preprocess
        import medprep.ct.tile  # noqa: F401
        from medprep.ct import steps

        del isal, pydicom, scipy  # imported for the clock only
        import_seconds = time.perf_counter() - started
        before = set(sys.modules)
        rss_before = _rss_mb()
        started = time.perf_counter()
        files = sorted(str(p) for p in Path(args.folder).iterdir() if p.suffix == ".dcm")
        pre = steps.run_preprocess(
            files,
            volume_path=out / "volume.nii.gz",
            mask_path=out / "lung_mask.nii.gz",
            metadata_path=out / "metadata.json",
            qc_path=out / "qc.png",
            manifest_path=out / "preprocess.json",
            sample="bench",
            threads=args.threads,
        )
        preprocess_seconds = time.perf_counter() - started
        tiled = steps.run_tile(
            pre,
            patches_path=out / "patches.npy",
            table_path=out / "patches.parquet",
            summary_path=out / "summary.json",
            manifest_path=out / "tile.json",
            threads=args.threads,
        )
        seconds = time.perf_counter() - started
        info = {
            "shape_out": pre["summary"]["shape_out"],
            "status": pre["summary"]["status"],
            "preprocess_seconds": preprocess_seconds,
            "tile_seconds": seconds - preprocess_seconds,
            "patches": tiled["summary"]["patches"],
            "candidates": tiled["summary"]["candidates"],
        }
    tops = {m.split(".")[0] for m in before}
    late = sorted({m.split(".")[0] for m in set(sys.modules) - before} - tops)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "import_seconds": import_seconds,
                "imported_while_timed": late,
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


LIDC = HERE.parent / ".." / "shared" / "data" / "ct" / "lidc-idri-0001"


def lidc_scan(slices: int) -> tuple[Path, dict]:
    """LIDC-IDRI-0001 (133 real slices, 2.5 mm) from ../shared/data; with ``slices`` > 133,
    a thinner-sliced version written once under benchmarks/out/: a slice halfway between
    every two real ones (their mean), 265 slices at 1.25 mm, as thin-slice chest CTs are."""
    import pydicom
    from pydicom.uid import generate_uid

    if not LIDC.is_dir():
        raise SystemExit(
            f"the real scan is not there: {LIDC} (../shared/data beside the repository)"
        )
    real = sorted(
        LIDC.glob("*.dcm"),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    first = pydicom.dcmread(real[0], stop_before_pixels=True)
    step = abs(
        float(pydicom.dcmread(real[1], stop_before_pixels=True).ImagePositionPatient[2])
        - float(first.ImagePositionPatient[2])
    )
    if slices <= len(real):  # the DICOM files alone (the reference reads every file)
        folder = OUT / f"lidc-0001-{len(real)}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in real:
            if not (folder / path.name).exists():
                (folder / path.name).symlink_to(path.resolve())
        spacing = [step, *map(float, first.PixelSpacing)]
        return folder, {"spacing": spacing, "shape": [len(real), first.Rows, first.Columns]}
    folder = OUT / f"lidc-0001-{2 * len(real) - 1}"
    spacing = [step / 2, *map(float, first.PixelSpacing)]
    info = {"spacing": spacing, "shape": [2 * len(real) - 1, first.Rows, first.Columns]}
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == info["shape"][0]:
        return folder, info
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(p) for p in real]
    number = 0
    for k, ds in enumerate(datasets):
        number += 1
        ds.InstanceNumber = number
        ds.save_as(folder / f"{number:04d}.dcm")
        if k + 1 < len(datasets):
            nxt = datasets[k + 1]
            mid = pydicom.dcmread(real[k])
            a = ds.pixel_array.astype(np.int32)
            b = nxt.pixel_array.astype(np.int32)
            mid.PixelData = ((a + b) // 2).astype(ds.pixel_array.dtype).tobytes()
            z = (float(ds.ImagePositionPatient[2]) + float(nxt.ImagePositionPatient[2])) / 2
            mid.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z]
            mid.SliceLocation = z
            mid.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "mid"])
            mid.file_meta.MediaStorageSOPInstanceUID = mid.SOPInstanceUID
            number += 1
            mid.InstanceNumber = number
            mid.save_as(folder / f"{number:04d}.dcm")
    return folder, info


def _phantom(args) -> tuple[Path, dict]:
    from medprep.demo.ct_phantom import write_chest_phantom

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
    return folder, json.loads(truth_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", choices=("phantom", "lidc"), default="phantom")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300, help="lidc: 133 (real) or 265")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds (each runs every variant once, in turn); the fastest run counts",
    )
    parser.add_argument("--threads-list", default="1,2", help="thread counts to run")
    parser.add_argument(
        "--reference-all-threads",
        action="store_true",
        help="also run the reference at every thread count (else at the first only)",
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

    if args.scan == "lidc":
        folder, truth = lidc_scan(args.slices)
    else:
        folder, truth = _phantom(args)
    shape = truth["shape"]
    dicoms = [p for p in folder.iterdir() if p.suffix == ".dcm"]
    total_bytes = sum(p.stat().st_size for p in dicoms)
    input_int16_mb = float(np.prod(shape)) * 2 / 2**20
    thread_counts = [int(t) for t in args.threads_list.split(",")]
    variants = [(v, t) for t in thread_counts for v in ("reference-cubic", "reference-linear")]
    if not args.reference_all_threads:  # the reference on the first thread count only
        variants = [(v, t) for v, t in variants if t == thread_counts[0]]
    variants += [("medprep", t) for t in thread_counts]
    runs: dict[tuple[str, int], dict] = {}
    # rounds: every variant once per round, in turn, so that a change of the machine's
    # load falls on all of them; the fastest run of each variant counts
    for round_ in range(args.repeats):
        for variant, threads in variants:
            best = runs.get((variant, threads))
            result = _run_child(variant, folder, threads)
            if best is None or result["seconds"] < best["seconds"]:
                runs[(variant, threads)] = best = result
            print(
                f"  {variant:17s} {threads} thread(s): {result['seconds']:6.2f} s (+ imports "
                f"{result['import_seconds']:.2f} s), peak RSS {result['peak_rss_mb']:7.0f} MB, load "
                f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (round {round_ + 1})",
                flush=True,
            )

    first = thread_counts[0]
    ours1 = runs[("medprep", first)]
    output_int16_mb = float(np.prod(ours1["shape_out"])) * 2 / 2**20
    print()
    print(
        f"scan ({args.scan}): {shape[2]} x {shape[1]} x {shape[0]} DICOM "
        f"({total_bytes / 2**20:.0f} MB), spacing {truth['spacing']} mm, int16 volume in "
        f"{input_int16_mb:.0f} MB, out {output_int16_mb:.0f} MB (1 mm)"
    )
    if "lung_volume_ml" in truth:
        print(
            f"phantom lung volume {truth['lung_volume_ml']:.0f} mL + airways "
            f"{truth['airway_volume_ml']:.0f} mL"
        )
    print()
    print(
        "| variant | threads | seconds | medprep speed-up | peak RSS MB | x int16 in | x int16 out |"
    )
    print("|---|---|---|---|---|---|---|")
    for (variant, threads), r in runs.items():
        ours = runs[("medprep", threads)]  # medprep on as many threads
        ratio = r["seconds"] / ours["seconds"]
        print(
            f"| {variant} | {threads} | {r['seconds']:.2f} | {ratio:.1f}x | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / input_int16_mb:.1f} | {r['peak_rss_mb'] / output_int16_mb:.1f} |"
        )
    print()
    for threads in thread_counts:
        ours = runs[("medprep", threads)]
        ref_threads = threads if ("reference-cubic", threads) in runs else thread_counts[0]
        print(
            f"medprep {threads} thread(s): preprocess {ours['preprocess_seconds']:.2f} s + tile "
            f"{ours['tile_seconds']:.2f} s ({ours['patches']} of {ours['candidates']} patches); "
            f"{runs[('reference-cubic', ref_threads)]['seconds'] / ours['seconds']:.1f}x the "
            f"cubic reference, {runs[('reference-linear', ref_threads)]['seconds'] / ours['seconds']:.1f}x "
            f"the linear one ({ref_threads} thread(s) reference); peak RSS {ours['peak_rss_mb'] / input_int16_mb:.2f}x the int16 input"
        )
        with_imports = {
            v: runs[(v, ref_threads)]["seconds"] + runs[(v, ref_threads)]["import_seconds"]
            for v in ("reference-cubic", "reference-linear")
        }
        ours_with = ours["seconds"] + ours["import_seconds"]
        print(
            f"  imports counted on both sides: medprep {ours_with:.2f} s "
            f"({ours['import_seconds']:.2f} s of imports), reference cubic "
            f"{with_imports['reference-cubic']:.2f} s, linear {with_imports['reference-linear']:.2f} s "
            f"({runs[('reference-cubic', ref_threads)]['import_seconds']:.2f} s of imports): "
            f"{with_imports['reference-cubic'] / ours_with:.1f}x / "
            f"{with_imports['reference-linear'] / ours_with:.1f}x"
        )
    for (variant, threads), r in runs.items():
        if r["imported_while_timed"]:
            print(
                f"  {variant} {threads} thread(s) imported while timed: {r['imported_while_timed']}"
            )
    meta = json.loads((ours1["out"] / "metadata.json").read_text())
    lung = meta["lung"]
    print(
        f"medprep lung volume {lung['volume_ml']:.0f} mL (left {lung['left_volume_ml']}, right "
        f"{lung['right_volume_ml']}; pockets filled {lung['construction'].get('pockets_filled')}, "
        f"{lung['construction'].get('added_ml')} mL added)"
    )
    for variant in ("reference-cubic", "reference-linear"):
        ref = runs[(variant, first)]
        ref_mask = np.load(ref["out"] / "mask.npy")
        ref_ml = float(np.count_nonzero(ref_mask)) * float(np.prod(ref["spacing_out"])) / 1000
        ours_on_ref = _medprep_mask_on_reference_grid(ours1, ref | {"shape_in": shape}, truth)
        print(
            f"{variant}: lung volume {ref_ml:.0f} mL (medprep {100 * (lung['volume_ml'] / ref_ml - 1):+.2f}%), "
            f"lung-mask Dice medprep vs reference {_dice(ours_on_ref, ref_mask):.4f}"
        )
    if len(thread_counts) > 1:
        other = runs[("medprep", thread_counts[1])]
        names = [
            n
            for n in (
                "volume.nii.gz",
                "lung_mask.nii.gz",
                "metadata.json",
                "qc.png",
                "patches.npy",  # only with ct.patches.materialise
                "patches.parquet",
            )
            if (ours1["out"] / n).exists() or (other["out"] / n).exists()
        ]
        same = all(
            (ours1["out"] / n).exists()
            and (other["out"] / n).exists()
            and _sha(ours1["out"] / n) == _sha(other["out"] / n)
            for n in names
        )
        print(
            f"outputs byte-identical on {thread_counts[0]} and {thread_counts[1]} threads: {same} "
            f"({', '.join(names)})"
        )
    for threads in thread_counts:
        r = runs[("medprep", threads)]
        estimate = memory.preprocess_ct_mb(total_bytes, threads=threads)
        print(
            f"memory estimate preprocess_ct_mb({total_bytes} bytes, threads={threads}) = "
            f"{estimate:.0f} MB vs measured peak (preprocess + tile) {r['peak_rss_mb']:.0f} MB"
        )
    print(f"RSS after imports: {ours1['rss_after_imports_mb']:.0f} MB (medprep child)")
    _compare_deflate(ours1["out"] / "volume.nii.gz")


def _compare_deflate(volume_path: Path) -> None:
    """The HU volume's deflate, 1 thread: zlib level 1 (before) against ISA-L level 2."""
    import zlib

    from medprep.ct import nifti

    volume, _ = nifti.read_nifti(volume_path)
    data = volume.reshape(-1).view(np.uint8)
    started = time.perf_counter()
    size_zlib = len(zlib.compress(data, 1))
    seconds_zlib = time.perf_counter() - started
    started = time.perf_counter()
    nifti.gzip_bytes_to(OUT / "deflate-check.gz", [data], threads=1)
    seconds_isal = time.perf_counter() - started
    size_isal = (OUT / "deflate-check.gz").stat().st_size
    print(
        f"deflate of the HU volume ({data.nbytes / 2**20:.0f} MB): zlib level 1 "
        f"{seconds_zlib:.2f} s, {size_zlib / 2**20:.1f} MB; ISA-L level {nifti.COMPRESS_LEVEL} "
        f"(medprep) {seconds_isal:.2f} s, {size_isal / 2**20:.1f} MB: "
        f"{seconds_zlib / seconds_isal:.1f}x faster, {100 * (size_isal / size_zlib - 1):+.1f}% size"
    )


if __name__ == "__main__":
    main()
