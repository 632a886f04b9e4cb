"""A run killed with SIGKILL in the middle of a tiling job: nothing of the sample looks
finished, and after `--unlock` the rerun completes with the outputs of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workflow_support import (
    run_snakemake,
    snakemake_command,
    tree_digest,
    write_config,
    write_samples,
)
from wsi_support import CMU

from medprep.demo.synthetic_slide import write_synthetic_slide
from medprep.workflow import runner

pytestmark = pytest.mark.slow

SAMPLE = "big-slide"
# Level 0 at 0.25 um/px, tiled at that resolution: ~2,500 candidate tiles, several seconds
# of tiling, long enough to be killed in the middle.
SLIDE_SIZE, SLIDE_MPP = 8192, 0.25
SETTINGS = {
    "wsi": {
        "resolution": {"mpp": SLIDE_MPP},
        "tile": {"size": 128, "shard_max_tiles": 500, "block_tiles": 4},
    }
}
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slide_workdir(tmp_path_factory) -> Path:
    """A working directory with one large synthetic slide, not run yet (copied per run)."""
    workdir = tmp_path_factory.mktemp("big-slide")
    (workdir / "data").mkdir()
    write_synthetic_slide(
        workdir / "data" / "big.svs",
        SLIDE_SIZE,
        SLIDE_SIZE,
        texture_slide=CMU,
        mpp=SLIDE_MPP,
        tissue_fraction=0.5,
        seed=3,
    )
    write_samples(workdir, [(SAMPLE, "wsi", "data/big.svs")])
    write_config(workdir, **SETTINGS)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(slide_workdir, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    shutil.copytree(slide_workdir, workdir)
    run_snakemake(workdir)
    return workdir


def tiles_being_written(workdir: Path) -> bool:
    """The tiling job has written tiles into its temporary pixel folder."""
    tile_folder = workdir / "results" / "wsi" / SAMPLE / "tiles"
    try:
        return any(
            entry.stat().st_size > 0
            for staging in tile_folder.glob(".pixels.tmp-*")
            for entry in staging.iterdir()
        )
    except FileNotFoundError:  # renamed into place between the listing and the look
        return False


def run_and_kill_while_tiling(workdir: Path) -> None:
    """Start the workflow in its own process group; SIGKILL the group in mid-tiling."""
    command = snakemake_command(workdir)
    with open(workdir / "killed-run.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not tiles_being_written(workdir):
                if process.poll() is not None:
                    raise AssertionError("the run ended before the tiling job could be killed")
                if time.monotonic() > deadline:
                    raise AssertionError("the tiling job did not start in time")
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # Snakemake, the job and its workers
            process.wait()


def test_killed_tiling_rerun_completes_with_identical_outputs(
    slide_workdir, uninterrupted, tmp_path
):
    workdir = tmp_path / "killed"
    shutil.copytree(slide_workdir, workdir)
    run_and_kill_while_tiling(workdir)

    results = workdir / "results" / "wsi" / SAMPLE
    assert (results / "preprocess.json").exists()  # the steps before tiling had finished
    assert not (results / "tile.json").exists()
    assert not (results / "upload.json").exists()
    assert not (workdir / "published" / "wsi" / SAMPLE / "manifest.json").exists()

    # Snakemake's lock survives SIGKILL: the next run stops with the message docs/failures.md
    # explains, and `--unlock` (what a user then does) releases it.
    locked = run_snakemake(workdir, check=False)
    assert locked.returncode != 0 and "Directory cannot be locked" in locked.stderr
    run_snakemake(workdir, "--unlock")

    rerun = run_snakemake(workdir)
    assert rerun.ran() == {("tile_wsi", SAMPLE), ("upload", SAMPLE)}
    published = "published/wsi/" + SAMPLE
    assert tree_digest(workdir / published) == tree_digest(uninterrupted / published)
    assert not [p for p in results.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_a_job_removes_the_temporaries_of_its_killed_attempt(tmp_path):
    tile = tmp_path / "tiles"
    (tile / ".pixels.tmp-123-abcd1234").mkdir(parents=True)
    (tile / ".pixels.tmp-123-abcd1234" / "shard-000000.tar").write_bytes(b"x")
    (tile / ".tiles.tmp-123-abcd1234.parquet").write_bytes(b"x")
    (tile / "kept.txt").write_text("not a temporary")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".a.tmp-1-ffffffff.json").write_text("{}")  # not an output folder

    removed = runner.remove_leftovers([str(tile / "tiles.parquet"), str(tile / "overlay.png")])
    assert removed == 2
    assert [p.name for p in tile.iterdir()] == ["kept.txt"]
    assert (tmp_path / "other" / ".a.tmp-1-ffffffff.json").exists()
