"""A CT cohort from S3 to S3 through a latency proxy: this workflow against the seed's pool.

Both sides read the same series from a moto_server through a proxy adding 20 ms to every
request, run this project's CT preprocess and tile code, and publish to the same bucket:
only the scheduling differs.

- workflow: ``snakemake --cores N`` (profiles/default: transfers=2; download and upload
  one core each with storage.connections requests in flight; working files removed
  after each sample's upload).
- seed-style: a process pool of 1.5 x N workers, each doing download -> preprocess ->
  tile -> upload for one sample at a time (one thread per step), then removing its files.

Reported: wall time, CPU time of the jobs (Snakemake benchmark records; pool: the
workers' rusage), CPU utilisation = job CPU / (wall x cores), peak local disk sampled
every 0.5 s, local disk left at the end, and the machine's load average (it is shared).

    .venv/bin/python benchmarks/bench_cohort.py --samples 12 --cores 2 \
        > benchmarks/results/cohort.txt
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from s3_support import (  # noqa: E402
    FaultProxy,
    MotoServer,
    fake_credentials,
    isolated_aws_environment,
    new_bucket_name,
    raw_client,
)
from workflow_support import (  # noqa: E402
    DiskSampler,
    deep_update,
    folder_bytes,
    snakemake_command,
    write_config,
    write_samples,
)

from medprep import storage  # noqa: E402
from medprep.common import settings as schema  # noqa: E402
from medprep.workflow import manifest  # noqa: E402

# the phantoms span a 358 mm field of view, as a chest CT does
FIELD_OF_VIEW_MM = 358.4


def ct_settings(args) -> dict:
    """The ct: settings of both sides, whole: the workflow's defaults unless --spacing
    says (the workflow's run gets all of them, so that none of the tests' fast settings
    written by ``write_config`` remains)."""
    chosen = {"spacing": [args.spacing] * 3} if args.spacing else {}
    return deep_update(schema.config_defaults("ct"), chosen)


SAMPLE_EVERY_S = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=224, help="phantom rows and columns")
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--slice-mm", type=float, default=3.0, help="phantom slice distance")
    parser.add_argument(
        "--spacing", type=float, default=None, help="output spacing in mm (default: config's)"
    )
    parser.add_argument("--snakemake-args", default="", help="extra arguments for the workflow run")
    parser.add_argument("--child-chain", help=argparse.SUPPRESS)  # a series folder
    return parser.parse_args(argv)


def child_chain(series: Path, args) -> None:
    """Run one sample's preprocess + tile three times in this fresh process and print the
    CPU seconds of each: the first pays what every workflow job pays (imports, first use
    of its memory), the others what a warm pool worker pays."""
    started = time.process_time()
    from medprep.ct import steps

    files = sorted(str(p) for p in series.iterdir())
    seconds = []
    for round_ in range(3):
        steps.run_chain(files, series.parent / f"out{round_}", ct_settings(args), sample="c")
        seconds.append(time.process_time() - started)
        started = time.process_time()
    print(json.dumps(seconds))


def write_phantom(series: Path, args, seed: int) -> None:
    """One sample's series, of the size the arguments ask for."""
    from medprep.demo.ct_phantom import write_chest_phantom

    write_chest_phantom(
        series,
        rows=args.rows,
        cols=args.rows,
        slices=args.slices,
        pixel_mm=FIELD_OF_VIEW_MM / args.rows,
        slice_mm=args.slice_mm,
        seed=seed,
    )


def cold_and_warm(folder: Path, args) -> list[float]:
    """CPU seconds of one sample's preprocess + tile: cold (a fresh process), then warm."""
    series = folder / "series"
    write_phantom(series, args, seed=0)
    command = [sys.executable, __file__, "--child-chain", str(series)]
    command += ["--spacing", str(args.spacing)] if args.spacing else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_cohort(s3, bucket: str, folder: Path, args) -> int:
    total = 0
    for index in range(args.samples):
        series = folder / f"c{index:02d}"
        write_phantom(series, args, seed=index)
        for path in sorted(series.iterdir()):
            body = path.read_bytes()
            total += len(body)
            s3.put_object(Bucket=bucket, Key=f"ct/{series.name}/{path.name}", Body=body)
        shutil.rmtree(series)
    return total


def samples_of(args) -> list[str]:
    return [f"c{index:02d}" for index in range(args.samples)]


# ---------------------------------------------------------------- this workflow


def run_workflow(workdir: Path, bucket: str, endpoint: str, env: dict, args) -> dict:
    workdir.mkdir()
    write_samples(workdir, [(s, "ct", f"s3://{bucket}/ct/{s}/") for s in samples_of(args)])
    write_config(
        workdir,
        destination=f"s3://{bucket}/published/workflow",
        storage={"endpoint_url": endpoint, "region": "us-east-1"},
        ct=ct_settings(args),
    )
    (workdir / "results").mkdir()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with DiskSampler(workdir / "results", SAMPLE_EVERY_S) as disk:
        process = subprocess.run(
            snakemake_command(workdir, *args.snakemake_args.split(), cores=args.cores),
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    if process.returncode != 0:
        raise SystemExit(f"the workflow failed:\n{process.stderr[-4000:]}")
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    job_cpu = 0.0
    per_rule: dict[str, list[float]] = {}
    for record in (workdir / "logs" / "benchmarks").rglob("*.tsv"):
        rule = record.relative_to(workdir / "logs" / "benchmarks").parts[0]
        with open(record) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        wall_cpu = per_rule.setdefault(rule, [0.0, 0.0, 0])
        wall_cpu[0] += sum(float(row["s"]) for row in rows)
        wall_cpu[1] += sum(float(row["cpu_time"]) for row in rows)
        wall_cpu[2] += 1
        if rule != "cohort":
            job_cpu += sum(float(row["cpu_time"]) for row in rows)
    working_sets = []
    for sample in samples_of(args):
        folder = workdir / "results" / "ct" / sample
        raw = manifest.read_step_manifest(folder / "download.json")["total_bytes"]
        published = json.loads((folder / "upload.json").read_text())["files"]
        working_sets.append(raw + sum(f["bytes"] for f in published))
    return {
        "wall": wall,
        "job_cpu": job_cpu,
        "all_cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_disk": disk.peak,
        "left_disk": folder_bytes(workdir / "results"),
        "largest_working_set": max(working_sets),
        "per_rule": per_rule,
    }


# ---------------------------------------------------------------- the seed's way


def _through_storage(sample, uri, scratch, destination, config, work, prefix) -> str:
    """Fetch one sample, ``work(files, folder, config)`` -> artifacts, publish them under
    ``prefix``, remove the sample's files: the transfers both pools share."""
    settings = config["storage"]
    folder = Path(scratch) / sample
    connections = settings["connections"]
    files = storage.fetch(uri, folder / "download", threads=connections, settings=settings)
    storage.publish(
        work(sample, files, folder, config),
        storage.join(destination, prefix, sample),
        manifest={"sample": sample, "modality": "ct"},
        threads=connections,
        settings=settings,
    )
    shutil.rmtree(folder)
    return sample


def _medprep_steps(sample, files, folder, config) -> list[dict]:
    from medprep.ct import steps

    pre, tiled = steps.run_chain([f.path for f in files], folder, config["ct"], sample=sample)
    return [*pre["artifacts"], *tiled["artifacts"]]


def _reference_steps(sample, files, folder, config) -> list[dict]:
    import ct_reference

    series = folder / "series"  # the seed reads every file of a folder: only the slices
    series.mkdir()
    for f in files:
        os.link(f.path, series / Path(f.path).name)
    slices = ct_reference.load_scan(series)
    image = ct_reference.pixels_hu(slices)
    resampled, _ = ct_reference.resample(image, slices, new_spacing=config["ct"]["spacing"])
    mask = ct_reference.segment_lung_mask(resampled, True)
    out = folder / "out"
    out.mkdir()
    np.save(out / "normalised.npy", ct_reference.normalise(resampled))
    np.save(out / "mask.npy", mask)
    return [{"path": str(p), "name": p.name} for p in sorted(out.iterdir())]


def seed_sample(sample: str, uri: str, scratch: str, destination: str, config: dict) -> str:
    """download -> preprocess -> tile -> upload of one sample in one process.

    The same code as the workflow's: transfers with storage.connections requests in flight,
    the CPU steps with one thread (a worker per sample is the seed's parallelism).
    """
    return _through_storage(sample, uri, scratch, destination, config, _medprep_steps, "ct")


def reference_sample(sample: str, uri: str, scratch: str, destination: str, config: dict) -> str:
    """The seed's own steps (benchmarks/ct_reference.py, cubic zoom) for one sample, with
    the same transfers: download, reference preprocessing to the same spacing, upload."""
    return _through_storage(
        sample, uri, scratch, destination, config, _reference_steps, "reference"
    )


def run_pool(
    scratch: Path, bucket: str, endpoint: str, env: dict, args, *, steps=None, workers=None
) -> dict:
    """The cohort through a process pool of ``workers`` (default 1.5 x cores), each running
    ``steps`` (default seed_sample: this project's steps) for one sample at a time."""
    steps = steps or seed_sample
    config = deep_update(
        {"ct": ct_settings(args), "storage": schema.config_defaults("storage")},
        {"storage": {"endpoint_url": endpoint, "region": "us-east-1"}},
    )
    scratch.mkdir()
    saved = dict(os.environ)
    os.environ.update(env)
    workers = workers or max(1, round(1.5 * args.cores))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        with (
            DiskSampler(scratch, SAMPLE_EVERY_S) as disk,
            ProcessPoolExecutor(max_workers=workers) as pool,
        ):
            futures = [
                pool.submit(
                    steps,
                    sample,
                    f"s3://{bucket}/ct/{sample}/",
                    str(scratch),
                    f"s3://{bucket}/published/seed",
                    config,
                )
                for sample in samples_of(args)
            ]
            for future in futures:
                future.result()
        wall = time.monotonic() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall": wall,
        "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_disk": disk.peak,
        "left_disk": folder_bytes(scratch),
        "workers": workers,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_chain:
        child_chain(Path(args.child_chain), args)
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        tmp = Path(tmp)
        (tmp / "aws").mkdir()
        env = {**os.environ, **isolated_aws_environment(tmp / "aws", fake_credentials())}
        env.pop("AWS_ENDPOINT_URL", None)
        with MotoServer(tmp / "moto.log") as server:
            proxy = FaultProxy(server.url, latency_ms=args.latency_ms)
            try:
                s3 = raw_client(server.url, env)
                bucket = new_bucket_name()
                s3.create_bucket(Bucket=bucket)
                input_bytes = make_cohort(s3, bucket, tmp / "series", args)
                # the pools' workers end with their pools, so children's rusage before and
                # after each run is that run's CPU time
                seed = run_pool(tmp / "seed", bucket, proxy.url, env, args)
                flow = run_workflow(tmp / "workflow", bucket, proxy.url, env, args)
                flow["cold_warm"] = cold_and_warm(tmp / "cold-warm", args)
                reference = run_pool(
                    tmp / "reference",
                    bucket,
                    proxy.url,
                    env,
                    args,
                    steps=reference_sample,
                    workers=args.cores,
                )
            finally:
                proxy.stop()
    load_after = os.getloadavg()
    report(args, input_bytes, flow, seed, reference, load_before, load_after)
    return 0


def report(args, input_bytes, flow, seed, reference, load_before, load_after) -> None:
    mb = 1e6
    cores = args.cores
    flow_util = flow["job_cpu"] / (flow["wall"] * cores)
    seed_util = seed["cpu"] / (seed["wall"] * cores)
    disk_target = (cores + 2) * flow["largest_working_set"]
    print(f"medprep cohort benchmark: {args.samples} CT samples, S3 -> S3 through a proxy adding")
    print(f"{args.latency_ms:.0f} ms per request, --cores {cores}")
    print(
        f"input {input_bytes / mb:.1f} MB ({input_bytes / args.samples / mb:.1f} MB per sample,"
        f" {args.rows}x{args.rows}x{args.slices} int16 DICOM, output spacing "
        f"{ct_settings(args)['spacing'][0]} mm); largest sample working set"
        f" {flow['largest_working_set'] / mb:.1f} MB (raw + published artifacts)"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, shared; load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.1f}' for v in load_before)}, after "
        f"{', '.join(f'{v:.1f}' for v in load_after)}"
    )
    print()
    ref_util = reference["cpu"] / (reference["wall"] * cores)
    print(f"{'':38}{'workflow':>10}{'seed pool':>11}{'ratio':>7}{'reference':>11}{'ratio':>7}")
    rows = [
        ("wall time (s)", flow["wall"], seed["wall"], reference["wall"]),
        ("CPU time of the jobs (s)", flow["job_cpu"], seed["cpu"], reference["cpu"]),
        ("CPU utilisation (job CPU/wall/cores)", flow_util, seed_util, ref_util),
        (
            "peak local disk (MB)",
            flow["peak_disk"] / mb,
            seed["peak_disk"] / mb,
            reference["peak_disk"] / mb,
        ),
        (
            "local disk left at end (MB)",
            flow["left_disk"] / mb,
            seed["left_disk"] / mb,
            reference["left_disk"] / mb,
        ),
    ]
    for name, ours, theirs, ref in rows:
        ratio = ours / theirs if theirs else float("nan")
        ref_ratio = ours / ref if ref else float("nan")
        print(f"{name:38}{ours:10.2f}{theirs:11.2f}{ratio:7.2f}{ref:11.2f}{ref_ratio:7.2f}")
    jobs = sum(count for _, _, count in flow["per_rule"].values())
    overhead = (flow["all_cpu"] - seed["cpu"]) / jobs
    print(
        f"(seed pool: {seed['workers']} workers running this project's steps; reference: "
        f"{reference['workers']} workers running the seed's own steps, cubic zoom, "
        f"benchmarks/ct_reference.py)"
    )
    print(
        f"workflow: all Snakemake processes together used {flow['all_cpu']:.1f} s CPU for "
        f"{jobs} jobs; beyond the same steps in the seed pool that is {overhead:.2f} s CPU "
        "per job (Snakemake's scheduling, each job's process start and imports)"
    )
    cold, *warm = flow["cold_warm"]
    print(
        f"one sample's preprocess + tile: {cold:.2f} s CPU in a fresh process (as each "
        f"workflow job runs), {min(warm):.2f} s when run again in it (a warm pool worker)"
    )
    print("workflow jobs by rule (jobs, summed wall s, summed CPU s):")
    for rule, (wall, cpu, count) in sorted(flow["per_rule"].items()):
        print(f"  {rule:16}{count:4d}{wall:10.1f}{cpu:10.1f}")
    print()
    checks = [
        (
            f"peak disk <= (cores + 2) x largest working set = {disk_target / mb:.1f} MB",
            flow["peak_disk"] <= disk_target,
        ),
        (
            f"disk left < 5% of input = {0.05 * input_bytes / mb:.1f} MB",
            flow["left_disk"] < 0.05 * input_bytes,
        ),
        ("wall time <= seed pool's (issue 13)", flow["wall"] <= seed["wall"]),
        (
            f"wall time >= 3x faster than the reference pool (issue 11): "
            f"{reference['wall'] / flow['wall']:.2f}x",
            reference["wall"] >= 3 * flow["wall"],
        ),
    ]
    for name, ok in checks:
        print(f"target {'met ' if ok else 'MISSED'}: {name}")


if __name__ == "__main__":
    sys.exit(main())
