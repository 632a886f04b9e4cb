"""A cohort through this workflow against a process pool of this project's own steps.

CT (``--modality ct``, the default): series read from a moto_server through a proxy
adding 20 ms to every request, preprocessed, tiled and published back to the same
bucket. Slides (``--modality wsi``): real small slides and synthetic 10,000 x 10,000
ones, local to local. Both sides run the same steps at the same settings (the config's
defaults); only the scheduling differs:

- workflow: ``snakemake --cores N`` (profiles/default: transfer jobs as threads of the
  Snakemake process handing their work to ``transfers`` = 2 warm worker processes, CPU
  jobs one process each; working files removed after each sample's upload);
- pool: the method the workflow replaces, a process pool of 1.5 x N workers, each
  running fetch -> preprocess -> tile -> publish for one sample at a time, then removing
  its files.

Reported: wall time, CPU time of every process of each side (and what it went to), CPU
utilisation = that CPU / (wall x cores), peak local disk and what is left (CT), where
each workflow job's fixed cost goes (Snakemake's share, process start and imports, S3
client set-up, idle cores), the Snakemake main process's CPU per job and the number of
cores it can keep fed, and the machine's load average (it is shared: compare the ratios
of one run, which both sides share).

    .venv/bin/python benchmarks/bench_cohort.py --samples 12 --rows 512 --slices 120 \\
        --slice-mm 2.5 > benchmarks/results/cohort.txt
    .venv/bin/python benchmarks/bench_cohort.py --samples 12 --spacing 3 \\
        > benchmarks/results/cohort-small.txt
    .venv/bin/python benchmarks/bench_cohort.py --modality wsi --samples 24 \\
        > benchmarks/results/cohort-wsi.txt
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import cohort_step  # noqa: E402
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
SAMPLE_EVERY_S = 0.5
POLL_EVERY_S = 0.1
# CT series of at most this many bytes are "small" (8 MB series): their
# wall-time target is looser, per-job costs being most of their run
SMALL_SERIES_BYTES = 16e6
WALL_TARGET = {"ct": 1.15, "ct-small": 1.3, "wsi": 1.15}
UTILISATION_TARGET = 0.75
CORES_FED_TARGET = 32
REAL_SLIDES = [
    REPO / "tests" / "fixtures" / "wsi" / "CMU-1-Small-Region.svs",
    REPO / "tests" / "fixtures" / "wsi" / "test3-DAPI-2-387.ndpi",
]
TEXTURE = REAL_SLIDES[0]
# the transfer steps a CPU job's process never runs: the CPU steps of each modality
CPU_STEPS = {"ct": ("preprocess_ct", "tile_ct"), "wsi": ("preprocess_wsi", "tile_wsi")}
# a sample's jobs
CHAIN = ("download", "preprocess", "tile", "upload")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", choices=("ct", "wsi"), default="ct")
    parser.add_argument("--samples", type=int, default=None, help="default: ct 12, wsi 24")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="ct: per S3 request")
    parser.add_argument("--rows", type=int, default=224, help="ct: phantom rows and columns")
    parser.add_argument("--slices", type=int, default=80, help="ct: phantom slices")
    parser.add_argument("--slice-mm", type=float, default=3.0, help="ct: slice distance")
    parser.add_argument(
        "--spacing", type=float, default=None, help="ct: output spacing in mm (default: config's)"
    )
    parser.add_argument(
        "--synthetic", type=int, default=None, help="wsi: synthetic slides (default: half)"
    )
    parser.add_argument("--synthetic-size", type=int, default=10_000, help="wsi: their side")
    parser.add_argument("--synthetic-mpp", type=float, default=0.5, help="wsi: their um/px")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="ct: also a pool of the reference tutorial steps (benchmarks/ct_reference.py)",
    )
    parser.add_argument("--snakemake-args", default="", help="extra arguments for the workflow run")
    parser.add_argument("--keep", type=Path, help="copy the workflow's logs here for a look")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="pool and workflow this many times, alternating which goes first; the round "
        "with the median wall-time ratio is shown",
    )
    args = parser.parse_args(argv)
    if args.samples is None:
        args.samples = 12 if args.modality == "ct" else 24
    if args.synthetic is None:
        args.synthetic = args.samples // 2
    return args


def settings_of(args) -> dict:
    """The settings of both sides, whole: the config's defaults unless --spacing says (the
    workflow's run gets all of them, so that none of the tests' fast settings written by
    ``write_config`` remains)."""
    chosen = {"spacing": [args.spacing] * 3} if args.spacing else {}
    return {
        "ct": deep_update(schema.config_defaults("ct"), chosen),
        "wsi": schema.config_defaults("wsi"),
    }


def samples_of(args) -> list[str]:
    return [f"{args.modality}{index:02d}" for index in range(args.samples)]


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- the cohorts


def write_phantom(series: Path, args, seed: int) -> None:
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


def make_ct_cohort(s3, bucket: str, folder: Path, args) -> int:
    total = 0
    for index, sample in enumerate(samples_of(args)):
        series = folder / sample
        write_phantom(series, args, seed=index)
        for path in sorted(series.iterdir()):
            body = path.read_bytes()
            total += len(body)
            s3.put_object(Bucket=bucket, Key=f"ct/{sample}/{path.name}", Body=body)
        shutil.rmtree(series)
    return total


def make_wsi_cohort(folder: Path, args) -> tuple[dict[str, Path], int]:
    """--synthetic synthetic slides (4 written, the others hard links to them) and real
    small slides (the fixtures, linked) for the rest."""
    from medprep.demo.synthetic_slide import write_synthetic_slide

    folder.mkdir(parents=True)
    written = []
    for seed in range(min(4, args.synthetic)):
        path = folder / f"written-{seed}.svs"
        write_synthetic_slide(
            path,
            args.synthetic_size,
            args.synthetic_size,
            texture_slide=TEXTURE,
            mpp=args.synthetic_mpp,
            tissue_fraction=1 / 3,
            seed=seed,
        )
        written.append(path)
    slides = {}
    for index, sample in enumerate(samples_of(args)):
        source = (
            written[index % len(written)]
            if index < args.synthetic
            else REAL_SLIDES[index % len(REAL_SLIDES)]
        )
        slides[sample] = folder / f"{sample}{source.suffix}"
        os.link(source, slides[sample])
    return slides, sum(path.stat().st_size for path in slides.values())


# ---------------------------------------------------------------- the pool


def _ct_steps(sample, files, folder, settings) -> list[dict]:
    from medprep.ct import steps

    pre, tiled = steps.run_chain([f.path for f in files], folder, settings["ct"], sample=sample)
    return [*pre["artifacts"], *tiled["artifacts"]]


def _wsi_steps(sample, files, folder, settings) -> list[dict]:
    write_download_manifest(folder / "download.json", sample, files)
    pre = cohort_step.run_wsi("preprocess_wsi", folder, settings)
    tiled = cohort_step.run_wsi("tile_wsi", folder, settings)
    return [*pre["artifacts"], *tiled["artifacts"]]


def write_download_manifest(path: Path, sample: str, files) -> None:
    manifest.write_step_manifest(
        path,
        sample=sample,
        modality="wsi",
        step="download",
        files=[f.to_dict() for f in files],
        total_bytes=sum(f.bytes for f in files),
    )


def pool_sample(modality, sample, uri, scratch, destination, settings) -> dict:
    """fetch -> this project's steps -> publish -> remove, for one sample in one process,
    with the workflow's code: transfers with storage.connections requests in flight, the
    CPU steps with one thread (a worker per sample is the pool's parallelism)."""
    started = time.process_time()
    connections = settings["storage"]["connections"]
    folder = Path(scratch) / sample
    files = storage.fetch(
        uri, folder / "download", threads=connections, settings=settings["storage"]
    )
    fetched = time.process_time()
    work = {"ct": _ct_steps, "wsi": _wsi_steps, "reference": _reference_steps}[modality]
    artifacts = work(sample, files, folder, settings)
    worked = time.process_time()
    storage.publish(
        artifacts,
        storage.join(destination, sample),
        manifest={"sample": sample, "modality": modality},
        threads=connections,
        settings=settings["storage"],
    )
    shutil.rmtree(folder)
    return {"transfers": fetched - started + time.process_time() - worked}


def _reference_steps(sample, files, folder, settings) -> list[dict]:
    import ct_reference

    series = folder / "series"  # the reference reads every file of a folder: only the slices
    series.mkdir()
    for f in files:
        os.link(f.path, series / Path(f.path).name)
    slices = ct_reference.load_scan(series)
    image = ct_reference.pixels_hu(slices)
    resampled, _ = ct_reference.resample(image, slices, new_spacing=settings["ct"]["spacing"])
    mask = ct_reference.segment_lung_mask(resampled, True)
    out = folder / "out"
    out.mkdir()
    np.save(out / "normalised.npy", ct_reference.normalise(resampled))
    np.save(out / "mask.npy", mask)
    return [{"path": str(p), "name": p.name} for p in sorted(out.iterdir())]


def run_pool(scratch: Path, sources: dict, destination: str, env: dict, args, **options) -> dict:
    """The cohort through a process pool of ``workers`` (default 1.5 x cores), each running
    ``steps`` (default: this project's) for one sample at a time."""
    steps = options.get("steps", args.modality)
    workers = options.get("workers") or max(1, round(1.5 * args.cores))
    settings = {**settings_of(args), "storage": options["storage"]}
    scratch.mkdir()
    saved = dict(os.environ)
    os.environ.update(env)
    before = cpu_of_children()
    started = time.monotonic()
    try:
        with (
            DiskSampler(scratch, SAMPLE_EVERY_S) as disk,
            ProcessPoolExecutor(max_workers=workers) as pool,
        ):
            futures = [
                pool.submit(pool_sample, steps, s, uri, str(scratch), destination, settings)
                for s, uri in sources.items()
            ]
            results = [future.result() for future in futures]
        wall = time.monotonic() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {
        "wall": wall,
        "cpu": cpu_of_children() - before,  # the workers end with the pool
        "transfers": sum(r["transfers"] for r in results),
        "peak_disk": disk.peak,
        "left_disk": folder_bytes(scratch),
        "workers": workers,
    }


# ---------------------------------------------------------------- this workflow


class ProcessWatch:
    """The CPU seconds of the Snakemake process itself, of its transfer worker processes
    and of its step server (its own, and its reaped children's: the CPU jobs), polled
    every POLL_EVERY_S (the last poll is at most that long before they end)."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.main = 0.0
        self.workers: dict[int, float] = {}
        self.servers: dict[int, float] = {}
        self.server_jobs: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                times = self.process.cpu_times()
                self.main = times.user + times.system
                for child in self.process.children():
                    command = child.cmdline()
                    if "medprep.workflow.transfers" in command:
                        times = child.cpu_times()
                        self.workers[child.pid] = times.user + times.system
                    elif "medprep.workflow.step_server" in command:
                        times = child.cpu_times()
                        self.servers[child.pid] = times.user + times.system
                        self.server_jobs[child.pid] = times.children_user + times.children_system
            except psutil.Error:
                pass
            self._stop.wait(POLL_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def prepare_workflow(workdir: Path, sources: dict, destination: str, args, storage_settings):
    workdir.mkdir()
    write_samples(workdir, [(s, args.modality, uri) for s, uri in sources.items()])
    write_config(workdir, destination=destination, storage=storage_settings, **settings_of(args))
    (workdir / "results").mkdir()


def dry_run_cpu(workdir: Path, env: dict, args) -> float:
    """CPU seconds of a dry-run: reading the workflow and building the DAG."""
    before = cpu_of_children()
    subprocess.run(
        snakemake_command(workdir, "-n", *args.snakemake_args.split(), cores=args.cores),
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
    )
    return cpu_of_children() - before


def in_progress(results: Path, modality: str) -> int:
    """Samples whose raw download is in results/ (fetched, not yet published)."""
    folder = results / modality
    if not folder.is_dir():
        return 0
    count = 0
    for sample in folder.iterdir():
        with contextlib.suppress(OSError):  # not fetched yet, or removed after upload
            count += any((sample / "download").iterdir())
    return count


def watched_run(workdir: Path, env: dict, args, *extra: str, sample=None) -> dict:
    """One ``snakemake`` run: its wall time, stderr, the CPU of its main process and
    transfer processes (``ProcessWatch``), and ``sample()`` polled while it runs."""
    most = 0
    started = time.monotonic()
    process = subprocess.Popen(
        snakemake_command(workdir, *args.snakemake_args.split(), *extra, cores=args.cores),
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = ProcessWatch(process.pid)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(process.stderr.read()))
    reader.start()
    # when the first job started (its log folder made) and the last sample was published
    first_job = published = None
    receipts = workdir / "results" / args.modality
    polls = itertools.count()
    while process.poll() is None:
        if next(polls) % round(SAMPLE_EVERY_S / POLL_EVERY_S) == 0:
            most = max(most, sample() if sample else 0)
        if first_job is None and (workdir / "logs" / "download").exists():
            first_job = time.monotonic() - started
        if (
            published is None
            and first_job is not None
            and len(list(receipts.glob("*/upload.json"))) == args.samples
        ):
            published = time.monotonic() - started
        time.sleep(POLL_EVERY_S)
    reader.join()
    watch.stop()
    stderr = "".join(stderr)
    if process.returncode != 0:
        raise SystemExit(f"the workflow failed:\n{stderr[-4000:]}")
    wall = time.monotonic() - started
    return {
        "wall": wall,
        "before_first_job": first_job or 0.0,
        "after_last_upload": wall - published if published else 0.0,
        "stderr": stderr,
        "watch": watch,
        "most": most,
        "jobs": len(re.findall(r"^Finished jobid: ", stderr, re.M)),
    }


def run_workflow(workdir: Path, env: dict, args) -> dict:
    before = cpu_of_children()
    with DiskSampler(workdir / "results", SAMPLE_EVERY_S) as disk:
        run = watched_run(
            workdir, env, args, sample=lambda: in_progress(workdir / "results", args.modality)
        )
    wall, watch, most_in_progress = run["wall"], run["watch"], run["most"]
    cpu = cpu_of_children() - before
    if args.keep:
        shutil.copytree(workdir / "logs", args.keep / "logs", dirs_exist_ok=True)
        (args.keep / "snakemake.log").write_text(run["stderr"])
    # The same workflow again with only the cohort table to redo (2 jobs): what its main
    # process spends beyond the dry-run without per-job work (imports of the scheduler and
    # the executor, the summary at the end), so that the per-job cost is the difference.
    again = watched_run(workdir, env, args, "--forcerun", "cohort")
    jobs: dict[str, list[float]] = {}
    for record in (workdir / "logs" / "benchmarks").rglob("*.tsv"):
        rule = record.relative_to(workdir / "logs" / "benchmarks").parts[0]
        seconds = float(record.read_text().splitlines()[1].split("\t")[0])
        jobs.setdefault(rule, []).append(seconds)
    for rule in ("download", "upload"):  # no benchmark records: their logs say
        for log in (workdir / "logs" / rule).rglob("*.log"):
            if match := re.search(r"finished in ([\d.]+) s", log.read_text()):
                jobs.setdefault(rule, []).append(float(match[1]))
    transfer_cpu, worker_pids = 0.0, set()
    for log in [*(workdir / "logs" / "download").rglob("*.log")] + [
        *(workdir / "logs" / "upload").rglob("*.log")
    ]:
        text = log.read_text()
        if match := re.search(r"(download|upload): ([\d.]+) s CPU", text):
            transfer_cpu += float(match[2])
        if match := re.search(r"in transfer worker (\d+) ", text):
            worker_pids.add(int(match[1]))
    server, server_jobs = sum(watch.servers.values()), sum(watch.server_jobs.values())
    result = {
        "wall": wall,
        "before_first_job": run["before_first_job"],
        "after_last_upload": run["after_last_upload"],
        # the transfer workers end just after the Snakemake process (when its pipes
        # close): it never waits for them, so their CPU is not in its children's; polled
        # so is the step server: its CPU and its children's (the CPU jobs), polled
        "cpu": cpu + sum(watch.workers.values()) + server + server_jobs,
        "server": server,
        "server_jobs": server_jobs,
        "main": watch.main,
        "main_jobs": run["jobs"],
        "main_few": again["watch"].main,
        "main_few_jobs": again["jobs"],
        "workers": sum(watch.workers.values()),
        "worker_count": len(worker_pids),
        # the workers' start (interpreter, imports) and their waits between jobs
        "worker_start": sum(watch.workers.values()) - transfer_cpu,
        "transfers": transfer_cpu,
        "jobs": jobs,
        "peak_disk": disk.peak,
        "left_disk": folder_bytes(workdir / "results"),
        "most_in_progress": most_in_progress,
    }
    if args.modality == "ct":
        working_sets = []
        for sample in samples_of(args):
            folder = workdir / "results" / "ct" / sample
            raw = manifest.read_step_manifest(folder / "download.json")["total_bytes"]
            published = json.loads((folder / "upload.json").read_text())["files"]
            working_sets.append(raw + sum(f["bytes"] for f in published))
        result["largest_working_set"] = max(working_sets)
    return result


# ---------------------------------------------------------------- fixed costs, measured


def measure_step(step: str, source: Path, out: Path, args) -> dict:
    """Cold and warm CPU of ``step`` (benchmarks/cohort_step.py) and its heaviest imports."""
    settings = out / "settings.json"
    out.mkdir(parents=True)
    settings.write_text(json.dumps(settings_of(args)))

    def command(where: str) -> list[str]:
        return [str(HERE / "cohort_step.py"), step, str(source), str(out / where), str(settings)]

    run = subprocess.run(
        [sys.executable, *command("cpu")], check=True, capture_output=True, text=True
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", *command("imports")],
        check=True,
        capture_output=True,
        text=True,
    )
    result["imports"] = heaviest_imports(traced.stderr)
    # the same step in a child forked from a process that imported what it imports
    modules = out / "modules.txt"
    modules.write_text("\n".join(imported_modules(traced.stderr)))
    run = subprocess.run(
        [sys.executable, *command("forked"), str(modules)],
        check=True,
        capture_output=True,
        text=True,
    )
    result.update(json.loads(run.stdout.strip().splitlines()[-1]))
    return result


def imported_modules(importtime: str) -> list[str]:
    """Every module ``python -X importtime`` saw imported, in import order."""
    return re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", importtime, re.M)


def heaviest_imports(importtime: str, count: int = 6) -> list[tuple[str, float]]:
    """Packages by the time their import took (s), from ``python -X importtime``: each
    package's imports by other packages (scipy.ndimage by medprep.ct.lung, say) summed,
    its own imports of itself not counted twice; medprep and the interpreter's own left
    out."""
    entries = []  # (depth, cumulative s, module), children before their parent
    for line in importtime.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if match:
            entries.append((len(match[2]) // 2, int(match[1]) / 1e6, match[3]))
    found: dict[str, float] = {}
    for index, (depth, seconds, module) in enumerate(entries):
        parent = next((e[2] for e in entries[index + 1 :] if e[0] < depth), None)
        root = module.split(".")[0]
        if parent is None or parent.split(".")[0] != root:
            found[root] = found.get(root, 0.0) + seconds
    skip = {"medprep", "site", "encodings", "_frozen_importlib_external", "zipimport"}
    ranked = sorted(found.items(), key=lambda item: -item[1])
    return [(name, seconds) for name, seconds in ranked if name not in skip][:count]


def fresh_cpu(code: str, env: dict | None = None, rounds: int = 3) -> float:
    """CPU seconds of ``python -c code`` in a fresh process (fastest of ``rounds``)."""
    best = float("inf")
    for _ in range(rounds):
        before = cpu_of_children()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        best = min(best, cpu_of_children() - before)
    return best


PREAMBLE = (
    "import pickle; from snakemake.logging import logger; "
    "from snakemake.iocontainers import Snakemake"
)


def client_code(endpoint: str) -> str:
    settings = {"endpoint_url": endpoint, "region": "us-east-1"}
    return f"from medprep.storage import s3_connect; s3_connect.client({settings!r}, pool_size=20)"


def fixed_costs(folder: Path, args, env: dict, endpoint: str | None) -> dict:
    """Each CPU step cold and warm, Snakemake's script preamble, an S3 client's set-up."""
    folder.mkdir()
    steps = {}
    if args.modality == "ct":
        series = folder / "series"
        write_phantom(series, args, seed=0)
        steps["preprocess_ct"] = measure_step("preprocess_ct", series, folder / "pre", args)
        preprocess = folder / "pre" / "cpu" / "r0" / "s" / "preprocess.json"
        steps["tile_ct"] = measure_step("tile_ct", preprocess, folder / "tile", args)
    else:
        sample = folder / "slide"
        sample.mkdir()
        slide = REAL_SLIDES[0]
        if args.synthetic:  # the slides that take most of the run
            slide = folder.parent / "slides" / "written-0.svs"
        files = storage.fetch(str(slide), sample / "download", settings={})
        write_download_manifest(sample / "download.json", "s", files)
        steps["preprocess_wsi"] = measure_step("preprocess_wsi", sample, folder / "pre", args)
        preprocessed = folder / "pre" / "cpu" / "r0" / "s"
        steps["tile_wsi"] = measure_step("tile_wsi", preprocessed, folder / "tile", args)
    python = fresh_cpu("pass")
    costs = {"steps": steps, "python": python, "preamble": fresh_cpu(PREAMBLE) - python}
    if endpoint:
        costs["client"] = fresh_cpu(client_code(endpoint), env=env) - python
    return costs


# ---------------------------------------------------------------- the run


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        tmp = Path(tmp)
        run = run_ct_cohort if args.modality == "ct" else run_wsi_cohort
        results = run(tmp, args)
    load_after = os.getloadavg()
    report(args, results, load_before, load_after)
    return 0


def run_ct_cohort(tmp: Path, args) -> dict:
    (tmp / "aws").mkdir()
    env = {**os.environ, **isolated_aws_environment(tmp / "aws", fake_credentials())}
    env.pop("AWS_ENDPOINT_URL", None)
    with MotoServer(tmp / "moto.log") as server:
        proxy = FaultProxy(server.url, latency_ms=args.latency_ms)
        try:
            s3 = raw_client(server.url, env)
            bucket = new_bucket_name()
            s3.create_bucket(Bucket=bucket)
            input_bytes = make_ct_cohort(s3, bucket, tmp / "series", args)
            sources = {s: f"s3://{bucket}/ct/{s}/" for s in samples_of(args)}
            connection = {"endpoint_url": proxy.url, "region": "us-east-1"}
            storage_settings = deep_update(schema.config_defaults("storage"), connection)
            published = f"s3://{bucket}/published"

            def one_pool(index: int) -> dict:
                where = f"pool{index}"
                return run_pool(
                    tmp / where,
                    sources,
                    f"{published}/{where}",
                    env,
                    args,
                    storage=storage_settings,
                )

            def one_workflow(index: int) -> dict:
                where = tmp / f"workflow{index}"
                prepare_workflow(where, sources, f"{published}/{where.name}", args, connection)
                return run_workflow(where, env, args)

            prepare_workflow(tmp / "dry", sources, f"{published}/dry", args, connection)
            dry = dry_run_cpu(tmp / "dry", env, args)
            rounds = alternate(one_pool, one_workflow, args.rounds)
            reference = None
            if args.reference:
                reference = run_pool(
                    tmp / "reference",
                    sources,
                    f"{published}/reference",
                    env,
                    args,
                    storage=storage_settings,
                    steps="reference",
                    workers=args.cores,
                )
            costs = fixed_costs(tmp / "costs", args, env, proxy.url)
        finally:
            proxy.stop()
    return {
        "input_bytes": input_bytes,
        "rounds": rounds,
        "dry": dry,
        "costs": costs,
        "reference": reference,
    }


def alternate(one_pool, one_workflow, rounds: int) -> list[tuple[dict, dict]]:
    """(pool, workflow) of each round; the side that runs first alternates, so that a load
    that grows or fades on the shared machine favours neither."""
    results = []
    for index in range(rounds):
        if index % 2 == 0:
            pool = one_pool(index)
            flow = one_workflow(index)
        else:
            flow = one_workflow(index)
            pool = one_pool(index)
        results.append((pool, flow))
    return results


def run_wsi_cohort(tmp: Path, args) -> dict:
    slides, input_bytes = make_wsi_cohort(tmp / "slides", args)
    sources = {s: str(path) for s, path in slides.items()}
    env = dict(os.environ)

    def one_pool(index: int) -> dict:
        where = f"pool{index}"
        storage_settings = schema.config_defaults("storage")
        return run_pool(
            tmp / where,
            sources,
            str(tmp / f"published-{where}"),
            env,
            args,
            storage=storage_settings,
        )

    def one_workflow(index: int) -> dict:
        where = tmp / f"workflow{index}"
        prepare_workflow(where, sources, str(tmp / f"published-{where.name}"), args, {})
        return run_workflow(where, env, args)

    prepare_workflow(tmp / "dry", sources, str(tmp / "published-dry"), args, {})
    dry = dry_run_cpu(tmp / "dry", env, args)
    rounds = alternate(one_pool, one_workflow, args.rounds)
    costs = fixed_costs(tmp / "costs", args, env, None)
    return {"input_bytes": input_bytes, "rounds": rounds, "dry": dry, "costs": costs}


# ---------------------------------------------------------------- the report


def report(args, results, load_before, load_after) -> None:
    # the details of the round whose wall-time ratio is the median
    ratios = [flow["wall"] / pool["wall"] for pool, flow in results["rounds"]]
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    pool, flow = results["rounds"][middle]
    results = {**results, "pool": pool, "flow": flow, "ratios": ratios}
    costs = results["costs"]
    mb, cores, samples = 1e6, args.cores, args.samples
    jobs = sum(len(walls) for walls in flow["jobs"].values())
    cpu_jobs = sum(len(flow["jobs"].get(step, ())) for step in CPU_STEPS[args.modality])
    print(describe(args, results))
    print(
        f"machine: {os.cpu_count()} CPUs, shared; load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.1f}' for v in load_before)}, after "
        f"{', '.join(f'{v:.1f}' for v in load_after)}"
    )
    print()
    steps_flow = flow["cpu"] - flow["main"] - flow["workers"]
    steps_pool = pool["cpu"] - pool["transfers"]
    rows = [
        ("wall time (s)", flow["wall"], pool["wall"]),
        ("CPU time, every process (s)", flow["cpu"], pool["cpu"]),
        ("  CPU steps' processes / pool's steps", steps_flow, steps_pool),
        ("    of which the step server's own", flow["server"], 0.0),
        ("  transfers (workers' jobs / pool's)", flow["transfers"], pool["transfers"]),
        ("  transfer processes' start-up", flow["worker_start"], 0.0),
        ("  Snakemake main process", flow["main"], 0.0),
        ("CPU utilisation (CPU / wall / cores)", util(flow, cores), util(pool, cores)),
        ("idle core-seconds (wall x cores - CPU)", idle(flow, cores), idle(pool, cores)),
    ]
    if args.modality == "ct":
        rows += [
            ("peak local disk (MB)", flow["peak_disk"] / mb, pool["peak_disk"] / mb),
            ("local disk left at end (MB)", flow["left_disk"] / mb, pool["left_disk"] / mb),
        ]
    print(f"{'':42}{'workflow':>10}{'pool':>10}{'ratio':>8}")
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:8.2f}" if theirs else f"{'':8}"
        print(f"{name:42}{ours:10.2f}{theirs:10.2f}{ratio}")
    if len(results["ratios"]) > 1:
        shown = ", ".join(f"{ratio:.2f}" for ratio in results["ratios"])
        print(f"wall-time ratio of each round (workflow / pool): {shown}; shown: the median")
    print(
        f"(pool: {pool['workers']} worker processes running this project's steps; workflow: "
        f"{jobs} jobs, {flow['worker_count']} transfer worker processes; most samples fetched "
        f"but not yet published at once: {flow['most_in_progress']})"
    )
    print("workflow jobs by rule (jobs, summed wall s):")
    for rule, walls in sorted(flow["jobs"].items()):
        print(f"  {rule:16}{len(walls):4d}{sum(walls):10.1f}")
    print()
    print(f"where the workflow's CPU beyond the pool's goes ({jobs} jobs, {cpu_jobs} CPU jobs):")
    per_job_main = (flow["main"] - flow["main_few"]) / (flow["main_jobs"] - flow["main_few_jobs"])
    print(
        f"  Snakemake's share: its main process used {flow['main']:.2f} s CPU for "
        f"{flow['main_jobs']} jobs, {flow['main_few']:.2f} s when only the cohort table was "
        f"redone ({flow['main_few_jobs']} jobs; a dry-run: {results['dry']:.2f} s), so "
        f"{per_job_main * 1000:.0f} ms per job (scheduling, starting it, a transfer handed to "
        f"a worker); in each CPU job, Snakemake's script preamble: "
        f"{costs['preamble'] * 1000:.0f} ms (fresh process)"
    )
    print(
        f"  process start and imports, first use of memory, per CPU job (Python itself: "
        f"{costs['python'] * 1000:.0f} ms): cold (a fresh process, as a rule script's job) - warm "
        "(run again in it, as a pool worker); forked: the job in a child forked from a "
        "process holding its imports, as each CPU job now runs"
    )
    for step, cost in costs["steps"].items():
        heavy = ", ".join(f"{name} {seconds:.2f}" for name, seconds in cost["imports"])
        print(
            f"    {step:15} {cost['cold'] - cost['warm']:.2f} s (cold {cost['cold']:.2f}, "
            f"forked {cost['forked']:.2f}, warm {cost['warm']:.2f}); heaviest imports, s: "
            f"{heavy}"
        )
    if "client" in costs:
        print(
            f"  S3 client set-up (boto3 import, session, client): {costs['client']:.2f} s in a "
            f"fresh process, what every transfer job paid as a process of its own; now once "
            f"per transfer worker, in its first job ({flow['worker_count']} workers, which took "
            f"{flow['worker_start']:.2f} s CPU in all to start)"
        )
    print(
        f"  idle cores: {idle(flow, cores) / jobs:.2f} core-seconds per job "
        f"({idle(flow, cores):.1f} in all; the pool {idle(pool, cores):.1f})"
    )
    # CPU jobs are forked from the step server, which holds their imports: what a job
    # costs beyond a warm pool worker's run of its step is the fork and first use of
    # memory (forked - warm), and the server's own start-up and imports, once per run
    fixed = sum(c["forked"] - c["warm"] for c in costs["steps"].values())
    expected = flow["main"] + flow["worker_start"] + flow["server"] + fixed * samples
    print(
        f"  CPU jobs forked from the step server (its own CPU: {flow['server']:.2f} s, its "
        f"start, the steps' imports and the forks); a job in a fresh process, as a rule "
        f"script's, would cost "
        f"{sum(c['cold'] - c['forked'] + costs['preamble'] for c in costs['steps'].values()):.2f}"
        f" s CPU more per sample"
    )
    print(
        f"  sum of these costs: {expected:.1f} s CPU; measured difference of the two "
        f"sides' CPU: {flow['cpu'] - pool['cpu']:.1f} s"
    )
    start, end = flow["before_first_job"], flow["after_last_upload"]
    chains = flow["wall"] - start - end
    print(
        f"  once per run: {start:.1f} s before the first job (Snakemake reads the workflow and "
        f"the sheet, fingerprints the inputs, checks the destination) and {end:.1f} s after "
        f"the last upload (the cohort table and the dataset index, which the pool does not "
        f"make); the samples' chains: {chains:.1f} s, {chains / pool['wall']:.2f}x the "
        f"pool's wall"
    )
    print()
    work_per_sample = steps_flow / samples
    main_per_sample = per_job_main * len(CHAIN)
    fed = work_per_sample / main_per_sample if main_per_sample > 0 else float("inf")
    print(
        f"Snakemake main process: {per_job_main * 1000:.0f} ms CPU per job, "
        f"{main_per_sample * 1000:.0f} ms per sample ({len(CHAIN)} jobs); the CPU jobs of a "
        f"sample take {work_per_sample:.2f} s CPU, so one Snakemake process keeps "
        f"{fed:.0f} cores fed on this workload"
    )
    print()
    for name, ok in targets(args, results, fed):
        print(f"target {'met   ' if ok else 'MISSED'}: {name}")
    print()
    print(f"command: .venv/bin/python benchmarks/bench_cohort.py {' '.join(argv_shown())}")


def describe(args, results) -> str:
    size = results["input_bytes"]
    if args.modality == "ct":
        flow = results["flow"]
        return (
            f"medprep cohort benchmark: {args.samples} CT samples, S3 -> S3 through a proxy "
            f"adding {args.latency_ms:.0f} ms per request, --cores {args.cores}\n"
            f"input {size / 1e6:.1f} MB ({size / args.samples / 1e6:.1f} MB per sample, "
            f"{args.rows}x{args.rows}x{args.slices} int16 DICOM, output spacing "
            f"{settings_of(args)['ct']['spacing'][0]} mm); largest sample working set "
            f"{flow['largest_working_set'] / 1e6:.1f} MB (raw + published artifacts)"
        )
    real = args.samples - args.synthetic
    return (
        f"medprep cohort benchmark: {args.samples} slides, local -> local, --cores "
        f"{args.cores}\ninput {size / 1e6:.1f} MB: {args.synthetic} synthetic "
        f"{args.synthetic_size} x {args.synthetic_size} at {args.synthetic_mpp} um/px (CMU "
        "texture, 4 "
        f"written, the others linked to them), {real} real small slides (CMU-1-Small-Region "
        "H&E, test3-DAPI-2-387 NDPI fluorescence); default settings (0.5 um/px, 256 px JPEG "
        "tiles)"
    )


def util(side: dict, cores: int) -> float:
    return side["cpu"] / (side["wall"] * cores)


def idle(side: dict, cores: int) -> float:
    return max(0.0, side["wall"] * cores - side["cpu"])


def targets(args, results, fed) -> list[tuple[str, bool]]:
    flow, pool = results["flow"], results["pool"]
    small = args.modality == "ct" and results["input_bytes"] / args.samples <= SMALL_SERIES_BYTES
    kind = "ct-small" if small else args.modality
    ratio = flow["wall"] / pool["wall"]
    checks = [
        (
            f"wall time <= {WALL_TARGET[kind]}x the pool's ({kind}): {ratio:.2f}x",
            ratio <= WALL_TARGET[kind],
        )
    ]
    if kind == "ct":
        use = util(flow, args.cores)
        checks.append(
            (f"CPU utilisation >= {UTILISATION_TARGET}: {use:.2f}", use >= UTILISATION_TARGET)
        )
        bound = (args.cores + 2) * flow["largest_working_set"]
        checks.append(
            (
                f"peak disk {flow['peak_disk'] / 1e6:.1f} MB <= (cores + 2) x largest working "
                f"set = {bound / 1e6:.1f} MB",
                flow["peak_disk"] <= bound,
            )
        )
        left = 0.05 * results["input_bytes"]
        checks.append(
            (
                f"disk left {flow['left_disk'] / 1e6:.1f} MB < 5% of input = {left / 1e6:.1f} MB",
                flow["left_disk"] < left,
            )
        )
        checks.append(
            (
                f"one Snakemake process feeds >= {CORES_FED_TARGET} cores: {fed:.0f}",
                fed >= CORES_FED_TARGET,
            )
        )
    if results.get("reference"):
        reference = results["reference"]
        checks.append(
            (
                f"wall time >= 3x faster than the reference tutorial's steps: "
                f"{reference['wall'] / flow['wall']:.2f}x",
                reference["wall"] >= 3 * flow["wall"],
            )
        )
    return checks


def argv_shown() -> list[str]:
    return [arg if " " not in arg else f"'{arg}'" for arg in sys.argv[1:]]


if __name__ == "__main__":
    sys.exit(main())
