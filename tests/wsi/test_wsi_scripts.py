"""The two rule scripts run by Snakemake itself, through a throwaway Snakefile that gives
them exactly what the workflow's rules give (the end-to-end workflow is tested elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from wsi_support import CMU, write_download

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

SNAKEFILE = """
SAMPLES = {samples!r}

rule all:
    input: expand("results/wsi/{{sample}}/tile.json", sample=SAMPLES)

rule preprocess_wsi:
    input: manifest="results/wsi/{{sample}}/download.json"
    output:
        mask="results/wsi/{{sample}}/preprocess/mask.png",
        thumbnail="results/wsi/{{sample}}/preprocess/thumbnail.png",
        summary="results/wsi/{{sample}}/preprocess/summary.json",
        manifest="results/wsi/{{sample}}/preprocess.json",
    params:
        resolution={{"mpp": 1.0}},
        tissue={{"mask_mpp": 8.0}},
        limits={{"max_pixels": 1e9}},
        max_read_errors=0,
        mpp_override=None,
    threads: 2
    log: "logs/preprocess_wsi/{{sample}}.log"
    script: "{scripts}/preprocess_wsi.py"

rule tile_wsi:
    input:
        download="results/wsi/{{sample}}/download.json",
        preprocess="results/wsi/{{sample}}/preprocess.json",
    output:
        table="results/wsi/{{sample}}/tiles/tiles.parquet",
        overlay="results/wsi/{{sample}}/tiles/overlay.png",
        summary="results/wsi/{{sample}}/tiles/summary.json",
        patches="results/wsi/{{sample}}/tiles/{{sample}}_patches.h5",
        manifest="results/wsi/{{sample}}/tile.json",
    params:
        tile={{"size": 128, "block_tiles": 2, "shard_max_tiles": 20}},
    threads: 2
    log: "logs/tile_wsi/{{sample}}.log"
    script: "{scripts}/tile_wsi.py"
"""


def run_workflow(folder: Path, samples: list[str]) -> subprocess.CompletedProcess:
    (folder / "Snakefile").write_text(SNAKEFILE.format(samples=samples, scripts=REPO / "scripts"))
    return subprocess.run(
        [SNAKEMAKE, "--cores", "2", "--keep-going", "--nolock"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_scripts_run_under_snakemake_and_a_bad_slide_fails_alone(tmp_path):
    good = tmp_path / "results" / "wsi" / "GOOD"
    bad = tmp_path / "results" / "wsi" / "BAD"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    write_download(good, CMU)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    write_download(bad, empty)

    run = run_workflow(tmp_path, ["GOOD", "BAD"])
    assert run.returncode != 0  # BAD failed, GOOD went on (--keep-going)

    preprocess = json.loads((good / "preprocess.json").read_text())
    tiled = json.loads((good / "tile.json").read_text())
    assert preprocess["step"] == "preprocess" and preprocess["summary"]["mpp_source"] == "metadata"
    assert set(preprocess["summary"]) >= {
        "status",
        "warnings",
        "mpp",
        "mpp_source",
        "target_mpp",
        "level",
        "tissue_area_mm2",
        "tissue_mode",
        "dimensions",
        "vendor",
    }
    assert set(tiled["summary"]) >= {
        "status",
        "warnings",
        "tiles",
        "candidates",
        "rejected",
        "read_calls",
    }
    table = pd.read_parquet(good / "tiles" / "tiles.parquet")
    assert len(table) == tiled["summary"]["tiles"] > 20
    shards = sorted(p.name for p in (good / "tiles" / "pixels").iterdir())
    assert len(shards) > 1
    assert {f"tiles/pixels/{name}" for name in shards} <= {a["name"] for a in tiled["artifacts"]}
    # the pool's spawned workers re-import the script but do not run the step again
    log = (tmp_path / "logs" / "tile_wsi" / "GOOD.log").read_text()
    assert log.count("tile wsi: tile_wsi sample GOOD") == 1

    line = f"medprep error: sample BAD: file {empty}: empty file (0 bytes)"
    assert line in run.stderr
    failure = json.loads((tmp_path / "logs" / "failures" / "BAD.preprocess.json").read_text())
    assert failure["cause"] == "empty file (0 bytes)" and failure["file"] == str(empty)
    assert not (bad / "preprocess.json").exists() and not (bad / "preprocess").exists()
