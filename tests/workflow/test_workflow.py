"""The workflow end to end on tiny real data: outputs, and reruns of only what is stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SAMPLES
from workflow_support import (
    copy_workdir,
    published_file,
    run_snakemake,
    tree_digest,
    write_config,
)

pytestmark = pytest.mark.slow

ALL_SAMPLES = {sample for sample, _, _ in TINY_SAMPLES}
MODALITY = {sample: modality for sample, modality, _ in TINY_SAMPLES}


def chain(sample: str) -> set[tuple[str, str]]:
    modality = MODALITY[sample]
    return {
        (r, sample) for r in ("download", f"preprocess_{modality}", f"tile_{modality}", "upload")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data) -> tuple[Path, object]:
    """A working directory after one complete run, and that run."""
    from workflow_support import write_samples

    workdir = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_data, workdir / "data")
    write_samples(workdir, TINY_SAMPLES)
    write_config(workdir)
    return workdir, run_snakemake(workdir)


@pytest.fixture
def rerun_dir(finished, tmp_path) -> Path:
    return copy_workdir(finished[0], tmp_path / "copy")


def test_first_run_runs_every_chain_and_publishes_every_sample(finished):
    workdir, run = finished
    assert run.ran() == set().union(*(chain(s) for s in ALL_SAMPLES))
    for sample, modality, _ in TINY_SAMPLES:
        folder = workdir / "published" / modality / sample
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["sample"] == sample and manifest["modality"] == modality
        assert set(manifest["steps"]) == {"preprocess", "tile"}
        published = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert published == {f["path"] for f in manifest["files"]} | {"manifest.json"}
        assert {f["path"] for f in manifest["files"]} == {
            f"{manifest['version']}/{f['name']}" for f in manifest["files"]
        }
        digests = tree_digest(folder)
        for entry in manifest["files"]:
            assert digests[entry["path"]] == entry["sha256"], entry["name"]
        receipt = json.loads((workdir / "results" / modality / sample / "upload.json").read_text())
        assert {f["name"] for f in receipt["files"]} == {f["name"] for f in manifest["files"]}


def test_published_samples_carry_their_data(finished):
    workdir, _ = finished
    ct = workdir / "published" / "ct" / "phantom-chest-01"
    assert published_file(ct, "preprocess/volume.nii.gz").stat().st_size > 0
    assert published_file(ct, "preprocess/lung_mask.nii.gz").stat().st_size > 0
    ct_steps = json.loads((ct / "manifest.json").read_text())["steps"]
    assert ct_steps["tile"]["patches"] > 0
    wsi = workdir / "published" / "wsi" / "CMU-1-Small-Region"
    wsi_steps = json.loads((wsi / "manifest.json").read_text())["steps"]
    assert wsi_steps["tile"]["tiles"] > 0
    assert wsi_steps["preprocess"]["mpp_source"] == "metadata"
    table = published_file(wsi, "tiles/tiles.parquet")
    assert any(p.suffix == ".tar" for p in (table.parent / "pixels").iterdir())


def test_second_run_does_nothing(rerun_dir):
    run = run_snakemake(rerun_dir)
    assert run.ran() == set()
    assert "Nothing to be done" in run.stderr


def test_changed_input_content_reruns_only_that_sample(rerun_dir):
    import pydicom

    series = sorted((rerun_dir / "data" / "ct" / "phantom-chest-01").iterdir())
    dataset = pydicom.dcmread(series[len(series) // 2])
    pixels = dataset.pixel_array.copy()
    pixels[0, 0] += 1
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(series[len(series) // 2])

    run = run_snakemake(rerun_dir)
    assert run.ran() == chain("phantom-chest-01")


def test_changed_tile_parameter_reruns_only_tile_and_upload_of_that_modality(rerun_dir):
    write_config(rerun_dir, wsi={"tile": {"size": 96, "shard_max_tiles": 50}})
    run = run_snakemake(rerun_dir)
    wsi_samples = {s for s in ALL_SAMPLES if MODALITY[s] == "wsi"}
    assert run.ran() == {(rule, s) for s in wsi_samples for rule in ("tile_wsi", "upload")}
    tiles = json.loads((rerun_dir / "results" / "wsi" / "synthetic-01" / "tile.json").read_text())
    assert tiles["summary"]["tiles"] > 0


def test_cores_1_and_2_give_identical_outputs(finished, tmp_path, tiny_data):
    one = tmp_path / "one"
    shutil.copytree(tiny_data, one / "data")
    shutil.copy(finished[0] / "samples.tsv", one)
    shutil.copy(finished[0] / "config.yaml", one)
    run_snakemake(one, cores=1)
    assert tree_digest(one / "published") == tree_digest(finished[0] / "published")


def test_config_overrides_from_the_command_line(workdir):
    (workdir / "other.tsv").write_text(
        "sample\tmodality\turi\nCMU-1-Small-Region\twsi\tdata/wsi/CMU-1-Small-Region.svs\n"
    )
    run = run_snakemake(workdir, "--config", "samples=other.tsv", "destination=elsewhere")
    assert run.ran() == chain("CMU-1-Small-Region")
    assert (workdir / "elsewhere" / "wsi" / "CMU-1-Small-Region" / "manifest.json").exists()


def test_nested_settings_from_an_overrides_file(rerun_dir):
    """As the README shows: `--configfile my-overrides.yaml` for nested settings; it is
    merged over config.yaml, so only the keys it names change."""
    (rerun_dir / "my-overrides.yaml").write_text("wsi:\n  tile:\n    size: 96\n")
    run = run_snakemake(rerun_dir, "--configfile", "my-overrides.yaml", "--dry-run")
    wsi_samples = {s for s in ALL_SAMPLES if MODALITY[s] == "wsi"}
    assert run.ran() == {(rule, s) for s in wsi_samples for rule in ("tile_wsi", "upload")}


def test_connection_settings_rerun_nothing(rerun_dir):
    write_config(rerun_dir, storage={"max_attempts": 2, "endpoint_url": "http://127.0.0.1:9"})
    run = run_snakemake(rerun_dir, "--dry-run")
    assert run.ran() == set()


def job_block(output: str, rule: str) -> str:
    """The first job block of ``rule`` in Snakemake's printed plan."""
    lines = output[output.index(f"rule {rule}:") :].splitlines()
    block = [lines[0]]
    for line in lines[1:]:  # up to the next job's time stamp, rule line or a blank line
        if not line.strip() or line.startswith(("[", "rule ", "localrule ")):
            break
        block.append(line)
    return "\n".join(block)


def test_threads_and_memory_are_set_per_rule_from_the_command_line(workdir):
    default = run_snakemake(workdir, "--dry-run").stdout
    assert "threads:" not in job_block(default, "preprocess_wsi")  # one thread: not printed
    assert "mem_mb=4000" not in job_block(default, "tile_wsi")
    run = run_snakemake(
        workdir,
        "--dry-run",
        "--set-threads",
        "preprocess_wsi=2",
        "--set-resources",
        "tile_wsi:mem_mb=4000",
    )
    assert "threads: 2" in job_block(run.stdout, "preprocess_wsi")
    assert "mem_mb=4000" in job_block(run.stdout, "tile_wsi")
    assert "mem_mb=4000" not in job_block(run.stdout, "tile_ct")


def test_cpu_jobs_ran_forked_from_one_step_server_with_their_records(finished):
    """The CPU steps ran in children of one warm step server of the Snakemake process
    (not in processes of their own), and each left its benchmark record: the child's
    wall time, CPU time and peak memory."""
    import re

    workdir, _ = finished
    forked = re.compile(
        r"in process (\d+), forked by the step server (\d+) of the Snakemake process (\d+)"
    )
    seen = []
    for sample, modality, _ in TINY_SAMPLES:
        for rule in (f"preprocess_{modality}", f"tile_{modality}"):
            match = forked.search((workdir / "logs" / rule / f"{sample}.log").read_text())
            assert match, (rule, sample)
            seen.append(tuple(map(int, match.groups())))
            header, values = (
                (workdir / "logs" / "benchmarks" / rule / f"{sample}.tsv").read_text().splitlines()
            )
            record = dict(zip(header.split("\t"), values.split("\t"), strict=True))
            assert float(record["s"]) > 0 and float(record["cpu_time"]) > 0, record
            assert float(record["max_rss"]) > 10, record  # MB: a Python process holding numpy
    children, servers, snakemake = (set(column) for column in zip(*seen, strict=True))
    assert len(children) == len(seen) and len(servers) == 1 and len(snakemake) == 1
    assert not (children | servers) & snakemake
