"""Time and peak memory of building the dataset index from synthetic per-sample tables.

Cohorts of 1,000 and 10,000 samples (half slides with --tiles tiles each, half CT scans
with --patches patches each), each build in its own process so its peak RSS is its own.
Memory should not grow with the cohort (the index is streamed in row groups); time
should grow with the rows. Writing the synthetic tables is not timed.

    .venv/bin/python benchmarks/bench_dataset.py
    .venv/bin/python benchmarks/bench_dataset.py --samples 1000 10000 --tiles 200

Scratch data goes to benchmarks/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))


def cohort_rows(n: int) -> list[tuple[str, str, str, str]]:
    # about 2 samples per patient, binary labels
    return [
        (f"S{i:05d}", "wsi" if i % 2 else "ct", f"patient-{i // 2}", str((i // 2) % 2))
        for i in range(n)
    ]


def build_once(folder: str, n: int, tiles: int, patches: int) -> None:
    """Child process: build the index of the first ``n`` samples and print a JSON line."""
    from dataset_support import write_cohort

    from medprep.data import index as dataset

    entries = write_cohort(Path(folder) / "results", cohort_rows(n), tiles=tiles, patches=patches)
    started, cpu = time.perf_counter(), time.process_time()
    manifest = dataset.build(entries, Path(folder) / f"index-{n}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"samples": n, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_mb}
    print(json.dumps({**result, **manifest["counts"]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--patches", type=int, default=50)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = HERE / "out" / "dataset"
    if args.child:
        build_once(str(folder), args.samples[0], args.tiles, args.patches)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, load {load}"
    )
    results = []
    for n in args.samples:
        # first pass writes the synthetic tables (cached on disk), second pass is measured
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--samples", str(n),
                 "--tiles", str(args.tiles), "--patches", str(args.patches)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"samples={n:6d} tiles={result['tiles']:9d} patches={result['patches']:8d} "
            f"seconds={result['seconds']:7.2f} cpu-s={result['cpu_seconds']:7.2f} "
            f"samples/s={n / result['seconds']:8.0f} peak-rss-MB={result['peak_rss_mb']:7.1f}"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"{b['samples'] // a['samples']}x the samples: "
            f"{b['seconds'] / a['seconds']:.1f}x the time, "
            f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x the peak memory"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
