"""Working files: removed after a sample's upload, fetched again when a later run needs them.

A sample's working files are the raw download of an ``s3://`` input (listed in
``download.json``) and the bulk intermediates that ``upload`` has published (artifacts
listed in ``preprocess.json`` and ``tile.json`` that are not rule outputs: CT volume,
lung mask and patches; slide tile shards). Step manifests, summaries and QC pictures are
rule outputs and always stay: they are small, and the report and the rerun logic read them.

They are not ``temp()`` outputs on purpose. Snakemake removes a ``temp()`` output that no
later job declares as input right after its own job, and reruns a job whose ``temp()``
output is missing whenever a job that needs it reruns: a changed tile setting would then
rerun ``preprocess_ct`` and download the raw scan again. Instead, a step that finds a
working file of its input gone restores just that file (``restore_inputs``): the raw input
from its source, an intermediate from the published copy, both checked. When the
published copy is gone too, the workflow reruns the step that makes the file
(``medprep.workflow.parse.publication_state``), which fetches the source again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from medprep import storage
from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.common.redact import redact
from medprep.storage import layout

log = logging.getLogger(__name__)


def keep_working_files(setting: bool | None, uri: str) -> bool:
    """``keep_working_files`` for a sample: null = keep for local inputs, remove for S3."""
    if setting is not None:
        return bool(setting)
    return not storage.is_s3(uri)


def working_files(
    manifests: list[dict[str, Any]], rule_outputs: set[str], raw_dir: str | None
) -> list[Path]:
    """Files to remove after upload: artifacts that are not rule outputs, and the raw
    download (with its download record) when ``raw_dir`` is its folder."""
    keep = {os.path.abspath(p) for p in rule_outputs}
    found: list[Path] = []
    for step in manifests:
        if step.get("step") == "download":
            if raw_dir:
                from medprep.storage.s3 import DOWNLOAD_STATE

                found.extend(Path(f["path"]) for f in step.get("files", []))
                found.append(Path(raw_dir) / DOWNLOAD_STATE)
            continue
        for artifact in step.get("artifacts", []):
            if os.path.abspath(artifact["path"]) not in keep:
                found.append(Path(artifact["path"]))
    return found


def remove_working_files(paths: list[Path]) -> int:
    """Remove ``paths`` (and folders left empty); return the bytes freed."""
    freed = 0
    folders = set()
    for path in paths:
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != folder.parent:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): stop climbing
                break
            folder = folder.parent
    return freed


def restore_inputs(smk: Any) -> None:
    """Fetch again the working files that the job's input manifests list and that are gone."""
    for path in smk.input:
        if not (str(path).endswith(".json") and os.path.isfile(path)):
            continue
        try:
            step = atomic.read_json(path)
        except ValueError:
            continue
        if not isinstance(step, dict) or "step" not in step:
            continue
        if step["step"] == "download":
            _restore_download(step, path, smk.config["storage"])
        elif step.get("artifacts"):
            _restore_artifacts(step, smk.config["destination"], smk.config["storage"])


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _restore_download(step: dict[str, Any], manifest_path: str, settings: dict[str, Any]) -> None:
    missing = _missing([f["path"] for f in step.get("files", [])])
    if not missing:
        return
    source = step.get("source", "")
    if not storage.is_s3(source):
        raise InputError("input file is gone", path=missing[0])
    target = str(manifest_path)[: -len(".json")]
    log.info("fetching the raw input again (%d files were removed after upload)", len(missing))
    files = storage.fetch(
        source, target, threads=settings.get("connections", 16), settings=settings
    )
    if storage.files_fingerprint(files) != step.get("fingerprint"):
        raise InputError(
            "the input changed since it was processed; run the workflow again", path=source
        )


def _restore_artifacts(step: dict[str, Any], destination: str, settings: dict[str, Any]) -> None:
    missing = [a for a in step["artifacts"] if not os.path.exists(a["path"])]
    if not missing:
        return
    published = storage.join(destination, step["modality"], step["sample"])
    listed = layout.manifest_files(_published_manifest(published, settings))
    if any(a["name"] not in listed for a in missing):
        # the published manifest is lost or older: the snapshot of the last upload
        from medprep.storage import published as published_check

        snapshot = published_check.published_files(
            published_check.state_path(step["modality"], step["sample"])
        )
        listed = {**snapshot, **listed}
    log.info(
        "fetching %d removed working files of %s from %s",
        len(missing),
        step["step"],
        redact(published),
    )
    for artifact in missing:
        record = listed.get(artifact["name"])
        try:
            if record is None:
                raise FileNotFoundError(artifact["name"])
            _fetch_one(storage.join(published, record["path"]), artifact["path"], record, settings)
        except FileNotFoundError:
            raise InputError(
                f"working file {artifact['name']} was removed after upload and is not "
                "published at this destination any more (and the check of published files "
                "did not see it go: storage.verify_published); rerun with --forcerun "
                f"{step['step']}_{step['modality']} to make it again from the source",
                path=artifact["path"],
            ) from None


def _published_manifest(published: str, settings: dict[str, Any]) -> dict[str, Any]:
    uri = storage.join(published, storage.PUBLISHED_MANIFEST)
    try:
        if not storage.is_s3(uri):
            return atomic.read_json(uri)
        with tempfile.TemporaryDirectory() as tmp:
            (local,) = storage.fetch(uri, tmp, threads=1, settings=settings)
            return atomic.read_json(local.path)
    except (InputError, OSError, ValueError):
        return {}


def _fetch_one(uri: str, final: str, record: dict[str, Any], settings: dict[str, Any]) -> None:
    """Fetch one published file to ``final``, checked against its published SHA-256;
    FileNotFoundError when it is not there."""
    final_path = Path(final)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_path.parent, prefix=".restore-") as tmp:
        if storage.is_s3(uri):
            try:
                (local,) = storage.fetch(
                    uri, tmp, threads=settings.get("connections", 16), settings=settings
                )
            except InputError:  # no object there (or no bucket)
                raise FileNotFoundError(redact(uri)) from None
            fetched = Path(local.path)
        else:
            fetched = Path(tmp) / final_path.name
            try:
                os.link(uri, fetched)
            except OSError:
                import shutil

                shutil.copyfile(uri, fetched)
        if storage.sha256_file(fetched) != record["sha256"]:
            raise InputError("published copy does not match its manifest.json", path=redact(uri))
        os.replace(fetched, final_path)


def write_rebuild_record(record: str | os.PathLike, wildcards: Any, log_path: str) -> None:
    """Rule ``rebuild``: the record that makes a step run again when the destination lost
    what it made and its working files are gone (``medprep.workflow.parse``'s
    ``publication_state``); only the newest record of a step stays, as its input."""
    record = Path(record)
    why = (
        "the destination lost files this step made, and their working copies were removed "
        "after upload: the step makes them again from the source"
    )
    atomic.write_json(
        record,
        {
            "sample": wildcards.sample,
            "modality": wildcards.modality,
            "rebuilds": wildcards.step,
            "number": int(wildcards.number),
            "why": why,
        },
    )
    for older in record.parent.glob(f"{wildcards.step}-*.json"):
        if older != record:
            older.unlink(missing_ok=True)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(f"{wildcards.step} of sample {wildcards.sample}: {why}\n")
