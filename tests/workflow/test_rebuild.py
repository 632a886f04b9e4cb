"""Which step runs again when the destination lost a sample's files (what the rules get at
DAG build; the whole workflow: tests/workflow/test_hostile_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medprep import storage
from medprep.common import atomic
from medprep.storage import published
from medprep.workflow import parse


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """A CT sample published to a local destination, its volume a working file removed
    after upload, its QC picture a rule output that stays; run from its working directory."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results" / "ct" / "S1"
    (results / "preprocess").mkdir(parents=True)
    volume, qc = results / "preprocess" / "volume.nii.gz", results / "preprocess" / "qc.png"
    volume.write_bytes(b"volume")
    qc.write_bytes(b"picture")
    artifacts = [
        {"name": "preprocess/volume.nii.gz", "path": str(volume)},
        {"name": "preprocess/qc.png", "path": str(qc)},
    ]
    atomic.write_json(results / "preprocess.json", {"step": "preprocess", "artifacts": artifacts})
    config = {"destination": "published", "storage": {}}
    receipt = storage.publish(artifacts, "published/ct/S1", manifest={"sample": "S1"})
    published.record(published.state_path("ct", "S1"), "published/ct/S1", 0, receipt, {})
    volume.unlink()  # removed after upload
    yield config, tmp_path / "published" / "ct" / "S1" / receipt["version"]
    published.clear_cache()
    parse._publication_states.clear()


def test_a_lost_working_file_with_no_local_copy_reruns_the_step_that_makes_it(sample, capsys):
    config, version = sample
    (version / "preprocess" / "volume.nii.gz").unlink()

    state = parse.publication_state(config, "ct", "S1", main_process=True)

    assert state.generation == 1
    assert state.rebuild == {"preprocess": "results/ct/S1/rebuild/preprocess-1.json"}
    assert parse.rebuild_inputs(config, "ct", "S1", "preprocess", main_process=False) == {
        "rebuild": "results/ct/S1/rebuild/preprocess-1.json"
    }
    assert parse.rebuild_inputs(config, "ct", "S1", "tile", main_process=False) == {}
    line = capsys.readouterr().err
    assert line == (
        f"medprep: sample S1: file published/ct/S1/{version.name}/preprocess/volume.nii.gz: "
        "missing since it was published; its working files are gone too: preprocess_ct runs "
        "again from the source, then the steps after it\n"
    )


def test_a_lost_file_with_a_local_copy_is_published_again_only(sample, capsys):
    config, version = sample
    (version / "preprocess" / "qc.png").unlink()

    state = parse.publication_state(config, "ct", "S1", main_process=True)

    assert state.generation == 1 and state.rebuild == {}
    assert capsys.readouterr().err.endswith("missing since it was published; upload runs again\n")


def test_the_newest_rebuild_record_stays_an_input_so_the_next_run_is_idle(sample):
    config, _ = sample
    records = Path("results/ct/S1/rebuild")
    records.mkdir()
    (records / "preprocess-3.json").write_text("{}")

    state = parse.publication_state(config, "ct", "S1", main_process=False)

    assert state.generation == 0, "nothing lost now"
    assert state.rebuild == {"preprocess": "results/ct/S1/rebuild/preprocess-3.json"}


def test_a_snapshot_of_the_earlier_layout_finds_the_lost_working_file_too(sample, tmp_path):
    config, version = sample
    # as earlier versions recorded it: files keyed by their names, no version folder
    snapshot = atomic.read_json(published.state_path("ct", "S1"))
    files = {}
    for path, entry in snapshot["files"].items():
        name = entry.pop("name", path)
        files[name] = entry
        if name != "manifest.json":
            target = tmp_path / "published" / "ct" / "S1" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((version / name).read_bytes())
    atomic.write_json(published.state_path("ct", "S1"), {**snapshot, "files": files})
    (tmp_path / "published" / "ct" / "S1" / "preprocess" / "volume.nii.gz").unlink()

    state = parse.publication_state(config, "ct", "S1", main_process=False)

    assert state.rebuild == {"preprocess": "results/ct/S1/rebuild/preprocess-1.json"}
