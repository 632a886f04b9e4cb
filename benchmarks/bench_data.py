"""Random access to tiles through medprep.data: local folder and the test S3 server.

A synthetic slide's tiles (JPEG, 256 px, in tar shards of 1,000) are published with
their dataset index; random tiles are then read (one ranged read each, then decoded)
from a local destination and from moto_server on 127.0.0.1, next to a naive reader that
opens the shard with ``tarfile`` and looks the member up (a scan of the shard's headers).

    .venv/bin/python benchmarks/bench_data.py
    .venv/bin/python benchmarks/bench_data.py --tiles 4000 --reads 1000

Scratch data goes to benchmarks/out/ (git-ignored). The server shares this machine's
cores with the client, so S3 numbers measure CPU, not a network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from s3_support import (  # noqa: E402
    MotoServer,
    fake_credentials,
    isolated_aws_environment,
    new_bucket_name,
    raw_client,
)

from medprep.common import atomic  # noqa: E402
from medprep.data import index as dataset  # noqa: E402
from medprep.data import open_dataset  # noqa: E402
from medprep.wsi import writers  # noqa: E402


def synthetic_destination(folder: Path, n: int, per_shard: int) -> Path:
    """A destination with one slide of ``n`` tiles and its dataset index."""
    dest = folder / "published"
    if (dest / "dataset" / "manifest.json").exists():
        return dest
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    pixels = dest / "wsi" / "B1" / "tiles" / "pixels"
    pixels.mkdir(parents=True)
    container = writers.TarShardContainer(pixels, per_shard)
    columns = {name: [] for name in writers.TABLE_COLUMNS}
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(n):
        base = (np.sin(xx / (7 + i % 13)) + np.cos(yy / (5 + i % 11))) * 60 + 128
        tile = np.clip(base[..., None] + rng.normal(0, 12, (256, 256, 3)), 0, 255)
        data = writers.encode_tile(tile.astype(np.uint8), "jpeg", 90)
        x, y = (i % 100) * 256, (i // 100) * 256
        file, member = container.add(writers.tile_key("B1", x, y), data, "jpg")
        values = {
            "tile_id": i, "sample": "B1", "x": x, "y": y, "width_l0": 256.0,
            "height_l0": 256.0, "level": 0, "target_mpp": 0.5, "mpp": 0.5, "size": 256,
            "mask_coverage": 1.0, "tissue_fraction": 1.0, "background_fraction": 0.0,
            "white_fraction": 0.0, "black_fraction": 0.0, "blur": 1.0, "file": file,
            "member": member, "offset": container.last_offset, "nbytes": len(data),
        }  # fmt: skip
        for name, value in values.items():
            columns[name].append(value)
    container.close()
    table = dest / "wsi" / "B1" / "tiles" / "tiles.parquet"
    writers.write_table(columns, table)
    work = folder / "work"
    work.mkdir()
    tile_manifest = {"artifacts": [{"name": "tiles/tiles.parquet", "path": str(table)}]}
    atomic.write_json(work / "tile.json", {**tile_manifest, "summary": {"status": "ok"}})
    entry = dataset.SampleEntry("B1", "wsi", str(work / "tile.json"), None, label="1")
    manifest = dataset.build([entry], work / "index")
    files = {name: str(work / "index" / name) for name in dataset.FILES}
    dataset.publish(files, str(dest / "dataset"), manifest)
    return dest


def time_reads(read, indices) -> float:
    started = time.perf_counter()
    for i in indices:
        read(int(i))
    return len(indices) / (time.perf_counter() - started)


def naive_tar_read(dest: Path, table, i: int) -> bytes:
    row = table.iloc[i]
    with tarfile.open(dest / row["file"]) as tar:
        return tar.extractfile(row["member"]).read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=500)
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, load {load}"
    )
    dest = synthetic_destination(HERE / "out" / "data", args.tiles, args.per_shard)
    indices = np.random.default_rng(1).integers(0, args.tiles, args.reads)
    local = open_dataset(dest)
    table = local.tiles.table
    raw = time_reads(lambda i: local.tiles.raw(local.tiles.row(i)), indices)
    decoded = time_reads(lambda i: local.tiles[i], indices)
    naive = time_reads(lambda i: naive_tar_read(dest, table, i), indices)
    print(f"local  ranged read           tiles/s={raw:8.0f}")
    print(f"local  ranged read + decode  tiles/s={decoded:8.0f}")
    print(
        f"local  tarfile member lookup tiles/s={naive:8.0f}  (ranged read {raw / naive:.1f}x faster)"
    )
    credentials = fake_credentials()
    os.environ.update(isolated_aws_environment(HERE / "out", credentials))
    with MotoServer() as server:
        bucket = new_bucket_name()
        client = raw_client(server.url, credentials)
        client.create_bucket(Bucket=bucket)
        for path in sorted(dest.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"out/{path.relative_to(dest).as_posix()}")
        remote = open_dataset(f"s3://{bucket}/out", settings={"endpoint_url": server.url})
        s3_indices = indices[: max(1, args.reads // 2)]
        s3_raw = time_reads(lambda i: remote.tiles.raw(remote.tiles.row(i)), s3_indices)
        s3_decoded = time_reads(lambda i: remote.tiles[i], s3_indices)
        print(f"s3     ranged GET            tiles/s={s3_raw:8.0f}")
        print(
            f"s3     ranged GET + decode   tiles/s={s3_decoded:8.0f}  (local {decoded / s3_decoded:.1f}x faster)"
        )
        same = all(
            np.array_equal(remote.tiles[int(i)][0], local.tiles[int(i)][0]) for i in indices[:20]
        )
        print(f"s3 and local pixels identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
