"""Runs of two sample sheets do not mix: each keeps its cohort table, dataset index and
report; a sample in both sheets is computed once; a report of a run that never ran stops
with one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from report_support import report_data
from workflow_support import run_snakemake, write_config

from medprep.data import dataset_runs, open_dataset
from medprep.workflow import parse as workflow

SLIDES = {"synthetic-01": "synthetic-01.tiff", "CMU-1-Small-Region": "CMU-1-Small-Region.svs"}


def write_sheet(workdir: Path, name: str, samples: list[str]) -> None:
    rows = "".join(f"{s}\twsi\tdata/{SLIDES[s]}\n" for s in samples)
    (workdir / name).write_text("sample\tmodality\turi\n" + rows)


def cohort_samples(workdir: Path, run: str) -> list[str]:
    with open(workdir / "results" / "cohort" / run / "cohort.csv", newline="") as f:
        return [row["sample"] for row in csv.DictReader(f)]


def report_samples(report: Path) -> tuple[set[str], list[str]]:
    """The samples of the report's slide pictures, and those of its cohort table."""
    results, categories = report_data(report)
    pictures = {results[p]["labels"]["sample"] for p in categories["Slides"]["Other"]}
    (table,) = [p for p in categories["Cohort"]["Other"] if p.endswith(".csv")]
    assert table.startswith("results/cohort/")
    with open(report.parent / table, newline="") as f:
        return pictures, [row["sample"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data) -> Path:
    """Sheet first.tsv (one slide), then second.tsv (that slide and another)."""
    workdir = tmp_path_factory.mktemp("two-runs")
    (workdir / "data").mkdir()
    for name in SLIDES.values():
        shutil.copy(tiny_data / "wsi" / name, workdir / "data" / name)
    write_sheet(workdir, "first.tsv", ["synthetic-01"])
    write_sheet(workdir, "second.tsv", ["synthetic-01", "CMU-1-Small-Region"])
    write_config(workdir, samples="first.tsv")
    run_snakemake(workdir)
    second = run_snakemake(workdir, "--config", "samples=second.tsv")
    # the shared sample is computed once, by the first run
    assert second.samples() == {"CMU-1-Small-Region"}
    run_snakemake(workdir, "--report", "first.html")
    run_snakemake(workdir, "--report", "second.html", "--config", "samples=second.tsv")
    return workdir


@pytest.mark.slow
def test_two_sheets_keep_two_cohort_tables(two_runs):
    assert cohort_samples(two_runs, "first") == ["synthetic-01"]
    assert cohort_samples(two_runs, "second") == ["synthetic-01", "CMU-1-Small-Region"]
    assert (two_runs / "logs" / "cohort" / "first.log").is_file()
    assert (two_runs / "logs" / "cohort" / "second.log").is_file()


@pytest.mark.slow
def test_each_report_shows_its_own_runs_cohort_and_pictures(two_runs):
    assert report_samples(two_runs / "first.html") == ({"synthetic-01"}, ["synthetic-01"])
    pictures, table = report_samples(two_runs / "second.html")
    assert pictures == set(table) == {"synthetic-01", "CMU-1-Small-Region"}


@pytest.mark.slow
def test_each_run_publishes_its_own_dataset_index(two_runs):
    published = two_runs / "published"
    assert dataset_runs(published) == ["first", "second"]
    for run, count in (("first", 1), ("second", 2)):
        manifest = json.loads((published / "dataset" / run / "manifest.json").read_text())
        assert manifest["counts"]["samples"] == count and manifest["run"] == run
        assert len(open_dataset(published, run=run).samples) == count
    with pytest.raises(ValueError, match=r"several runs \(first, second\): pass run="):
        open_dataset(published)


@pytest.mark.slow
def test_a_configured_run_name_scopes_the_cohort_and_computes_nothing_again(two_runs):
    named = run_snakemake(two_runs, "--config", "samples=first.tsv", "run_name=trial")
    assert named.ran() == set() and ("cohort", {}) in named.jobs
    assert cohort_samples(two_runs, "trial") == ["synthetic-01"]
    assert (two_runs / "published" / "dataset" / "trial" / "manifest.json").is_file()


@pytest.mark.slow
def test_report_of_a_run_without_outputs_stops_in_one_line(two_runs):
    write_sheet(two_runs, "third.tsv", ["CMU-1-Small-Region"])
    report = run_snakemake(
        two_runs, "--report", "third.html", "--config", "samples=third.tsv", check=False
    )
    assert report.returncode != 0 and not (two_runs / "third.html").exists()
    (line,) = [x for x in report.stderr.splitlines() if x.startswith("medprep error")]
    assert "no cohort table for run 'third'" in line and "first, second" in line
    assert "Traceback" not in report.stderr


def test_run_name_is_the_sheets_stem_or_the_configured_safe_name(capsys):
    assert workflow.run_name({"samples": "sheets/cohort-A.tsv"}) == "cohort-A"
    assert workflow.run_name({"samples": "a.tsv", "run_name": "trial.2"}) == "trial.2"
    with pytest.raises(SystemExit):
        workflow.run_name({"samples": "my sheet.tsv"})
    assert "set run_name" in capsys.readouterr().err
    assert workflow.cohort_outputs("a")["table"] == "results/cohort/a/cohort.csv"
    assert workflow.building_report(["snakemake", "--report", "r.html"])
    assert not workflow.building_report(["snakemake", "--cores", "2"])
