"""What the check of published files (``storage.verify_published``) adds to a DAG build.

Local destination: N samples (half CT, half slides, tiny local inputs as in
bench_dag.py), each already published (``--files`` files of ``--file-kb`` KB) with the
snapshot the upload job records. ``snakemake --dry-run`` is timed with
``verify_published`` ``none``, ``size`` and ``checksum``; the ratios are to ``none``.

S3 destination (moto_server, through a request-counting proxy): the same check for N
published samples, run the way the DAG build runs it (``medprep.workflow``), once with
one listing per sample prefix and once with the common parent announced
(``expect_published``, what rules/common.smk does), which lists it once.

    .venv/bin/python benchmarks/bench_published_check.py              # 300 samples
    .venv/bin/python benchmarks/bench_published_check.py --samples 300 --files 20

Scratch data goes to --workdir (reused between runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_dag import sample_rows, time_dry_run, write_dataset  # noqa: E402
from s3_support import (  # noqa: E402
    FaultProxy,
    MotoServer,
    fake_credentials,
    isolated_aws_environment,
    new_bucket_name,
    raw_client,
)

from medprep import storage  # noqa: E402
from medprep.storage import published  # noqa: E402
from medprep.workflow import parse as mw  # noqa: E402

REPO = HERE.parent


def publish_all(workdir: Path, count: int, files: int, file_kb: int) -> None:
    """Publish every sample of the dataset once and record its snapshot (reused if there)."""
    marker = workdir / f".published-{files}x{file_kb}"
    if marker.exists():
        return
    source = workdir / "artifacts"
    source.mkdir(exist_ok=True)
    artifacts = []
    for number in range(files):
        path = source / f"{number:03d}.bin"
        path.write_bytes(os.urandom(file_kb * 1024))
        artifacts.append({"name": f"part/{number:03d}.bin", "path": str(path)})
    for sample, modality, _ in sample_rows(count):
        destination = str(workdir / "published" / modality / sample)
        receipt = storage.publish(artifacts, destination, manifest={"sample": sample}, threads=2)
        state = published.state_path(modality, sample, base=workdir)
        # the destination as the workflow names it: relative to the working directory
        relative = f"published/{modality}/{sample}"
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            published.record(state, relative, 0, receipt, {})
        finally:
            os.chdir(cwd)
    marker.write_text("")


def set_mode(workdir: Path, mode: str) -> None:
    config = (workdir / "config.yaml").read_text().split("storage:")[0]
    (workdir / "config.yaml").write_text(config + f"storage:\n  verify_published: {mode}\n")


def bench_local(args: argparse.Namespace) -> None:
    workdir = write_dataset(args.workdir / f"local-{args.samples}", args.samples)
    publish_all(workdir, args.samples, args.files, args.file_kb)
    print(
        f"local destination: {args.samples} samples x {args.files + 1} published files "
        f"of {args.file_kb} KB, snakemake --dry-run"
    )
    print(f"{'verify_published':>17} {'wall s':>8} {'cpu s':>7} {'cpu ratio':>10}")
    base = None
    for mode in ("none", "size", "checksum"):
        set_mode(workdir, mode)
        wall, cpu, _ = min(
            time_dry_run(workdir, REPO / "Snakefile", None) for _ in range(args.repeat)
        )
        base = base or cpu
        print(f"{mode:>17} {wall:>8.1f} {cpu:>7.1f} {cpu / base:>10.2f}", flush=True)


def bench_s3(args: argparse.Namespace) -> None:
    env = isolated_aws_environment(args.workdir, fake_credentials())
    os.environ.update(env)
    with MotoServer() as server, FaultProxy(server.url) as proxy:
        s3 = raw_client(server.url, env)
        bucket = new_bucket_name()
        s3.create_bucket(Bucket=bucket)
        settings = {"endpoint_url": proxy.url, "region": "us-east-1"}
        config = {"destination": f"s3://{bucket}/published", "storage": settings}
        rows = sample_rows(args.samples)
        state_dir = args.workdir / f"s3-{args.samples}"
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(state_dir)
        for sample, modality, _ in rows:
            prefix = f"published/{modality}/{sample}/"
            names = [f"part/{n:03d}.bin" for n in range(args.files)] + ["manifest.json"]
            for name in names:
                s3.put_object(Bucket=bucket, Key=prefix + name, Body=b"x" * 100)
            receipt = {
                "files": [{"name": n, "sha256": "-"} for n in names[:-1]],
                "manifest_sha256": "-",
            }
            destination = mw.join_uri(config["destination"], modality, sample)
            published.record(
                published.state_path(modality, sample), destination, 0, receipt, settings
            )
        table = {name: {"modality": modality} for name, modality, _ in rows}
        print(
            f"\nS3 destination: {args.samples} samples x {args.files + 1} objects, "
            "the check of every sample as at DAG build"
        )
        print(f"{'listing':>28} {'requests':>9} {'wall s':>8} {'changed':>8}")
        for label, announce in (("one per sample prefix", False), ("parent once (expected)", True)):
            storage.clear_caches()
            if announce:
                mw.expect_published(table, config)
            before = proxy.stats()["requests"]
            start = time.perf_counter()
            numbers = [
                mw.published_generation(config, modality, sample, main_process=False)
                for sample, modality, _ in rows
            ]
            seconds = time.perf_counter() - start
            requests = proxy.stats()["requests"] - before
            print(f"{label:>28} {requests:>9} {seconds:>8.2f} {sum(numbers):>8}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--files", type=int, default=20, help="published files per sample")
    parser.add_argument("--file-kb", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="dry-runs per mode (best kept)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "medprep-bench-published",
    )
    parser.add_argument("--cases", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if "local" in args.cases:
        bench_local(args)
    if "s3" in args.cases:
        bench_s3(args)


if __name__ == "__main__":
    main()
