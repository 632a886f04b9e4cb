"""The workflow from S3 to S3 against a real S3-compatible server (moto_server process).

Reruns are read from the jobs Snakemake reports it ran, not from timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from s3_workflow_support import (
    CT,
    NEW_CT,
    WSI,
    World,
    assert_no_credentials_anywhere,
    assert_published_complete,
    chain,
)
from workflow_support import REPO, SNAKEMAKE, write_config, write_samples

pytestmark = pytest.mark.slow


def assert_local_results_match_published(world: World, samples) -> None:
    """What was produced locally is byte for byte what was published."""
    published = world.published()
    for name, modality, _ in samples:
        receipt = json.loads(
            (world.workdir / "results" / modality / name / "upload.json").read_text()
        )
        for entry in receipt["files"]:
            assert published[f"{modality}/{name}"][entry["name"]] == entry["sha256"]
        for step in ("preprocess", "tile"):
            manifest = json.loads(
                (world.workdir / "results" / modality / name / f"{step}.json").read_text()
            )
            for artifact in manifest["artifacts"]:
                local = hashlib.sha256((world.workdir / artifact["path"]).read_bytes()).hexdigest()
                assert published[f"{modality}/{name}"][artifact["name"]] == local


def assert_downloads_match_source(world: World, samples) -> None:
    for name, modality, relative in samples:
        download = json.loads(
            (world.workdir / "results" / modality / name / "download.json").read_text()
        )
        assert download["source"] == world.uri(relative)
        assert download["files"], name
        for entry in download["files"]:
            key = relative if (world.data / relative).is_file() else f"{relative}/{entry['key']}"
            remote = world.s3.get_object(Bucket=world.bucket, Key=key)
            assert Path(entry["path"]).read_bytes() == remote["Body"].read()
            assert entry["etag"] == remote["ETag"].strip('"')
            assert entry["bytes"] == remote["ContentLength"] and entry["last_modified"]


def change_one_slice(world: World, relative: str) -> None:
    """Change one pixel of the middle slice of a series, in the bucket only."""
    import io

    import pydicom

    keys = sorted(
        o["Key"]
        for o in world.s3.list_objects_v2(Bucket=world.bucket, Prefix=relative + "/")["Contents"]
    )
    key = keys[len(keys) // 2]
    dataset = pydicom.dcmread(
        io.BytesIO(world.s3.get_object(Bucket=world.bucket, Key=key)["Body"].read())
    )
    pixels = dataset.pixel_array.copy()
    pixels[0, 0] += 1
    dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    world.s3.put_object(Bucket=world.bucket, Key=key, Body=buffer.getvalue())


def test_s3_to_s3_runs_each_chain_once_and_reruns_only_what_changed(world):
    world.upload(CT[2])
    world.upload(WSI[2])
    world.configure([CT, WSI])

    first = world.run()
    assert first.ran() == chain(CT[0], "ct") | chain(WSI[0], "wsi")
    assert_published_complete(world, [CT, WSI])
    assert_local_results_match_published(world, [CT, WSI])
    assert_downloads_match_source(world, [CT, WSI])

    assert world.run().ran() == set(), "an unchanged second run must do nothing"

    # the same bytes uploaded again: a new LastModified, the same ETag -> nothing to do
    slide = world.s3.get_object(Bucket=world.bucket, Key=WSI[2])["Body"].read()
    world.s3.put_object(Bucket=world.bucket, Key=WSI[2], Body=slide)
    assert world.run().ran() == set()

    change_one_slice(world, CT[2])
    assert world.run().ran() == chain(CT[0], "ct"), "only the changed sample reruns"
    assert_downloads_match_source(world, [CT])
    assert_published_complete(world, [CT, WSI])

    world.upload(NEW_CT[2])
    world.configure([CT, WSI, NEW_CT])
    assert world.run().ran() == chain(NEW_CT[0], "ct"), "only the new sample runs"
    assert_published_complete(world, [CT, WSI, NEW_CT])
    assert world.run().ran() == set()
    assert_no_credentials_anywhere(world)


def test_a_run_through_a_faulty_network_succeeds_with_identical_data(world):
    world.upload(CT[2])
    world.upload(WSI[2])
    world.configure([CT, WSI])
    proxy = world.swap_proxy(fault_rate=0.15, seed=3)
    run = world.run()
    stats = proxy.stats()
    assert run.ran() == chain(CT[0], "ct") | chain(WSI[0], "wsi")
    injected = sum(
        stats[mode] for mode in ("status500", "status503", "drop_before", "drop_after", "truncate")
    )
    assert injected >= 5, stats
    assert_downloads_match_source(world, [CT, WSI])
    assert_local_results_match_published(world, [CT, WSI])
    assert_published_complete(world, [CT, WSI])
    assert_no_credentials_anywhere(world)


def test_a_run_killed_during_upload_keeps_the_last_publication_whole_and_reruns(world):
    world.upload(CT[2])
    world.upload(WSI[2])
    world.configure([CT, WSI])
    world.run()  # everything published once
    change_one_slice(world, CT[2])
    world.swap_proxy(latency_ms=300, latency_methods="PUT,POST,DELETE")
    previous = world.published()[f"ct/{CT[0]}"]
    killed = _run_and_kill_during_upload(world, f"published/ct/{CT[0]}/")
    assert killed, "the upload finished before it could be interrupted"
    # the previous publication is still what a reader sees, whole: the new version's
    # objects were being written beside it
    _assert_visible_manifests_complete(world)
    assert world.published()[f"ct/{CT[0]}"] == previous

    world.swap_proxy()
    world.run("--unlock")  # a killed snakemake leaves its lock, as after a power loss
    rerun = world.run()
    assert ("upload", CT[0]) in rerun.ran()
    assert {sample for _, sample in rerun.ran()} == {CT[0]}
    assert_published_complete(world, [CT, WSI])
    assert_local_results_match_published(world, [CT, WSI])
    assert world.s3.list_multipart_uploads(Bucket=world.bucket).get("Uploads", []) == []
    assert_no_credentials_anywhere(world)


def _run_and_kill_during_upload(world: World, prefix: str) -> bool:
    """Run snakemake; kill it (and its jobs) once ``prefix`` holds new data.

    While it runs, every manifest.json that can be seen must describe complete data.
    """
    before = {
        o["Key"]: o["ETag"]
        for o in world.s3.list_objects_v2(Bucket=world.bucket, Prefix=prefix)["Contents"]
    }
    command = [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(world.workdir),
        "--configfile",
        str(world.workdir / "config.yaml"),
        "--cores",
        "2",
    ]
    log = world.workdir / "killed-run.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command,
            cwd=world.workdir,
            env={**os.environ, **world.env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    killed = False
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            now = {
                o["Key"]: o["ETag"]
                for o in world.s3.list_objects_v2(Bucket=world.bucket, Prefix=prefix).get(
                    "Contents", []
                )
            }
            changed = [
                k
                for k, etag in now.items()
                if before.get(k) != etag and not k.endswith("manifest.json")
            ]
            if changed:
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            _assert_visible_manifests_complete(world)
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    world.outputs.append(log.read_text())
    return killed


def _assert_visible_manifests_complete(world: World) -> None:
    listing = world.s3.list_objects_v2(Bucket=world.bucket, Prefix="published/").get("Contents", [])
    keys = {o["Key"] for o in listing}
    for key in keys:
        if not key.endswith("/manifest.json"):
            continue
        try:
            manifest = json.loads(world.s3.get_object(Bucket=world.bucket, Key=key)["Body"].read())
        except world.s3.exceptions.NoSuchKey:
            continue  # withdrawn between listing and reading
        folder = key.removesuffix("manifest.json")
        for entry in manifest["files"]:
            data = world.s3.get_object(Bucket=world.bucket, Key=folder + entry["path"])[
                "Body"
            ].read()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (
                f"{key} visible before {entry['name']}"
            )


def test_a_hostile_object_key_fails_only_its_sample_with_a_clear_message(world):
    world.upload(WSI[2])
    world.s3.put_object(Bucket=world.bucket, Key="ct/evil/0001.dcm", Body=b"x")
    world.s3.put_object(Bucket=world.bucket, Key="ct/evil/../../escaped.dcm", Body=b"gotcha")
    write_samples(
        world.workdir,
        [("evil", "ct", f"s3://{world.bucket}/ct/evil/"), (WSI[0], "wsi", world.uri(WSI[2]))],
    )
    write_config(
        world.workdir,
        destination=f"s3://{world.bucket}/published",
        storage={"endpoint_url": world.endpoint, "region": "us-east-1"},
    )
    run = world.run(check=False)
    assert run.returncode != 0
    assert "refusing object key" in run.stderr
    record = json.loads((world.workdir / "logs" / "failures" / "evil.download.json").read_text())
    assert "ct/evil/../../escaped.dcm" in record["cause"]
    assert run.ran() >= chain(WSI[0], "wsi"), "the other sample still completes"
    assert not list(world.workdir.parent.rglob("escaped.dcm"))
    assert_no_credentials_anywhere(world)


WORKFLOW_DISCOVERS = "discover" in (REPO / "rules" / "common.smk").read_text()


@pytest.mark.skipif(
    not WORKFLOW_DISCOVERS, reason="rules/common.smk does not read storage.discover yet"
)
def test_a_new_series_under_a_discovered_prefix_runs_alone(world):
    world.upload(CT[2])
    world.upload(WSI[2])
    write_samples(world.workdir, [(WSI[0], "wsi", world.uri(WSI[2]))])
    write_config(
        world.workdir,
        destination=f"s3://{world.bucket}/published",
        storage={
            "endpoint_url": world.endpoint,
            "region": "us-east-1",
            "discover": [{"uri": f"s3://{world.bucket}/ct/", "modality": "ct"}],
        },
    )
    assert world.run().ran() == chain(CT[0], "ct") | chain(WSI[0], "wsi")
    assert world.run().ran() == set()

    world.upload(NEW_CT[2])
    assert world.run().ran() == chain(NEW_CT[0], "ct"), "only the new series runs"
    assert_published_complete(world, [CT, WSI, NEW_CT])
    assert world.run().ran() == set()
    assert_no_credentials_anywhere(world)
