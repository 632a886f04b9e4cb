"""`make run`, as the README shows it: demo data, the workflow, the report, the summary.

Runs in a copy of this checkout that shares the installed virtual environment (`make -o`
keeps make from reinstalling it); everything after the install is what a user gets.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from workflow_support import REPO, published_file

pytestmark = pytest.mark.slow

STAMP = ".venv/.medprep-installed"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The tracked files of this checkout, with .venv linked in."""
    target = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes((REPO / name).read_bytes())
    (target / ".venv").symlink_to(REPO / ".venv")
    if not (REPO / STAMP).exists():
        pytest.skip("the environment is not installed with `make setup`")
    return target


def make_run(checkout) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-o", STAMP, "run", "CORES=2"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_make_run_builds_the_demo_runs_it_and_prints_the_summary(checkout):
    run = make_run(checkout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    demo_samples = [
        line.split("\t")[:2]
        for line in (checkout / "demo" / "samples.tsv").read_text().splitlines()[1:]
    ]
    assert {modality for _, modality in demo_samples} == {"ct", "wsi"}
    assert f"{len(demo_samples)} samples: {len(demo_samples)} ok" in run.stdout
    for sample, modality in demo_samples:
        published = checkout / "results" / "published" / modality / sample / "manifest.json"
        assert json.loads(published.read_text())["sample"] == sample
    dataset = checkout / "results" / "published" / "dataset" / "samples"
    assert json.loads((dataset / "manifest.json").read_text())["counts"]["samples"] == len(
        demo_samples
    )
    import pandas as pd

    tiles = pd.read_parquet(published_file(dataset, "tiles.parquet"))
    patches = pd.read_parquet(published_file(dataset, "patches.parquet"))
    assert len(tiles) and len(patches)
    samples = pd.read_parquet(published_file(dataset, "samples.parquet"))
    assert (samples.groupby("patient")["split"].nunique() == 1).all()
    assert (checkout / "results" / "report.html").stat().st_size > 100_000
    assert f"report: {checkout / 'results' / 'report.html'}" in run.stdout


def test_second_make_run_redoes_nothing(checkout):
    before = (checkout / "demo" / "samples.tsv").stat().st_mtime_ns
    run = make_run(checkout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr
    assert (checkout / "demo" / "samples.tsv").stat().st_mtime_ns == before
