"""The bad-input matrix at the workflow level: one run over a sheet of bad samples and two
good ones, with --keep-going (the default profile's setting).

Every bad sample either fails on its own, with one clear line in its job's log (sample,
file, cause), a failure record, a row in the cohort table and nothing that looks finished;
or takes its documented fallback and completes. The good samples complete and publish.
A bad sample sheet fails before any job runs, naming the line and the column.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from ct_support import (
    CT_3SLICE,
    CT_DUPLICATES,
    CT_SINGLE,
    CT_TILT,
    copy_folder,
    dicom_files,
    edited_copy,
    linked_copy,
    mixed_series_folder,
    truncated_copy,
)
from workflow_support import published_file, run_snakemake, write_config
from wsi_support import (
    CMU,
    CPTAC_DICOM,
    TCGA_NO_MPP,
    enormous_dimensions,
    hollow_slide,
    png_renamed,
    random_bytes,
    truncated_slide,
    zero_bytes,
)

pytestmark = pytest.mark.slow

STEPS = ("download", "preprocess", "tile", "upload")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# ---- CT inputs (folders), built from the real 3-slice series and the other test series


def ct_without_pixel_data(folder: Path) -> Path:
    copy_folder(CT_3SLICE, folder)
    broken = folder / "02.dcm"
    edited_copy(broken, broken, PixelData=None)
    return folder


def ct_truncated(folder: Path) -> Path:
    copy_folder(CT_3SLICE, folder)
    truncated_copy(CT_3SLICE / "03.dcm", folder / "03.dcm", 300_000)  # cut in the pixel data
    return folder


def mr_series(folder: Path) -> Path:
    folder.mkdir()
    for path in dicom_files(CT_3SLICE):
        edited_copy(path, folder / path.name, Modality="MR", SOPClassUID=MR_IMAGE_STORAGE)
    return folder


def ct_bad_number(keyword: str, value):
    """The good series with ``keyword`` of its middle slice set to the raw text ``value``,
    as a damaged or hostile file holds it (pydicom itself refuses to write nan or inf)."""

    def make(folder: Path) -> Path:
        copy_folder(CT_3SLICE, folder)
        path = folder / "02.dcm"
        ds = pydicom.dcmread(path)
        ds[keyword].value = value
        with pydicom.config.disable_value_validation():
            ds.save_as(path)
        return folder

    return make


def mixed_series(folder: Path) -> Path:
    return mixed_series_folder(folder)[0]


def single_slices(folder: Path) -> Path:
    return copy_folder(CT_SINGLE, folder)  # two single-slice series of two scans


def duplicate_slices(folder: Path) -> Path:
    return copy_folder(CT_DUPLICATES, folder)


def head_ct(folder: Path) -> Path:
    return copy_folder(CT_TILT, folder)


def slide_copy(source: Path):
    def make(folder: Path) -> Path:
        folder.mkdir()
        return Path(shutil.copyfile(source, folder / source.name))

    return make


def in_folder(make):
    """A slide generator of wsi_support, writing into its own new folder."""

    def build(folder: Path) -> Path:
        folder.mkdir()
        return make(folder)

    return build


def missing(folder: Path) -> Path:
    return folder / "scan-that-is-not-there.svs"


def ct_linked(target: str):
    """The good series plus a folder link to ``target`` (``.``: a loop; ``/etc``: outside)."""
    return lambda folder: linked_copy(CT_3SLICE, folder, target)


@dataclass(frozen=True)
class Case:
    modality: str
    make: object  # (folder) -> the sample's uri
    outcome: str  # "failed", or the documented status of a fallback
    step: str | None = None  # the step that fails
    cause: str = ""  # in the failure's one line, or in the warnings of a fallback
    mpp: str = ""  # the sample sheet's mpp column


CASES = {
    "zero-byte-file": Case("wsi", in_folder(zero_bytes), "failed", "preprocess", "empty file"),
    "truncated-slide": Case("wsi", in_folder(truncated_slide), "failed", "preprocess", "truncated"),
    "random-bytes-svs": Case(
        "wsi", in_folder(random_bytes), "failed", "preprocess", "not a whole-slide image format"
    ),
    "png-renamed-svs": Case(
        "wsi", in_folder(png_renamed), "failed", "preprocess", "a PNG image, not a whole-slide"
    ),
    "decompression-bomb": Case(
        "wsi", in_folder(enormous_dimensions), "failed", "preprocess", "refusing to read it"
    ),
    "hollow-slide": Case(
        "wsi", in_folder(hollow_slide), "failed", "preprocess", "holds no image data"
    ),
    "slide-coarser-than-target": Case(
        "wsi", slide_copy(CPTAC_DICOM), "failed", "preprocess", "finer than the slide's finest"
    ),
    "slide-without-mpp": Case(
        "wsi", slide_copy(TCGA_NO_MPP), "failed", "preprocess", "no resolution (microns per pixel)"
    ),
    "slide-without-mpp-sheet-mpp": Case("wsi", slide_copy(TCGA_NO_MPP), "ok", mpp="0.5"),
    "dicom-without-pixel-data": Case(
        "ct", ct_without_pixel_data, "failed", "preprocess", "no pixel data"
    ),
    "truncated-dicom": Case("ct", ct_truncated, "failed", "preprocess", "truncated file"),
    "mr-series-as-ct": Case("ct", mr_series, "failed", "preprocess", "modality MR (not CT)"),
    "mixed-series-and-localizer": Case("ct", mixed_series, "ok", cause="2 not DICOM, 1 localizer"),
    "ct-nan-slope": Case(
        "ct", ct_bad_number("RescaleSlope", "NaN"), "failed", "preprocess", "RescaleSlope nan"
    ),
    "ct-infinite-spacing": Case(
        "ct",
        ct_bad_number("PixelSpacing", ["inf", "0.8"]),
        "failed",
        "preprocess",
        "invalid PixelSpacing [inf, 0.8]",
    ),
    "single-slice-series": Case("ct", single_slices, "failed", "preprocess", "single slice"),
    "duplicate-slices": Case("ct", duplicate_slices, "ok", cause="duplicate"),
    "head-ct": Case("ct", head_ct, "no_lungs", cause="no lungs found"),
    "missing-file": Case("wsi", missing, "failed", "download", "does not exist"),
    "ct-symlink-loop": Case(
        "ct", ct_linked("."), "failed", "download", "symbolic link loop: leads back to"
    ),
    "ct-symlink-to-etc": Case(
        "ct", ct_linked("/etc"), "failed", "download", "symbolic link to /etc, a folder outside"
    ),
}
GOOD = {
    "good-slide": Case("wsi", slide_copy(CMU), "ok"),
    "good-ct": Case("ct", lambda folder: copy_folder(CT_3SLICE, folder), "ok"),
}


@dataclass
class MatrixRun:
    workdir: Path
    returncode: int
    stderr: str
    uris: dict[str, Path]
    cohort: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> MatrixRun:
    workdir = tmp_path_factory.mktemp("bad-input")
    inputs = workdir / "inputs"
    inputs.mkdir()
    rows, uris = [], {}
    for name, case in {**CASES, **GOOD}.items():
        uris[name] = case.make(inputs / name)
        rows.append(f"{name}\t{case.modality}\t{uris[name]}\t{case.mpp}\n")
    (workdir / "samples.tsv").write_text("sample\tmodality\turi\tmpp\n" + "".join(rows))
    write_config(workdir)
    run = run_snakemake(workdir, check=False)
    with open(workdir / "results" / "cohort" / "samples" / "cohort.csv", newline="") as f:
        cohort = {row["sample"]: row for row in csv.DictReader(f)}
    return MatrixRun(workdir, run.returncode, run.stderr, uris, cohort)


def job_log_name(name: str, case: Case) -> str:
    """The failing job's log, relative to the working directory (as Snakemake names it)."""
    if case.step in ("download", "upload"):  # rules shared by both modalities
        return f"logs/{case.step}/{case.modality}/{name}.log"
    return f"logs/{case.step}_{case.modality}/{name}.log"


def job_log(workdir: Path, name: str, case: Case) -> Path:
    return workdir / job_log_name(name, case)


def leftovers(folder: Path) -> list[str]:
    """Temporaries of our writers (``.name.tmp-*``/``.name.old-*``) under ``folder``."""
    if not folder.exists():
        return []
    return [
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp-" in p.name or ".old-" in p.name
    ]


def finished_files(folder: Path, steps: tuple[str, ...]) -> list[str]:
    """Files under the sample's results folder that belong to ``steps``."""
    found = []
    for step in steps:
        if (folder / f"{step}.json").exists():
            found.append(f"{step}.json")
        sub = folder / step
        if sub.is_dir():
            found += [str(p.relative_to(folder)) for p in sub.rglob("*") if p.is_file()]
    return found


def test_the_run_fails_overall_but_only_the_bad_samples_fail(matrix):
    assert matrix.returncode != 0  # failed samples make the run's status an error
    failed = {name for name, row in matrix.cohort.items() if row["status"] == "failed"}
    assert failed == {name for name, case in CASES.items() if case.outcome == "failed"}
    assert set(matrix.cohort) == set(CASES) | set(GOOD)


@pytest.mark.parametrize("name", list(GOOD))
def test_good_samples_complete_and_publish(matrix, name):
    case = GOOD[name]
    assert matrix.cohort[name]["status"] == "ok"
    manifest = matrix.workdir / "published" / case.modality / name / "manifest.json"
    assert json.loads(manifest.read_text())["sample"] == name


FAILING = [name for name, case in CASES.items() if case.outcome == "failed"]
FALLBACKS = [name for name, case in CASES.items() if case.outcome != "failed"]
# inputs that do not exist fail before any job (medprep.workflow.parse.skip_missing_inputs)
MISSING = ["missing-file"]
IN_A_JOB = [name for name in FAILING if name not in MISSING]


@pytest.mark.parametrize("name", MISSING)
def test_a_missing_input_fails_its_sample_before_any_job(matrix, name):
    case = CASES[name]
    path = matrix.uris[name]
    assert not job_log(matrix.workdir, name, case).exists(), "no job for it"
    assert f"sample={name}" not in matrix.stderr
    summary = [line for line in matrix.stderr.splitlines() if "do not exist" in line]
    assert len(summary) == 1 and f"{name} (uri {path})" in summary[0]
    record = json.loads(
        (matrix.workdir / "logs" / "failures" / f"{name}.{case.step}.json").read_text()
    )
    assert record["kind"] == "input" and record["cause"] == "uri: does not exist"
    row = matrix.cohort[name]
    assert row["status"] == "failed" and row["failed_step"] == case.step
    assert row["cause"] == f"sample {name}: file {path}: uri: does not exist"


@pytest.mark.parametrize("name", IN_A_JOB)
def test_bad_input_fails_its_sample_with_one_clear_line(matrix, name):
    case = CASES[name]
    path = matrix.uris[name]
    log = job_log(matrix.workdir, name, case).read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log  # one line: no traceback of an unexpected error
    line = errors[0]
    assert f"sample {name}: " in line and case.cause in line
    assert f"file {path}" in line  # the file itself, or the one file in the folder
    assert f"medprep error: sample {name}: " in matrix.stderr  # also on the console

    record = json.loads(
        (matrix.workdir / "logs" / "failures" / f"{name}.{case.step}.json").read_text()
    )
    assert record["step"] == case.step and case.cause in record["cause"]

    row = matrix.cohort[name]
    assert row["failed_step"] == case.step
    assert case.cause in row["cause"] and f"sample {name}" in row["cause"]


@pytest.mark.parametrize("name", IN_A_JOB)
def test_bad_input_costs_one_attempt(matrix, name):
    # every rule has `retries:`; a retry after bad input fails at once with the same line
    case = CASES[name]
    log = job_log(matrix.workdir, name, case).read_text()  # the last attempt's log
    assert "(input error, not retried)" in log and "thread(s)" not in log, log
    lines = [
        line
        for line in matrix.stderr.splitlines()
        if line.startswith(f"medprep error: sample {name}: ")
        and line.endswith(f"(log: {job_log_name(name, case)})")
    ]
    worked = [line for line in lines if "(input error, not retried)" not in line]
    assert len(worked) == 1 and len(lines) > 1, lines  # one attempt did the work


def test_no_log_of_the_run_holds_a_traceback(matrix):
    logs = [p for p in (matrix.workdir / "logs").rglob("*.log") if "Traceback" in p.read_text()]
    assert logs == []


def test_no_listing_left_the_sample_folder(matrix):
    manifests = (matrix.workdir / "results").rglob("download.json")
    paths = [f["path"] for m in manifests for f in json.loads(m.read_text())["files"]]
    assert paths and not [p for p in paths if p.startswith("/etc/")]


@pytest.mark.parametrize("name", FAILING)
def test_failed_sample_leaves_nothing_that_looks_finished(matrix, name):
    case = CASES[name]
    folder = matrix.workdir / "results" / case.modality / name
    from_failed_step = STEPS[STEPS.index(case.step) :]
    assert finished_files(folder, from_failed_step) == []
    assert leftovers(folder) == []
    published = matrix.workdir / "published" / case.modality / name
    assert not published.exists() or list(published.rglob("*")) == []


@pytest.mark.parametrize("name", FALLBACKS)
def test_documented_fallback_completes_with_its_status_and_warning(matrix, name):
    case = CASES[name]
    row = matrix.cohort[name]
    assert row["status"] == case.outcome
    assert case.cause in (row["warnings"] or "")
    folder = matrix.workdir / "published" / case.modality / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["steps"]["preprocess"]["status"] == case.outcome
    assert leftovers(matrix.workdir / "results" / case.modality / name) == []


def test_sheet_mpp_is_the_fallback_for_a_slide_without_resolution(matrix):
    row = matrix.cohort["slide-without-mpp-sheet-mpp"]
    assert row["resolution"] == "0.5" and row["resolution_source"] == "sample_sheet"
    assert int(row["kept"]) > 0


def test_head_ct_completes_with_no_patches(matrix):
    row = matrix.cohort["head-ct"]
    assert row["lung_volume_ml"] in ("0", "0.0") and row["kept"] == "0"


def test_cohort_html_lists_the_failures_with_their_causes(matrix):
    page = (matrix.workdir / "results" / "cohort" / "samples" / "cohort.html").read_text()
    failures = page.split("<h2>All samples</h2>")[0]
    assert f"Failures ({len(FAILING)})" in failures
    for name in FAILING:
        assert f"sample {name}: " in failures


def test_mixed_folder_takes_the_largest_series_and_records_the_other(matrix):
    folder = matrix.workdir / "published" / "ct" / "mixed-series-and-localizer"
    metadata = json.loads(published_file(folder, "preprocess/metadata.json").read_text())
    assert metadata["series"]["reason"] == "largest axial CT series (3 slices of 2 axial series)"
    assert [series["slices"] for series in metadata["other_series"]] == [2]


# ---- bad sample sheets fail before any job, naming the line and the column


@pytest.mark.parametrize(
    "rows,message",
    [
        (
            "A\twsi\tdata/a.svs\nA\tct\tdata/b/\n",
            "line 3 (sample 'A'), column 'sample': duplicate sample name 'A' (first on line 2)",
        ),
        ("A\twsi\tdata/a.svs\nB\tmri\tdata/b/\n", "line 3 (sample 'B'), column 'modality'"),
    ],
    ids=["duplicate-sample-name", "unknown-modality"],
)
def test_bad_sheet_fails_before_any_job(tmp_path, rows, message):
    (tmp_path / "samples.tsv").write_text("sample\tmodality\turi\n" + rows)
    write_config(tmp_path)
    run = run_snakemake(tmp_path, check=False)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("medprep error:")]
    assert len(errors) == 1 and message in errors[0]
    # one clean line: no frames of the Snakefile or of medprep under it
    assert 'File "' not in run.stderr and "SampleSheetError" not in run.stderr
    assert run.jobs == []
    assert not (tmp_path / "results").exists()
