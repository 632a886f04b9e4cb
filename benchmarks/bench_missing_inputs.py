"""A sample sheet of thousands of rows whose files are missing, and two good samples.

Runs the workflow as a user would (``snakemake --cores 2 --keep-going``, then a dry-run
of the same sheet) with this checkout's code and, with ``--before REF``, with the code of
git revision REF (exported with ``git archive`` to a temporary folder), one after the
other on the same machine, and prints them side by side: wall and CPU seconds of the
dry-run (planning) and of the run, jobs started and failed, lines and bytes printed, the
exit status, and what the cohort table says. A run still going after ``--budget``
seconds is stopped; its rate of failed samples gives the time all of them would take.

    .venv/bin/python benchmarks/bench_missing_inputs.py --samples 5000 --before d36dc0e

The good samples are the tiny demo scan and slide (built once into --workdir).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

CONFIG = """samples: samples.tsv
destination: published
demo_dir: null
ct:
  spacing: [3.0, 3.0, 3.0]
  patches: {size_mm: 48, stride_mm: 48}
wsi:
  resolution: {mpp: 2.0}
  tissue: {mask_mpp: 16.0}
  tile: {size: 128, shard_max_tiles: 50}
"""
GOOD = [
    ("phantom-chest-01", "ct", "data/ct/phantom-chest-01"),
    ("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff"),
]


def write_workdir(folder: Path, data: Path, missing: int) -> Path:
    """A fresh working directory: the sheet (missing rows, then the good samples)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.symlink(data, folder / "data")
    rows = [
        (f"lost-{n:05d}", "ct", f"data/lost/ct-{n:05d}")
        if n % 2
        else (f"lost-{n:05d}", "wsi", f"data/lost/slide-{n:05d}.svs")
        for n in range(missing)
    ]
    lines = ["sample\tmodality\turi", *("\t".join(row) for row in [*rows, *GOOD])]
    (folder / "samples.tsv").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text(CONFIG)
    return folder


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(
    workdir: Path, snakefile: Path, *args: str, budget: float | None = None
) -> tuple[float, float, str, int | None]:
    """Wall and CPU seconds, output and exit status (None: stopped after ``budget`` s)."""
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    cpu, start = children_cpu(), time.perf_counter()
    output = workdir.parent / "snakemake-output.txt"
    with open(output, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
        try:
            status = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # Snakemake and its jobs
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = None
    wall = time.perf_counter() - start
    return wall, children_cpu() - cpu, output.read_text(), status


def measure(label: str, snakefile: Path, workdir: Path, budget: float) -> dict:
    plan_s, plan_cpu, plan_out, _ = snakemake(workdir, snakefile, "--dry-run")
    run_s, run_cpu, out, status = snakemake(workdir, snakefile, "--keep-going", budget=budget)
    (workdir.parent / f"{label}.log").write_text(out)
    cohort = next(workdir.glob("results/cohort/*/cohort.csv"), None)
    statuses: dict[str, int] = {}
    if cohort is not None:
        with open(cohort, newline="") as f:
            for row in csv.DictReader(f):
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    planned = re.search(r"^total\s+(\d+)$", plan_out, re.M)
    return {
        "label": label,
        "plan_s": plan_s,
        "plan_cpu": plan_cpu,
        "planned": int(planned.group(1)) if planned else 0,
        "run_s": run_s,
        "run_cpu": run_cpu,
        "started": len(re.findall(r"^(?:local)?rule \w+:$", out, re.M)),
        "failed": len(re.findall(r"^Error in rule ", out, re.M)),
        "lines": out.count("\n"),
        "bytes": len(out.encode()),
        "status": "stopped" if status is None else str(status),
        "cohort": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "-",
        # samples with a failure record by the end (or when the run was stopped)
        "failed_samples": len(list((workdir / "logs" / "failures").glob("*.json"))),
    }


def export(ref: str, into: Path) -> Path:
    """The checkout of revision ``ref`` (its Snakefile), from this repository."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True, check=True
    )
    shutil.rmtree(into, ignore_errors=True)  # left by an interrupted benchmark
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "Snakefile"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000, help="rows whose files are missing")
    parser.add_argument("--before", help="a git revision to measure first (e.g. d36dc0e)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medprep-bench-missing"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=1200.0,
        help="seconds a run may take; a run still going then is stopped, and its rate of "
        "failed samples gives the projected time for all of them",
    )
    args = parser.parse_args()
    data = args.workdir / "data"
    if not (data / "samples.tsv").exists():
        from medprep import demo

        demo.build(data, phantom_shape=(96, 96, 40), phantom_spacing_mm=(4.0, 5.0), slide_size=1536)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, "
        f"load {load}"
    )
    print(f"# {args.samples} rows whose files do not exist + {len(GOOD)} good samples")
    code = []
    if args.before:
        code.append((f"before ({args.before})", export(args.before, args.workdir / "before")))
    code.append(("after (this checkout)", REPO / "Snakefile"))
    rows = []
    for label, snakefile in code:
        workdir = write_workdir(args.workdir / "work", data, args.samples)
        rows.append(measure(label.split()[0], snakefile, workdir, args.budget))
        rows[-1]["label"] = label
        if args.before and snakefile != REPO / "Snakefile":
            shutil.rmtree(snakefile.parent)
    columns = [
        ("plan wall s", "plan_s", ".1f"),
        ("plan cpu s", "plan_cpu", ".1f"),
        ("jobs planned", "planned", "d"),
        ("run wall s", "run_s", ".1f"),
        ("run cpu s", "run_cpu", ".1f"),
        ("jobs started", "started", "d"),
        ("jobs failed", "failed", "d"),
        ("lines printed", "lines", "d"),
        ("bytes printed", "bytes", ",d"),
        ("samples failed", "failed_samples", "d"),
        ("exit status", "status", "s"),
    ]
    width = max(len(r["label"]) for r in rows) + 2
    print(f"{'':<16}" + "".join(f"{r['label']:>{width}}" for r in rows))
    for title, key, spec in columns:
        print(f"{title:<16}" + "".join(f"{format(r[key], spec):>{width}}" for r in rows))
    print(f"{'cohort table':<16}" + "".join(f"{r['cohort']:>{width}}" for r in rows))
    for row in rows:
        if row["status"] == "stopped" and row["failed_samples"]:
            rate = row["failed_samples"] / row["run_s"]
            projected = args.samples / rate
            row["run_s"] = projected  # for the ratio below
            print(
                f"{row['label']}: stopped after the budget of {args.budget:.0f} s with "
                f"{row['failed_samples']} of {args.samples} missing samples failed "
                f"({rate:.2f}/s): all of them would take about {projected:.0f} s"
            )
    if len(rows) == 2:
        before, after = rows
        print(
            f"after/before: plan {after['plan_s'] / before['plan_s']:.2f}x, run "
            f"{after['run_s'] / before['run_s']:.4f}x (projected for a stopped run), "
            f"output {after['bytes'] / before['bytes']:.4f}x (of what it printed by then)"
        )


if __name__ == "__main__":
    main()
