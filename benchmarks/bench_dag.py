"""How long Snakemake takes to plan a run of thousands of samples (dry-run DAG construction).

Builds a sample sheet of N samples, half CT (a folder of 3 small files each) and half
slides (one small file each), all local, and times ``snakemake --dry-run`` on it: reading
and validating the sheet, the input functions and source fingerprints of every sample,
and Snakemake's own DAG construction. The datasets are kept in --workdir and reused.

    .venv/bin/python benchmarks/bench_dag.py                      # 2,000 and 10,000 samples
    .venv/bin/python benchmarks/bench_dag.py --samples 2000 --cprofile /tmp/dag.prof

Targets on a 2-core machine: under 20 s for 2,000 samples, under 90 s for 10,000.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS_S = {2000: 20.0, 10000: 90.0}
CT_FILES_PER_SAMPLE = 3
SAMPLE_STEPS = ("download", "preprocess", "tile", "upload")  # one job each per sample


def sample_rows(count: int) -> list[tuple[str, str, str]]:
    """Alternating CT and slide samples with their local paths (relative to the workdir)."""
    rows = []
    for index in range(count):
        if index % 2 == 0:
            name = f"ct-{index:06d}"
            rows.append((name, "ct", f"data/ct/{name}"))
        else:
            name = f"slide-{index:06d}"
            rows.append((name, "wsi", f"data/wsi/{name}.svs"))
    return rows


def write_dataset(workdir: Path, count: int) -> Path:
    """Sample sheet, config and the small input files of ``count`` samples (reused if present)."""
    sheet = workdir / "samples.tsv"
    rows = sample_rows(count)
    if sheet.exists() and len(sheet.read_text().splitlines()) == count + 1:
        return workdir
    for _, modality, uri in rows:
        path = workdir / uri
        if modality == "ct":
            path.mkdir(parents=True, exist_ok=True)
            for number in range(CT_FILES_PER_SAMPLE):
                (path / f"{number:04d}.dcm").write_bytes(b"DICM")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"II*\0")
    (workdir / "config.yaml").write_text(
        "samples: samples.tsv\ndestination: published\ndemo_dir: null\n"
    )
    sheet.write_text("sample\tmodality\turi\n" + "".join("\t".join(r) + "\n" for r in rows))
    return workdir


def dry_run_command(workdir: Path, snakefile: Path, cprofile: Path | None) -> list[str]:
    snakemake = [str(BIN / "snakemake")]
    if cprofile is not None:
        snakemake = [sys.executable, "-m", "cProfile", "-o", str(cprofile), *snakemake]
    return [
        *snakemake,
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        "--dry-run",
        "--quiet",
        "rules",
    ]


def job_stats(log: str) -> dict[str, int]:
    """The "Job stats" table of a dry-run: jobs planned per rule (and the total)."""
    if "Job stats:" not in log:
        raise RuntimeError(f"no job stats in the dry-run output:\n{log[-3000:]}")
    rows = log[log.index("Job stats:") :].splitlines()[3:]
    stats = {}
    for row in rows:
        parts = row.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        stats[parts[0]] = int(parts[1])
    return stats


def sample_jobs(stats: dict[str, int]) -> int:
    """Jobs of the per-sample chains (without the run-wide rules: all, cohort)."""
    return sum(n for rule, n in stats.items() if rule.split("_")[0] in SAMPLE_STEPS)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_dry_run(workdir: Path, snakefile: Path, cprofile: Path | None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and planned jobs of one dry-run.

    CPU time is reported next to wall time because on a shared machine the wall time
    also counts waiting for a core.
    """
    command = dry_run_command(workdir, snakefile, cprofile)
    cpu_before = children_cpu_seconds()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - start
    cpu_seconds = children_cpu_seconds() - cpu_before
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"dry-run failed ({result.returncode}):\n{output[-3000:]}")
    return seconds, cpu_seconds, sample_jobs(job_stats(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "medprep-bench-dag",
        help="where the generated datasets live (reused between runs)",
    )
    parser.add_argument("--snakefile", type=Path, default=REPO / "Snakefile")
    parser.add_argument("--repeat", type=int, default=1, help="dry-runs per size (best is kept)")
    parser.add_argument(
        "--cprofile", type=Path, help="write a cProfile of the (first) dry-run to this file"
    )
    args = parser.parse_args()

    print(f"{'samples':>8} {'jobs':>7} {'wall s':>8} {'cpu s':>7} {'target s':>9}")
    # jobs: the per-sample jobs planned (4 per sample), without all/cohort
    for count in args.samples:
        workdir = write_dataset(args.workdir / str(count), count)
        runs = []
        for attempt in range(args.repeat):
            profile_to = args.cprofile if attempt == 0 else None
            runs.append(time_dry_run(workdir, args.snakefile, profile_to))
        wall, cpu, jobs = min(runs)
        expected = count * len(SAMPLE_STEPS)
        if jobs != expected:
            raise RuntimeError(f"{count} samples: planned {jobs} jobs, expected {expected}")
        target = TARGETS_S.get(count)
        print(
            f"{count:>8} {jobs:>7} {wall:>8.1f} {cpu:>7.1f} "
            f"{'' if target is None else f'{target:.0f}':>9}",
            flush=True,
        )
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of the largest dry-run: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
