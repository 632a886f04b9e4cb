"""Core helpers: atomic writes, worker pools, redaction, step manifests, the step runner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from medprep.common import atomic, parallel
from medprep.common.errors import InputError
from medprep.common.redact import RedactingFilter, redact
from medprep.workflow import manifest

##### atomic writes #####


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "out" / "volume.nii.gz"
    with atomic.atomic_path(target) as tmp:
        assert tmp.suffix == ".gz" and tmp.parent == target.parent
        tmp.write_bytes(b"complete")
        assert not target.exists()
    assert target.read_bytes() == b"complete"

    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in target.parent.iterdir()) == ["volume.nii.gz"]


def test_staged_dir_replaces_folder_whole(tmp_path):
    final = tmp_path / "pixels"
    with atomic.staged_dir(final) as tmp:
        (tmp / "a.jpg").write_bytes(b"1")
    with atomic.staged_dir(final) as tmp:
        (tmp / "b.jpg").write_bytes(b"2")
    assert sorted(p.name for p in final.iterdir()) == ["b.jpg"]

    with pytest.raises(ValueError), atomic.staged_dir(final) as tmp:
        (tmp / "c.jpg").write_bytes(b"3")
        raise ValueError("tiler crashed")
    assert sorted(p.name for p in final.iterdir()) == ["b.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["pixels"]


def test_json_round_trip_handles_numpy(tmp_path):
    import numpy as np

    path = tmp_path / "s.json"
    atomic.write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": tmp_path})
    assert atomic.read_json(path) == {"a": 1.5, "b": [0, 1, 2], "c": str(tmp_path)}


def test_remove_stale_temporaries_keeps_finished_files(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".manifest.tmp-1-abcd.json").write_text("{")
    (tmp_path / ".pixels.tmp-1-abcd").mkdir()
    assert atomic.remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_remove_stale_temporaries_at_every_depth_without_following_links(tmp_path):
    deep = tmp_path / "sample" / "tiles" / "pixels"
    deep.mkdir(parents=True)
    (deep / "000001.jpg").write_bytes(b"tile")
    (deep / ".000002.tmp-77-0123abcd.jpg").write_bytes(b"half a tile")
    (tmp_path / "sample" / ".pixels.tmp-77-0123abcd").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".x.tmp-1-ffffffff.json").write_text("not this sample's")
    (tmp_path / "sample" / "tiles" / "elsewhere").symlink_to(outside)

    assert atomic.remove_stale_temporaries(tmp_path / "sample") == 1  # top level only
    assert atomic.remove_stale_temporaries(tmp_path / "sample", recursive=True) == 1
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert ".000002.tmp-77-0123abcd.jpg" not in " ".join(left)
    assert "sample/tiles/pixels/000001.jpg" in left
    assert (outside / ".x.tmp-1-ffffffff.json").exists(), "links are not followed"


##### worker pools #####


def _square(x):
    return x * x


def _native_threads(_):
    import numpy  # noqa: F401  loads OpenBLAS, whose pool size is what we check
    from threadpoolctl import threadpool_info

    return sorted({pool["num_threads"] for pool in threadpool_info()}), os.environ[
        "OMP_NUM_THREADS"
    ]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_run_parallel_keeps_order_with_both_start_methods(monkeypatch, method):
    monkeypatch.setenv(parallel.START_METHOD_VARIABLE, method)
    items = list(range(50))
    assert list(parallel.run_parallel(_square, items, workers=2, max_in_flight=3)) == [
        x * x for x in items
    ]
    assert list(parallel.run_parallel(_square, items, workers=1)) == [x * x for x in items]


def test_pool_workers_pin_native_threads_to_one(monkeypatch):
    # Snakemake exports OMP_NUM_THREADS=threads to the job; workers must not inherit it.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    results = list(parallel.run_parallel(_native_threads, range(2), workers=2))
    for counts, omp in results:
        assert omp == "1"
        assert counts == [1]


def _fail_on_three(x):
    if x == 3:
        raise ValueError("region (3, 0) unreadable")
    return x


def test_bounded_map_raises_first_error_and_does_not_hang():
    with parallel.process_pool(2, method="fork") as pool, pytest.raises(ValueError, match="region"):
        list(parallel.bounded_map(pool, _fail_on_three, range(100), max_in_flight=4))


def test_bounded_map_bounds_in_flight_tasks():
    from concurrent.futures import ThreadPoolExecutor

    submitted = []

    def items():
        for i in range(20):
            submitted.append(i)
            yield i

    with ThreadPoolExecutor(2) as pool:
        results = parallel.bounded_map(pool, _square, items(), max_in_flight=3)
        assert next(results) == 0
        assert len(submitted) <= 4
        assert list(results) == [x * x for x in range(1, 20)]


def test_thread_map_in_order():
    assert list(parallel.thread_map(_square, range(30), workers=4)) == [x * x for x in range(30)]


##### errors and redaction #####


def test_input_error_is_one_line_with_sample_file_and_cause():
    error = InputError("not a slide OpenSlide can read", path="in/x.svs").with_context(sample="S1")
    assert str(error) == "sample S1: file in/x.svs: not a slide OpenSlide can read"
    assert "\n" not in str(error)


def test_redact_removes_known_secrets_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE42")
    text = (
        "failed with key AKIAEXAMPLE42 secret s3cr3t-value-123 at "
        "https://user:pw@host/b?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA%2F"
    )
    cleaned = redact(text)
    for secret in ("s3cr3t-value-123", "AKIAEXAMPLE42", "user:pw", "abcdef", "AKIA%2F"):
        assert secret not in cleaned
    assert "https://***@host" in cleaned


def test_redacting_filter_cleans_messages_and_tracebacks(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret-999")
    record = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "key=%s", ("another-secret-999",), None
    )
    try:
        raise RuntimeError("boom another-secret-999")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    assert "another-secret-999" not in record.getMessage()
    assert "boom ***" in record.getMessage()


##### step manifests #####


def test_step_manifest_lists_only_existing_artifacts(tmp_path):
    data = tmp_path / "mask.png"
    data.write_bytes(b"png")
    path = tmp_path / "preprocess.json"
    manifest.write_step_manifest(
        path,
        sample="S",
        modality="wsi",
        step="preprocess",
        artifacts=[manifest.artifact("preprocess/mask.png", data)],
        summary={"status": "ok"},
    )
    assert manifest.read_step_manifest(path)["artifacts"][0]["name"] == "preprocess/mask.png"
    with pytest.raises(FileNotFoundError):
        manifest.write_step_manifest(
            tmp_path / "tile.json",
            sample="S",
            modality="wsi",
            step="tile",
            artifacts=[manifest.artifact("tiles/x.tar", tmp_path / "missing.tar")],
        )
    assert not (tmp_path / "tile.json").exists()
    with pytest.raises(ValueError):
        manifest.artifact("../escape.txt", data)


def test_collect_artifacts_later_steps_win():
    a = {"artifacts": [{"name": "x", "path": "1"}, {"name": "y", "path": "2"}]}
    b = {"artifacts": [{"name": "x", "path": "3"}]}
    assert manifest.collect_artifacts([a, b]) == [
        {"name": "x", "path": "3"},
        {"name": "y", "path": "2"},
    ]


##### the step runner #####


RUNNER = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace
    from medprep.common.errors import InputError
    from medprep.workflow.runner import run_step

    class Named(list):
        pass

    log = Named([sys.argv[1]])
    smk = SimpleNamespace(wildcards={"sample": "S7", "modality": "wsi"}, rule="tile_wsi",
                          log=log, threads=1)

    def main(smk):
        if sys.argv[2] == "input":
            raise InputError("truncated JPEG data at offset 1234", path="slides/S7.svs")
        if sys.argv[2] == "crash":
            raise KeyError("level")

    run_step(smk, main)
    """
)


@pytest.mark.parametrize(
    "mode,code,expected",
    [
        ("input", 1, "sample S7: file slides/S7.svs: truncated JPEG data at offset 1234"),
        ("crash", 2, "sample S7: tile failed: unexpected KeyError: 'level'"),
    ],
)
def test_run_step_reports_one_clear_line_and_a_failure_record(tmp_path, mode, code, expected):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    log = tmp_path / "logs" / "tile_wsi" / "S7.log"
    result = subprocess.run(
        [sys.executable, str(script), str(log), mode], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == code
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("medprep error")]
    assert len(error_lines) == 1 and expected in error_lines[0]
    assert expected in log.read_text()
    record = json.loads((tmp_path / "logs" / "failures" / "S7.tile.json").read_text())
    assert record["message"] == expected and record["step"] == "tile"


def test_run_step_success_clears_old_failure_record(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    log = tmp_path / "S7.log"
    subprocess.run([sys.executable, str(script), str(log), "input"], cwd=tmp_path, check=False)
    assert (tmp_path / "logs" / "failures" / "S7.tile.json").exists()
    subprocess.run([sys.executable, str(script), str(log), "ok"], cwd=tmp_path, check=True)
    assert not (tmp_path / "logs" / "failures" / "S7.tile.json").exists()


##### workflow helpers #####


def test_code_fingerprint_follows_what_the_engine_imports(tmp_path):
    from medprep.workflow.code import code_fingerprint

    def fingerprint():
        code_fingerprint.cache_clear()
        return code_fingerprint("wsi", tmp_path)

    for folder in ("wsi/sub", "ct", "common", "workflow", "cohort", "demo"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "wsi" / "tiler.py").write_text("from medprep.common import tables\nx = 1\n")
    (tmp_path / "wsi" / "sub" / "qc.py").write_text(
        "def f():\n    from medprep.workflow.manifest import artifact\n"
    )
    (tmp_path / "common" / "tables.py").write_text("from medprep.common.atomic import write\n")
    (tmp_path / "common" / "atomic.py").write_text("def write(): pass\n")
    (tmp_path / "workflow" / "manifest.py").write_text("def artifact(): pass\n")
    (tmp_path / "cohort" / "html.py").write_text("from medprep.wsi import tiler\n")
    (tmp_path / "demo" / "synthetic_slide.py").write_text("from medprep.wsi import tiler\n")
    (tmp_path / "ct" / "lung.py").write_text("z = 3\n")
    before = fingerprint()
    # what the engine does not import reruns nothing: another engine, the report, the demo
    for path, text in (
        ("ct/lung.py", "z = 4\n"),
        ("cohort/html.py", "# edited\n"),
        ("demo/synthetic_slide.py", "# edited\n"),
        ("wsi/notes.txt", "not code"),
    ):
        (tmp_path / path).write_text(text)
        assert fingerprint() == before, path
    # its own code, and shared code it imports directly, lazily or through another module
    for path in ("wsi/sub/qc.py", "common/tables.py", "common/atomic.py", "workflow/manifest.py"):
        (tmp_path / path).write_text((tmp_path / path).read_text() + "# edited\n")
        assert fingerprint() != before, path
        before = fingerprint()


def test_the_real_engines_include_their_shared_helpers_and_not_the_demo():
    from medprep.workflow.code import PACKAGE_DIR, engine_modules

    for engine in ("ct", "wsi"):
        names = {p.relative_to(PACKAGE_DIR).as_posix() for p in engine_modules(engine)}
        assert {"common/tables.py", "common/atomic.py", "workflow/manifest.py"} <= names
        assert not [n for n in names if n.startswith(("demo/", "cohort/"))], names


def test_settings_split_gives_each_rule_only_its_part():
    from medprep.workflow.parse import settings_only, settings_without

    ct = {"spacing": [1, 1, 1], "patches": {"size_mm": 64}, "normalise": {"mean": 0.25}}
    assert settings_without(ct, "patches") == {"spacing": [1, 1, 1], "normalise": {"mean": 0.25}}
    assert settings_only(ct, "patches", "slices_png") == {"patches": {"size_mm": 64}}


##### step manifests: one reader per question


def test_the_manifest_readers_answer_from_a_path_or_a_dict(tmp_path):
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(b"v")
    path = tmp_path / "preprocess.json"
    written = manifest.write_step_manifest(
        path,
        sample="S1",
        modality="ct",
        step="preprocess",
        artifacts=[manifest.artifact("preprocess/volume.nii.gz", volume)],
    )
    for source in (path, written):
        assert manifest.artifact_path(source, "preprocess/volume.nii.gz") == str(volume)
    with pytest.raises(
        ValueError, match="preprocess manifest of sample S1 lists no preprocess/qc.png"
    ):
        manifest.artifact_path(path, "preprocess/qc.png")
    download = {"sample": "S1", "files": [{"path": "/a/1.dcm"}, {"path": "/a/2.dcm"}]}
    assert manifest.input_files(download) == ["/a/1.dcm", "/a/2.dcm"]
    with pytest.raises(InputError, match="lists 2 files, not one"):
        manifest.annotation_file(download)
    assert manifest.annotation_file({"sample": "S1", "files": [{"path": "/a/x.csv"}]}) == "/a/x.csv"
