"""Transfer speed of medprep.storage against a local S3-compatible server (moto_server).

Cases (each with 1 and with 8 threads):
- ct: download of a CT series of many small objects (300 x 512 KB by default)
- slide: download of one large slide object (500 MB by default), in parallel ranges
- tiles: upload of a slide's tiles (tar shards, multipart) plus the tile table
- fingerprints: what Snakemake's DAG build costs for many S3 samples (1000 by default),
  one listing per sample versus ``expect_sources`` (one listing of the parent prefix)

The server runs on this machine, so without added latency the numbers measure CPU
(client, server and, with --latency-ms, the proxy share the cores), not a network.
``--latency-ms 20`` puts a proxy in front that delays every request by 20 ms, like a
remote store: this is where parallel requests pay off.

    .venv/bin/python benchmarks/bench_storage.py                 # all cases, no added latency
    .venv/bin/python benchmarks/bench_storage.py --latency-ms 20 --cases ct

Scratch data goes to benchmarks/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from s3_support import (  # noqa: E402
    FaultProxy,
    MotoServer,
    fake_credentials,
    new_bucket_name,
    raw_client,
)

from medprep import storage  # noqa: E402

MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cases", default="ct,slide,tiles", help="comma-separated: ct, slide, tiles"
    )
    parser.add_argument("--threads", default="1,8", help="comma-separated thread counts")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="added per request by a proxy"
    )
    parser.add_argument("--ct-objects", type=int, default=300)
    parser.add_argument("--ct-object-kb", type=int, default=512)
    parser.add_argument("--slide-mb", type=int, default=500)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--fp-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "storage")
    return parser.parse_args(argv)


def fill(s3, bucket: str, key: str, size: int) -> None:
    """Upload ``size`` random bytes to ``key`` (multipart above 64 MB)."""
    if size <= 64 * MB:
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
        return
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, size, 64 * MB), start=1):
        body = os.urandom(min(64 * MB, size - start))
        etag = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=body
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )


CPU_SECONDS: dict[float, float] = {}  # wall seconds of a run -> CPU seconds of this process in it


def timed(function) -> float:
    """Wall seconds of ``function()``; the client's CPU seconds are kept for the report."""
    cpu = time.process_time()
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    CPU_SECONDS[seconds] = time.process_time() - cpu
    return seconds


def bench_download(uri: str, settings: dict, threads: int, out: Path) -> float:
    target = out / f"download-{threads}"
    shutil.rmtree(target, ignore_errors=True)
    seconds = timed(lambda: storage.fetch(uri, target, threads=threads, settings=settings))
    shutil.rmtree(target, ignore_errors=True)
    return seconds


def bench_upload(
    artifacts: list[dict], destination: str, settings: dict, threads: int, s3, bucket
) -> float:
    prefix = destination.split("/", 3)[3]
    for entry in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=entry["Key"])
    return timed(
        lambda: storage.publish(
            artifacts, destination, manifest={"sample": "bench"}, threads=threads, settings=settings
        )
    )


def make_tiles(out: Path, shards: int, shard_mb: int) -> list[dict]:
    folder = out / "tiles"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for index in range(shards):
        path = folder / f"shard-{index:04d}.tar"
        if not path.exists() or path.stat().st_size != shard_mb * MB:
            with open(path, "wb") as f:
                for _ in range(shard_mb):
                    f.write(os.urandom(MB))
        artifacts.append({"name": f"tiles/pixels/{path.name}", "path": str(path)})
    table = folder / "tiles.parquet"
    table.write_bytes(os.urandom(200_000))
    artifacts.append({"name": "tiles/tiles.parquet", "path": str(table)})
    return artifacts


def report(case: str, objects: int, size: int, seconds_by_threads: dict[int, float]) -> None:
    for threads, seconds in seconds_by_threads.items():
        print(
            f"{case:<6} threads={threads:<2} objects={objects:<4} MB={size / 1e6:8.1f} "
            f"seconds={seconds:7.2f} objects/s={objects / seconds:8.1f} MB/s={size / 1e6 / seconds:7.1f} "
            f"client-cpu-s={CPU_SECONDS.get(seconds, float('nan')):6.2f}",
            flush=True,
        )
    counts = sorted(seconds_by_threads)
    if len(counts) > 1:
        ratio = seconds_by_threads[counts[0]] / seconds_by_threads[counts[-1]]
        print(f"{case:<6} speed-up {counts[0]} -> {counts[-1]} threads: {ratio:.2f}x", flush=True)


def bench_fingerprints(server: MotoServer, s3, bucket: str, samples: int) -> None:
    """Requests and seconds to fingerprint ``samples`` sample prefixes, as at DAG build."""
    for index in range(samples):
        for name in ("0001.dcm", "0002.dcm"):
            s3.put_object(Bucket=bucket, Key=f"fp/S{index:05d}/{name}", Body=b"x")
    uris = [f"s3://{bucket}/fp/S{index:05d}/" for index in range(samples)]
    with FaultProxy(server.url) as counter:
        settings = {"endpoint_url": counter.url, "region": "us-east-1"}
        for strategy in ("one listing per sample", "expect_sources"):
            storage.clear_caches()
            if strategy == "expect_sources":
                storage.expect_sources(uris, settings)
            before = counter.stats()["requests"]
            seconds = timed(lambda: [storage.source_fingerprint(uri, settings) for uri in uris])
            requests = counter.stats()["requests"] - before
            print(
                f"fingerprints samples={samples} {strategy:<22} requests={requests:<5} seconds={seconds:6.2f}",
                flush=True,
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    cases = args.cases.split(",")
    thread_counts = [int(t) for t in args.threads.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(fake_credentials())
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    with MotoServer(args.out / "moto_server.log") as server:
        proxy = FaultProxy(server.url, latency_ms=args.latency_ms) if args.latency_ms else None
        try:
            endpoint = proxy.url if proxy else server.url
            settings = {"endpoint_url": endpoint, "region": "us-east-1"}
            s3 = raw_client(server.url)
            bucket = new_bucket_name()
            s3.create_bucket(Bucket=bucket)
            print(
                f"server: moto_server at {server.url}; added latency per request: {args.latency_ms} ms; cores: {os.cpu_count()}"
            )
            if "ct" in cases:
                size = args.ct_object_kb * 1024
                for index in range(args.ct_objects):
                    s3.put_object(
                        Bucket=bucket, Key=f"ct/S1/{index:04d}.dcm", Body=os.urandom(size)
                    )
                seconds = {
                    t: bench_download(f"s3://{bucket}/ct/S1/", settings, t, args.out)
                    for t in thread_counts
                }
                report("ct", args.ct_objects, args.ct_objects * size, seconds)
            if "slide" in cases:
                fill(s3, bucket, "wsi/slide.svs", args.slide_mb * MB)
                seconds = {
                    t: bench_download(f"s3://{bucket}/wsi/slide.svs", settings, t, args.out)
                    for t in thread_counts
                }
                report("slide", 1, args.slide_mb * MB, seconds)
            if "tiles" in cases:
                artifacts = make_tiles(args.out, args.shards, args.shard_mb)
                size = sum(Path(a["path"]).stat().st_size for a in artifacts)
                destination = f"s3://{bucket}/published/wsi/bench"
                seconds = {
                    t: bench_upload(artifacts, destination, settings, t, s3, bucket)
                    for t in thread_counts
                }
                report("tiles", len(artifacts), size, seconds)
            if "fingerprints" in cases:
                bench_fingerprints(server, s3, bucket, args.fp_samples)
        finally:
            if proxy:
                proxy.stop()


if __name__ == "__main__":
    main()
