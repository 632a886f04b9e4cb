"""Synthetic per-sample tables and step manifests, as the tile steps write them (no pixels):
for the dataset index tests and benchmarks/bench_dataset.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medprep.common import atomic
from medprep.ct.patches import TABLE_COLUMNS as PATCH_TABLE
from medprep.data.index import SampleEntry
from medprep.wsi import writers


def _wsi_table(sample: str, n: int, rng) -> dict[str, list]:
    xs = (np.arange(n) % 50) * 512
    ys = (np.arange(n) // 50) * 512
    columns = {
        "tile_id": np.arange(n),
        "sample": [sample] * n,
        "x": xs,
        "y": ys,
        "width_l0": np.full(n, 512.0),
        "height_l0": np.full(n, 512.0),
        "level": np.zeros(n, np.int32),
        "target_mpp": np.full(n, 0.5),
        "mpp": np.full(n, 0.5),
        "size": np.full(n, 256, np.int32),
        **{
            c: rng.random(n)
            for c in (
                "mask_coverage",
                "tissue_fraction",
                "background_fraction",
                "white_fraction",
                "black_fraction",
                "blur",
                "sharpness",
                "pen_fraction",
                "fold_fraction",
                "gap_fraction",
            )
        },
        "file": [f"pixels/shard-{i // 1000:06d}.tar" for i in range(n)],
        "member": [
            writers.tile_key(sample, int(x), int(y)) + ".jpg" for x, y in zip(xs, ys, strict=True)
        ],
        "offset": 512 + np.arange(n) * 20480,
        "nbytes": np.full(n, 19000),
    }
    return {k: list(v) if not isinstance(v, list) else v for k, v in columns.items()}


def _ct_table(n: int, path: Path) -> None:
    import pandas as pd

    rows = {
        c: np.full(n, None, dtype=object) if t == "string" else np.zeros(n, dtype=t)
        for c, t in PATCH_TABLE.items()
    }
    rows["patch"] = np.arange(n)
    rows["z1"] = rows["y1"] = rows["x1"] = np.full(n, 64)
    with atomic.atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def write_cohort(
    folder: Path,
    samples: list[tuple[str, str, str | None, str | None]],
    tiles: int = 100,
    patches: int = 50,
    seed: int = 0,
) -> list[SampleEntry]:
    """Per-sample tables and manifests of (sample, modality, patient, label) under ``folder``."""
    rng = np.random.default_rng(seed)
    entries = []
    for sample, modality, patient, label in samples:
        base = folder / modality / sample
        (base / ("tiles" if modality == "wsi" else "patches")).mkdir(parents=True, exist_ok=True)
        if modality == "wsi":
            table = base / "tiles" / "tiles.parquet"
            if not table.exists():
                writers.write_table(_wsi_table(sample, tiles, rng), table)
            artifacts = [{"name": "tiles/tiles.parquet", "path": str(table)}]
            pre_artifacts = []
        else:
            table = base / "patches" / "patches.parquet"
            if not table.exists():
                _ct_table(patches, table)
            artifacts = [{"name": "patches/patches.parquet", "path": str(table)}]
            pre_artifacts = [{"name": "preprocess/volume.nii.gz", "path": str(base / "v.nii.gz")}]
        summary = {"status": "ok", "warnings": [], "candidates": tiles}
        atomic.write_json(
            base / "tile.json", {"step": "tile", "artifacts": artifacts, "summary": summary}
        )
        atomic.write_json(base / "preprocess.json", {"artifacts": pre_artifacts, "summary": {}})
        entries.append(
            SampleEntry(
                sample,
                modality,
                str(base / "tile.json"),
                str(base / "preprocess.json"),
                label=label,
                patient=patient,
                meta={"meta_site": "A" if len(entries) % 2 else "B"},
            )
        )
    return entries
