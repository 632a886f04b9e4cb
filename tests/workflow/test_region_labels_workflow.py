"""Region labels through the workflow, as docs/region-labels.md runs them:
its sample sheet and commands, annotation files fetched by their own jobs, labels in the
dataset index, and a changed annotation file rerunning only the tile step of its sample."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from ct_support import SLAB, XML, phantom_nodule
from workflow_support import REPO, copy_workdir, published_file, run_snakemake, write_config

pytestmark = pytest.mark.slow


def readme_section() -> str:
    text = (REPO / "docs" / "region-labels.md").read_text()
    return text.split("# Region labels", 1)[1].split("\n## ", 1)[0]


def readme_blocks() -> tuple[str, list[str]]:
    section = readme_section()
    sheet = re.search(r"```tsv\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    return sheet, commands


def run_readme_commands(workdir: Path, commands: list[str], *extra: str, check: bool = True):
    """The documented commands in ``workdir``: shell lines as they are, the snakemake line
    through the tests' runner (which adds the workflow's path and its test config)."""
    run = None
    for line in commands:
        words = shlex.split(line)
        if words[0].endswith("snakemake"):
            args = [w for w in words[1:] if w not in ("--cores", "all")]
            run = run_snakemake(workdir, *args, *extra, check=check)
        else:
            subprocess.run(["bash", "-c", line], cwd=workdir, check=True)
    return run


def series_uid(folder: Path) -> str:
    first = sorted(folder.glob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_data):
    sheet, commands = readme_blocks()
    workdir = tmp_path_factory.mktemp("labels")
    (workdir / "scans/LIDC-IDRI-0001").mkdir(parents=True)
    for dicom in SLAB.glob("*.dcm"):
        shutil.copy2(dicom, workdir / "scans/LIDC-IDRI-0001")
    (workdir / "labels/LIDC-IDRI-0001").mkdir(parents=True)
    shutil.copy2(XML, workdir / "labels/LIDC-IDRI-0001/069.xml")
    for name in ("chest-02", "chest-03"):
        shutil.copytree(tiny_data / "ct/phantom-chest-01", workdir / f"scans/{name}")
    # the demo phantom: shape (96, 96, 40), pixels 4 mm, slices 5 mm (tests/conftest.py)
    centre, diameter = phantom_nodule(96, 96, 40, 4.0, 5.0)
    uid = series_uid(workdir / "scans/chest-02")
    row = f"{uid},{centre[0]:.3f},{centre[1]:.3f},{centre[2]:.3f}"
    (workdir / "labels/chest-02.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{row},{diameter:.3f}\n"
    )
    (workdir / "labels/candidates.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,class\n{row},1\n1.2.3.4,0,0,0,0\n"
    )
    (workdir / "labelled.tsv").write_text(sheet)
    write_config(workdir)
    run = run_readme_commands(workdir, commands)
    return workdir, commands, run


def test_the_readme_commands_label_the_patches(labelled):
    workdir, _, run = labelled
    ran = run.ran()
    assert ("download_annotations", "LIDC-IDRI-0001") in ran
    assert ("download_annotations", "chest-02") in ran
    assert ("download_annotations", "chest-03") not in ran  # it takes the cohort's CSV
    assert ("download_annotations_cohort", "") in ran
    index = pd.read_parquet(
        published_file(workdir / "published/dataset/labelled", "patches.parquet")
    )
    centred = index[index.centred].set_index("sample")
    assert sorted(centred.index) == ["LIDC-IDRI-0001", "chest-02", "chest-03"]
    assert (centred.label == "1").all()  # the per-patch label, as text in the index
    assert centred.loc["LIDC-IDRI-0001", "readers"] == 4
    assert (centred.distance_mm <= 3.0).all()  # 3 mm voxels: half a diagonal is 2.6 mm
    assert set(index.label) == {"0", "1"}
    manifest = json.loads((workdir / "results/ct/chest-02/annotations.json").read_text())
    assert manifest["scope"] == "sample" and manifest["files"][0]["key"] == "chest-02.csv"


def test_changed_annotation_file_reruns_only_that_samples_tile_step(labelled, tmp_path):
    workdir = copy_workdir(labelled[0], tmp_path / "copy")
    commands = labelled[1]
    assert run_readme_commands(workdir, commands, "--dry-run").ran() == set()
    with open(workdir / "labels/chest-02.csv", "a") as f:
        f.write("0,0,1000,4\n")  # a row without seriesuid: kept (outside the scan)
    run = run_readme_commands(workdir, commands, "--dry-run")
    assert run.ran() == {
        ("download_annotations", "chest-02"),
        ("tile_ct", "chest-02"),
        ("upload", "chest-02"),
    }
    assert "rule dataset:" in run.stdout  # the index is rebuilt from the tables

    xml = workdir / "labels/LIDC-IDRI-0001/069.xml"
    xml.write_text(xml.read_text().replace("<imageZposition>-125.0", "<imageZposition>-125.00"))
    run = run_readme_commands(workdir, commands, "--dry-run")
    assert {s for r, s in run.ran() if r == "download_annotations"} == {
        "chest-02",
        "LIDC-IDRI-0001",
    }
    assert {r for r, s in run.ran() if s == "LIDC-IDRI-0001"} == {
        "download_annotations",
        "tile_ct",
        "upload",
    }

    with open(workdir / "labels/candidates.csv", "a") as f:
        f.write("1.2.3.5,0,0,0,0\n")
    run = run_readme_commands(workdir, commands, "--dry-run")
    assert run.ran() - {
        (r, "LIDC-IDRI-0001") for r in ("download_annotations", "tile_ct", "upload")
    } == {
        ("download_annotations", "chest-02"),
        ("tile_ct", "chest-02"),
        ("upload", "chest-02"),
        ("download_annotations_cohort", ""),
        ("tile_ct", "chest-03"),
        ("upload", "chest-03"),
    }


def test_a_missing_annotation_file_fails_that_sample_alone(labelled, tmp_path):
    workdir = copy_workdir(labelled[0], tmp_path / "copy")
    (workdir / "labels/chest-02.csv").unlink()
    run = run_readme_commands(workdir, labelled[1], "--keep-going", check=False)
    assert run.returncode == 0, "found before the jobs: the other samples run"
    assert not {job for job in run.ran() if job[1] == "chest-02"}
    record = json.loads((workdir / "logs/failures/chest-02.tile.json").read_text())
    assert record["file"].endswith("labels/chest-02.csv") and "does not exist" in record["cause"]
    assert "\n" not in record["message"]
    assert "medprep: 1 of 3 samples name inputs that do not exist: chest-02 (annotations " in (
        run.stderr
    )


def test_an_s3_annotation_file_is_fetched_and_a_new_etag_refetches_it(
    tmp_path, tiny_data, moto_server
):
    from s3_support import fake_credentials, isolated_aws_environment, new_bucket_name, raw_client

    env = isolated_aws_environment(tmp_path, fake_credentials())
    s3 = raw_client(moto_server.url, env)
    bucket = new_bucket_name()
    s3.create_bucket(Bucket=bucket)
    body = b"coordX,coordY,coordZ\n1,2,3\n"
    s3.put_object(Bucket=bucket, Key="labels/chest.csv", Body=body)
    workdir = tmp_path / "work"
    shutil.copytree(tiny_data / "ct/phantom-chest-01", workdir / "scans/chest")
    (workdir / "samples.tsv").write_text(
        f"sample\tmodality\turi\tannotations\nchest\tct\tscans/chest\ts3://{bucket}/labels/chest.csv\n"
    )
    write_config(workdir, storage={"endpoint_url": moto_server.url, "region": "us-east-1"})
    target = "results/ct/chest/annotations.json"

    run = run_snakemake(workdir, target, env=env)
    assert run.ran() == {("download_annotations", "chest")}
    manifest = json.loads((workdir / target).read_text())
    (entry,) = manifest["files"]
    local = Path(entry["path"])
    assert local.parent == (workdir / "results/ct/chest/annotations").resolve()
    assert local.read_bytes() == body and entry["etag"]
    assert manifest["source"] == f"s3://{bucket}/labels/chest.csv"
    logs = "".join(p.read_text() for p in (workdir / "logs").rglob("*.log"))
    for text in (run.stdout + run.stderr + logs, (workdir / target).read_text()):
        assert env["AWS_SECRET_ACCESS_KEY"] not in text

    assert run_snakemake(workdir, target, "--dry-run", env=env).ran() == set()
    s3.put_object(Bucket=bucket, Key="labels/chest.csv", Body=body + b"4,5,6\n")
    run = run_snakemake(workdir, target, "--dry-run", env=env)
    assert run.ran() == {("download_annotations", "chest")}


def test_another_cohort_csv_reruns_only_the_tile_steps_that_take_it(labelled, tmp_path):
    workdir = copy_workdir(labelled[0], tmp_path / "copy")
    shutil.copy2(workdir / "labels/candidates.csv", workdir / "labels/candidates-v2.csv")
    commands = [c.replace("labels/candidates.csv", "labels/candidates-v2.csv") for c in labelled[1]]
    assert commands != labelled[1]
    run = run_readme_commands(workdir, commands, "--dry-run")
    # not preprocess_ct: the key is no setting of that step
    assert run.ran() == {
        ("download_annotations_cohort", ""),
        ("tile_ct", "chest-03"),
        ("upload", "chest-03"),
    }
