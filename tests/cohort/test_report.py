"""The quality report: the commands docs/running.md shows build it; its QC pictures and cohort
table are there and load in a real browser; it still builds after a run with failed
samples, whose cohort table lists them; a later run rebuilds that table."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SAMPLES
from PIL import Image
from report_support import Chromium, find_chromium, report_data, show_category, show_result
from workflow_support import REPO, copy_workdir, run_snakemake, write_config, write_samples

from medprep.cohort import html as cohort_html
from medprep.cohort import plot as cohort_plot
from medprep.cohort import table as cohort

MODALITY = {sample: modality for sample, modality, _ in TINY_SAMPLES}
PICTURES = {"wsi": "tiles/overlay.png", "ct": "preprocess/qc.png"}
CATEGORY = {"wsi": "Slides", "ct": "CT scans"}


def readme_report_commands() -> list[list[str]]:
    """The snakemake command lines of the report section of docs/running.md, without the program."""
    page = (REPO / "docs" / "running.md").read_text()
    section = page.split("## Quality report", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line.split() for block in blocks for line in block.splitlines()]
    commands = [c for c in commands if c and c[0].endswith("snakemake")]
    assert commands, "the report section of docs/running.md shows no snakemake command"
    return [c[1:] for c in commands]


def read_cohort(workdir: Path) -> dict[str, dict[str, str]]:
    with open(workdir / "results" / "cohort" / "samples" / "cohort.csv", newline="") as f:
        return {row["sample"]: row for row in csv.DictReader(f)}


def decoded(data_uri: str) -> bytes:
    return base64.b64decode(data_uri.split(",", 1)[1])


# ---- after a complete run


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_data) -> Path:
    """A working directory after a complete run and the documented report commands."""
    workdir = tmp_path_factory.mktemp("reported")
    shutil.copytree(tiny_data, workdir / "data")
    write_samples(workdir, TINY_SAMPLES)
    write_config(workdir)
    run_snakemake(workdir)
    for command in readme_report_commands():
        run_snakemake(workdir, *command)
    return workdir


@pytest.mark.slow
def test_report_holds_each_samples_picture_under_its_modality(reported):
    results, categories = report_data(reported / "report.html")
    assert set(categories) == {"Slides", "CT scans", "Cohort"}
    for modality, category in CATEGORY.items():
        paths = [p for sub in categories[category].values() for p in sub]
        samples = {results[p]["labels"]["sample"] for p in paths}
        assert samples == {s for s, m in MODALITY.items() if m == modality}
        for path in paths:
            sample = results[path]["labels"]["sample"]
            picture = reported / "results" / modality / sample / PICTURES[modality]
            assert decoded(results[path]["data_uri"]) == picture.read_bytes()


@pytest.mark.slow
def test_report_holds_the_cohort_table_and_plot(reported):
    results, categories = report_data(reported / "report.html")
    cohort_files = {Path(p).name: results[p] for p in categories["Cohort"]["Other"]}
    assert set(cohort_files) == {"cohort.csv", "cohort.html", "cohort.png"}
    table = decoded(cohort_files["cohort.csv"]["data_uri"]).decode()
    rows = list(csv.DictReader(table.splitlines()))
    assert [row["sample"] for row in rows] == [s for s, _, _ in TINY_SAMPLES]
    assert {row["status"] for row in rows} == {"ok"}
    page = decoded(cohort_files["cohort.html"]["data_uri"]).decode()
    assert all(f">{sample}<" in page for sample in MODALITY)
    with Image.open(reported / "results" / "cohort" / "samples" / "cohort.png") as plot:
        assert plot.width == cohort_plot.WIDTH and plot.height > cohort_plot.HEADER


@pytest.mark.slow
def test_cohort_table_carries_each_samples_numbers(reported):
    rows = read_cohort(reported)
    for sample, modality in MODALITY.items():
        folder = reported / "results" / modality / sample
        tile = json.loads((folder / "tile.json").read_text())["summary"]
        preprocess = json.loads((folder / "preprocess.json").read_text())["summary"]
        row = rows[sample]
        assert row["status"] == "ok" and float(row["runtime_s"]) > 0
        if modality == "wsi":
            assert int(row["kept"]) == tile["tiles"]
            assert float(row["tissue_area_mm2"]) == preprocess["tissue_area_mm2"]
            assert row["resolution_source"] == "metadata"
        else:
            assert int(row["kept"]) == tile["patches"]
            assert float(row["lung_volume_ml"]) == preprocess["lung_volume_ml"]
            assert row["resolution_source"] == "dicom"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run does)")
    folder = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(executable, folder / "profile", folder / "chromium.log")
    yield chromium
    chromium.close()


@pytest.mark.slow
def test_report_pictures_load_in_chromium(reported, browser, tmp_path):
    report = reported / "report.html"
    browser.open_page(report.as_uri())
    browser.wait_for("document.readyState === 'complete' && typeof app !== 'undefined'")
    _, categories = report_data(report)
    shown = [item for category in categories for item in show_category(browser, category)]

    pictures = [item for item in shown if item["mime"] == "image/png"]
    expected = {f"results/{m}/{s}/{PICTURES[m]}" for s, m in MODALITY.items()}
    assert {item["path"] for item in pictures} == expected | {"results/cohort/samples/cohort.png"}
    for item in pictures:  # decoded by the browser, at the size of the file on disk
        with Image.open(reported / item["path"]) as image:
            assert (item["width"], item["height"]) == image.size, item
    tables = [item for item in shown if item["mime"] == "text/html"]
    assert [item["path"] for item in tables] == ["results/cohort/samples/cohort.html"]
    assert tables[0]["iframe"] > 100  # shown in a frame of the page, not an empty box

    show_result(browser, "Slides", "CMU-1-Small-Region")
    shot = np.asarray(Image.open(browser.screenshot(tmp_path / "slide.png")).convert("RGB"))
    overlay_green = (shot[..., 1] > 150) & (shot[..., 0] < 60) & (shot[..., 2] < 60)
    assert overlay_green.sum() > 200  # the kept tiles' outlines are on screen
    print(f"screenshot: {tmp_path / 'slide.png'}")


# ---- after a run with a failed sample


@pytest.fixture(scope="module")
def partly_failed(tmp_path_factory, tiny_data) -> Path:
    """A run of two good slides and one empty file named like a slide."""
    workdir = tmp_path_factory.mktemp("partly-failed")
    (workdir / "data").mkdir()
    for name in ("CMU-1-Small-Region.svs", "synthetic-01.tiff"):
        shutil.copy(tiny_data / "wsi" / name, workdir / "data" / name)
    (workdir / "data" / "broken.svs").write_bytes(b"")
    write_samples(
        workdir,
        [
            ("CMU-1-Small-Region", "wsi", "data/CMU-1-Small-Region.svs"),
            ("synthetic-01", "wsi", "data/synthetic-01.tiff"),
            ("broken", "wsi", "data/broken.svs"),
        ],
    )
    write_config(workdir)
    run = run_snakemake(workdir, check=False)
    assert run.returncode != 0
    assert "some samples failed; cohort table with their causes" in run.stderr
    return workdir


@pytest.mark.slow
def test_table_written_after_failures_lists_them(partly_failed):
    rows = read_cohort(partly_failed)
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["cause"].startswith("sample broken: file ")
    assert rows["broken"]["cause"].endswith("broken.svs: empty file (0 bytes)")
    assert rows["CMU-1-Small-Region"]["status"] == "ok"
    assert rows["synthetic-01"]["status"] == "ok"


@pytest.mark.slow
def test_report_builds_after_a_partly_failed_run(partly_failed, tmp_path):
    workdir = copy_workdir(partly_failed, tmp_path / "copy")
    for command in readme_report_commands():
        run_snakemake(workdir, *command)
    results, categories = report_data(workdir / "report.html")
    slides = {results[p]["labels"]["sample"] for p in categories["Slides"]["Other"]}
    assert slides == {"CMU-1-Small-Region", "synthetic-01"}
    table = next(p for p in categories["Cohort"]["Other"] if p.endswith(".csv"))
    assert "sample broken: file " in decoded(results[table]["data_uri"]).decode()


@pytest.mark.slow
def test_fixed_input_reruns_that_sample_and_rebuilds_the_table(partly_failed, tmp_path):
    workdir = copy_workdir(partly_failed, tmp_path / "copy")
    shutil.copy(workdir / "data" / "synthetic-01.tiff", workdir / "data" / "broken.svs")
    run = run_snakemake(workdir)
    assert run.samples() == {"broken"}
    assert ("cohort", {}) in run.jobs
    assert {row["status"] for row in read_cohort(workdir).values()} == {"ok"}


@pytest.mark.slow
def test_removing_the_failed_sample_rebuilds_the_table(partly_failed, tmp_path):
    workdir = copy_workdir(partly_failed, tmp_path / "copy")
    write_samples(
        workdir,
        [
            ("CMU-1-Small-Region", "wsi", "data/CMU-1-Small-Region.svs"),
            ("synthetic-01", "wsi", "data/synthetic-01.tiff"),
        ],
    )
    run = run_snakemake(workdir)
    assert run.ran() == set()  # nothing but the table (and the target) is rebuilt
    assert ("cohort", {}) in run.jobs
    assert set(read_cohort(workdir)) == {"CMU-1-Small-Region", "synthetic-01"}


@pytest.mark.slow
def test_summary_command_counts_by_status_and_names_the_report(partly_failed):
    (partly_failed / "report.html").write_text("<html></html>")  # only its path is printed
    printed = subprocess.run(
        [sys.executable, "-m", "medprep.cohort.table", "--report", "report.html"],
        cwd=partly_failed,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.splitlines()[0] == "3 samples: 2 ok, 1 failed"
    assert "broken: file " in printed and "empty file (0 bytes)" in printed
    assert f"report: {partly_failed / 'report.html'}" in printed
    assert (
        f"cohort table: {partly_failed / 'results' / 'cohort' / 'samples' / 'cohort.html'}"
        in printed
    )


# ---- the table, page and plot on their own


def row(sample: str, modality: str = "wsi", status: str = "ok", **values) -> dict:
    base = {column: None for column in cohort.COLUMNS}
    return {**base, "sample": sample, "modality": modality, "status": status, **values}


def test_summary_names_each_destination_as_written_s3_uris_included():
    rows = [
        {"sample": s, "modality": "ct", "status": "ok", "cause": None, "kept": 3, "published": p}
        for s, p in (
            ("A", "s3://bucket/out/ct/A/"),
            ("B", "s3://bucket/out/ct/B"),
            ("C", "/data/published/ct/C"),
            ("D", "published/ct/D"),
        )
    ]
    summary = cohort.text_summary(rows)
    assert "published to: /data/published, published, s3://bucket/out" in summary.splitlines()


def test_outliers_are_zeros_and_values_beyond_the_fences():
    values = {f"s{i}": 100.0 + i for i in range(10)} | {"zero": 0.0, "huge": 1000.0}
    assert cohort_plot.outliers(values) == {"zero", "huge"}
    # three values have no meaningful quartiles: only zeros are flagged
    assert cohort_plot.outliers({"a": 1.0, "b": 50.0, "c": 0.0}) == {"c"}


def test_plot_marks_outliers_in_red_only_when_there_are_some():
    def red_pixels(rows):
        pixels = np.asarray(cohort_plot.render_plot(rows).convert("RGB")).astype(int)
        legend = cohort_plot.HEADER  # the legend shows one red dot
        body = pixels[legend:]
        return int(((body[..., 0] > 180) & (body[..., 1] < 110) & (body[..., 2] < 110)).sum())

    typical = [row(f"s{i}", kept=100 + i, tissue_area_mm2=10.0 + i) for i in range(8)]
    assert red_pixels(typical) == 0
    assert red_pixels([*typical, row("empty-slide", kept=0, tissue_area_mm2=10.0)]) > 20


def test_page_escapes_causes_and_lists_failures_first():
    rows = [
        row("good", kept=3),
        row("bad", status="failed", failed_step="preprocess", cause="file <x>.svs: broken"),
    ]
    page = cohort_html.render_html(rows)
    assert "file &lt;x&gt;.svs: broken" in page and "<x>" not in page
    assert page.index("Failures (1)") < page.index("All samples")


def test_failure_newer_than_the_last_upload_is_the_status(tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    folder = results / "wsi" / "S"
    folder.mkdir(parents=True)
    (folder / "upload.json").write_text(json.dumps({"destination": "out/wsi/S"}))
    (logs / "failures").mkdir(parents=True)
    record = logs / "failures" / "S.preprocess.json"
    record.write_text(json.dumps({"step": "preprocess", "message": "sample S: bad"}))
    older, newer = 1_700_000_000, 1_700_000_100
    for path, when in ((folder / "upload.json", older), (record, newer)):
        os.utime(path, (when, when))
    assert cohort.sample_row("S", "wsi", results, logs)["status"] == "failed"
    os.utime(record, (older - 100, older - 100))  # an old failure, fixed since
    assert cohort.sample_row("S", "wsi", results, logs)["status"] == "ok"


def test_summary_of_a_large_cohort_lists_only_the_problems():
    rows = [row(f"s{i:03d}", kept=10) for i in range(200)]
    rows[17] = row("s017", status="failed", failed_step="download", cause="sample s017: gone")
    rows[42] = row("s042", modality="ct", status="no_lungs", kept=0)
    lines = cohort.text_summary(rows, report="results/report.html").splitlines()
    assert lines[0] == "200 samples: 198 ok, 1 failed, 1 no_lungs"
    assert [line.split()[0] for line in lines[1:3]] == ["s017", "s042"]
    assert "download: sample s017: gone" in lines[1]
    assert lines[-1] == "report: results/report.html"
