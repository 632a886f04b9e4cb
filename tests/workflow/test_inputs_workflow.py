"""Hostile input folders with an S3 destination (a real moto_server process), and sheets
that must fail before any job runs (the rest of the bad-input matrix, with a local
destination, is tests/workflow/test_bad_input.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from ct_support import CT_3SLICE, copy_folder, linked_copy
from s3_support import MotoServer, fake_credentials, isolated_aws_environment, raw_client
from workflow_support import SNAKEMAKE, run_snakemake, write_config
from wsi_support import CMU

pytestmark = pytest.mark.slow

HOSTILE = {  # sample -> (folder link target, the cause in its one line)
    "ct-loop": (".", "symbolic link loop: leads back to"),
    "ct-etc": ("/etc", "symbolic link to /etc, a folder outside the sample's folder"),
}
GOOD = {"good-ct": "ct", "good-slide": "wsi"}


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile-s3")
    env = isolated_aws_environment(workdir, fake_credentials())
    inputs = workdir / "inputs"
    inputs.mkdir()
    rows = []
    for name, (target, _) in HOSTILE.items():
        rows.append((name, "ct", linked_copy(CT_3SLICE, inputs / name, target)))
    rows.append(("good-ct", "ct", copy_folder(CT_3SLICE, inputs / "good-ct")))
    rows.append(("good-slide", "wsi", shutil.copyfile(CMU, inputs / CMU.name)))
    (workdir / "samples.tsv").write_text(
        "sample\tmodality\turi\n" + "".join(f"{n}\t{m}\t{u}\n" for n, m, u in rows)
    )
    with MotoServer(workdir / "moto_server.log") as server:
        s3 = raw_client(server.url, env)
        bucket = "medprep-hostile"
        s3.create_bucket(Bucket=bucket)
        write_config(
            workdir,
            destination=f"s3://{bucket}/published",
            storage={"endpoint_url": server.url, "region": "us-east-1"},
        )
        run = run_snakemake(workdir, env=env, check=False)
        keys = [
            entry["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for entry in page.get("Contents", [])
        ]
        yield workdir, run, keys, env


def test_exactly_the_good_samples_are_published_to_s3(s3_run):
    workdir, run, keys, _ = s3_run
    assert run.returncode != 0  # the hostile samples failed
    published = {key.split("/")[2] for key in keys}
    assert published == set(GOOD)
    for name, modality in GOOD.items():
        assert f"published/{modality}/{name}/manifest.json" in keys
    assert run.ran("upload") == {("upload", name) for name in GOOD}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_folder_fails_at_download_with_its_line(s3_run, name):
    workdir, run, _, env = s3_run
    cause = HOSTILE[name][1]
    line = f"sample {name}: file {workdir / 'inputs' / name / 'link'}: {cause}"
    assert f"medprep error: {line}" in run.stderr
    record = json.loads((workdir / "logs" / "failures" / f"{name}.download.json").read_text())
    assert record["kind"] == "input" and cause in record["cause"]
    assert not (workdir / "results" / "ct" / name / "download.json").exists()
    for secret in (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in run.stderr + run.stdout


# ---- sheets that fail before any job: one line naming the sheet, the line and the column

PERIODIC = "case-" + "0" * 20  # Snakemake's PeriodicWildcardError: 20 repeats or more


@pytest.mark.parametrize(
    "sheet,message",
    [
        ("", "samples.tsv line 1, column 'sample': the sheet is empty (0 bytes)"),
        (
            "sample\tmodality\turi\nA\twsi\ta.svs\textra\n",
            "samples.tsv line 2 (sample 'A'), column 4: 4 fields but the header (line 1) has 3",
        ),
        (
            "sample\tmodality\turi\tmpp\nA\twsi\ta.svs\tnan\n",
            "samples.tsv line 2 (sample 'A'), column 'mpp': 'nan' is not a finite number",
        ),
        (
            f"sample\tmodality\turi\nA\twsi\ta.svs\n{PERIODIC}\tct\tb/\n",
            f"samples.tsv line 3 (sample '{PERIODIC}'), column 'sample': '{PERIODIC}' ends in a "
            "part repeated 20 or more times",
        ),
    ],
    ids=["zero-byte-sheet", "extra-field", "mpp-nan", "periodic-name"],
)
def test_bad_sheet_fails_before_any_job_with_one_line(tmp_path, sheet, message):
    (tmp_path / "samples.tsv").write_text(sheet)
    write_config(tmp_path)
    run = run_snakemake(tmp_path, check=False)
    assert run.returncode != 0 and run.jobs == []
    assert message in run.stderr
    assert "Traceback" not in run.stderr and "PeriodicWildcardError:" not in run.stderr
    assert not (tmp_path / "results").exists()


def test_the_longest_repeat_the_sheet_accepts_is_planned_by_snakemake(tmp_path):
    name = "case-" + "0" * 19
    (tmp_path / "data").mkdir()
    slide = shutil.copyfile(CMU, tmp_path / "data" / "a.svs")
    (tmp_path / "samples.tsv").write_text(f"sample\tmodality\turi\n{name}\twsi\t{slide}\n")
    write_config(tmp_path)
    run = run_snakemake(tmp_path, "--dry-run")
    assert ("upload", name) in run.ran()


def test_a_periodic_name_would_stop_snakemake_itself(tmp_path):
    """Why the sheet refuses it: without the check, Snakemake stops the whole run."""
    (tmp_path / "Snakefile").write_text(
        "rule all:\n    input: expand('out/{s}.txt', s=['good', config['name']])\n"
        "rule one:\n    output: 'out/{s}.txt'\n    shell: 'touch {output}'\n"
    )
    result = subprocess.run(
        [SNAKEMAKE, "-n", "--cores", "1", "--config", f"name={PERIODIC}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "PeriodicWildcardError" in result.stdout + result.stderr
