"""Inputs named in the sheet that do not exist are found before any job: one summary line,
the whole list in a file, a failure record per sample (the cohort table lists it), and the
other samples run; or the run stops there (``missing_inputs: stop``). Local paths and
``s3://`` locations (a real moto_server process)."""

from __future__ import annotations

import csv
import json
import os

import pytest
from s3_support import create_bucket, raw_client, use_test_credentials
from workflow_support import run_snakemake, write_config, write_samples

from medprep import storage
from medprep.workflow import parse

GOOD = [("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff")]


def table(rows: dict[str, dict]) -> dict[str, dict]:
    return {name: {"modality": "ct", "annotations": None, **row} for name, row in rows.items()}


def test_missing_local_files_and_folders_are_found_with_one_stat_each(tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here.csv").write_text("x")
    samples = table(
        {
            "ok": {"uri": str(tmp_path / "here"), "annotations": str(tmp_path / "here.csv")},
            "no-folder": {"uri": str(tmp_path / "gone")},
            "no-file": {"uri": str(tmp_path / "gone.svs"), "modality": "wsi"},
            "no-labels": {"uri": str(tmp_path / "here"), "annotations": str(tmp_path / "x.csv")},
        }
    )
    found = parse.missing_inputs(samples, {})
    assert [(m["sample"], m["column"], m["cause"]) for m in found] == [
        ("no-folder", "uri", "does not exist"),
        ("no-file", "uri", "does not exist"),
        ("no-labels", "annotations", "does not exist"),
    ]
    assert found[1]["modality"] == "wsi" and found[1]["path"] == str(tmp_path / "gone.svs")


@pytest.fixture
def bucket(moto_server, tmp_path, monkeypatch):
    credentials = use_test_credentials(tmp_path, monkeypatch)
    name = create_bucket(moto_server, credentials)
    raw_client(moto_server.url, credentials).put_object(Bucket=name, Key="ct/S1/1.dcm", Body=b"x")
    yield name
    storage.clear_caches()


def test_s3_inputs_are_checked_with_the_listing_the_fingerprints_use(moto_server, bucket):
    settings = {"endpoint_url": moto_server.url, "region": "us-east-1"}
    samples = table(
        {
            "S1": {"uri": f"s3://{bucket}/ct/S1/"},
            "S2": {"uri": f"s3://{bucket}/ct/S2/"},
            "S3": {"uri": "s3://medprep-no-such-bucket-here/ct/S3/"},
        }
    )
    storage.expect_sources([row["uri"] for row in samples.values()], settings)
    found = parse.missing_inputs(samples, settings)
    assert [m["sample"] for m in found] == ["S2", "S3"]
    assert found[0]["cause"] == "no object at this location (or no such bucket)"
    # the fingerprint the check computed is the one the download job gets, not listed again
    fingerprint = storage.source_fingerprint(samples["S1"]["uri"], settings)
    assert parse.source_fingerprint(samples["S1"]["uri"], settings, sample="S1") == fingerprint


# ---------------------------------------------------------------- through the workflow


def missing_rows(count: int) -> list[tuple[str, str, str]]:
    return [
        (
            f"lost-{n:04d}",
            "ct" if n % 2 else "wsi",
            f"data/lost/{n:04d}" + ("" if n % 2 else ".svs"),
        )
        for n in range(count)
    ]


@pytest.mark.slow
def test_samples_with_missing_inputs_fail_without_a_job_and_the_others_run(workdir):
    write_samples(workdir, [*GOOD, *missing_rows(7)])
    write_config(workdir)

    run = run_snakemake(workdir)

    lines = [line for line in run.stderr.splitlines() if "do not exist" in line]
    assert lines == [
        "medprep: 7 of 8 samples name inputs that do not exist: lost-0000 (uri "
        "data/lost/0000.svs), lost-0001 (uri data/lost/0001), lost-0002 (uri "
        "data/lost/0002.svs) and 4 more (all of them: logs/missing_inputs/samples.tsv); "
        "they are not run and the cohort table lists them as failed, the other 1 run "
        "(missing_inputs: stop stops the run instead)"
    ]
    assert run.samples() == {"synthetic-01"}, "no job for a sample whose input is missing"
    with open(workdir / "logs/missing_inputs/samples.tsv", newline="") as f:
        listed = list(csv.DictReader(f, delimiter="\t"))
    assert [row["sample"] for row in listed] == [name for name, _, _ in missing_rows(7)]
    assert listed[1] == {
        "sample": "lost-0001",
        "modality": "ct",
        "column": "uri",
        "path": "data/lost/0001",
        "cause": "does not exist",
    }
    with open(workdir / "results/cohort/samples/cohort.csv", newline="") as f:
        cohort = {row["sample"]: row for row in csv.DictReader(f)}
    assert cohort["synthetic-01"]["status"] == "ok"
    assert cohort["lost-0003"]["status"] == "failed"
    assert cohort["lost-0003"]["failed_step"] == "download"
    assert cohort["lost-0003"]["cause"] == (
        "sample lost-0003: file data/lost/0003: uri: does not exist"
    )
    assert "7 failed" in run.stdout
    index = json.loads((workdir / "published/dataset/samples/manifest.json").read_text())
    assert index["counts"]["samples"] == 1

    # the input appears: that sample runs, and its failure record goes
    (workdir / "data/lost").mkdir()
    os.symlink(workdir / "data/ct/phantom-chest-01", workdir / "data/lost/0001")
    rerun = run_snakemake(workdir)
    assert rerun.samples() == {"lost-0001"}
    assert not (workdir / "logs/failures/lost-0001.download.json").exists()
    assert "6 of 8 samples name inputs that do not exist" in rerun.stderr

    write_samples(workdir, GOOD)  # a sheet without missing inputs: no stale list
    run_snakemake(workdir)
    assert not (workdir / "logs/missing_inputs/samples.tsv").exists()


@pytest.mark.slow
def test_missing_inputs_stop_the_run_before_any_job_when_asked(workdir):
    write_samples(workdir, [*GOOD, *missing_rows(2)])
    write_config(workdir)

    # as docs/incoming-publishing.md shows it
    run = run_snakemake(workdir, "--config", "missing_inputs=stop", check=False)

    assert run.returncode == 1 and run.jobs == []
    errors = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
    assert errors == [
        "medprep error: 2 of 3 samples name inputs that do not exist: lost-0000 (uri "
        "data/lost/0000.svs), lost-0001 (uri data/lost/0001) (all of them: "
        "logs/missing_inputs/samples.tsv); nothing was run (missing_inputs: stop)"
    ]
    assert 'File "' not in run.stderr and "Traceback" not in run.stderr
    assert not (workdir / "results").exists()


def test_a_discovery_folder_that_does_not_exist_stops_in_one_line(tmp_path, capsys):
    import pandas as pd

    config = {"storage": {"discover": [{"uri": str(tmp_path / "none"), "modality": "ct"}]}}
    with pytest.raises(SystemExit) as stopped:
        parse.with_discovered(pd.DataFrame(), config, main_process=True)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        f"medprep error: storage.discover: file {tmp_path / 'none'}: discovery folder does "
        "not exist\n"
    )
