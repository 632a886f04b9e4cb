"""The transfer steps: ``download``, ``upload`` and the fetch of an annotation file.

Each takes the job (``medprep.workflow.transfers.TransferJob``: the attributes a rule
script's ``snakemake`` object has) and runs in a transfer worker process, through
``medprep.workflow.runner.execute_step`` like every other step.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from medprep import __version__, storage
from medprep.common import atomic, statuses
from medprep.common.errors import InputError, undefer
from medprep.common.redact import redact
from medprep.storage import published as published_check
from medprep.workflow import manifest
from medprep.workflow import working_files as scratch

log = logging.getLogger("medprep.transfer")


def download(job: Any) -> None:
    """Rule ``download``: make a sample's input available locally and describe it."""
    # an error met while the DAG was built (e.g. a symbolic link loop in the folder)
    deferred = undefer(job.params.fingerprint)
    if deferred is not None:
        raise deferred
    settings = job.config["storage"]
    # storage.connections requests in flight
    files = storage.fetch(
        job.params.uri, job.params.target_dir, threads=settings["connections"], settings=settings
    )
    fingerprint = storage.files_fingerprint(files)
    if fingerprint != job.params.fingerprint:
        # The input changed between DAG build and now: what was downloaded is recorded,
        # and the next run sees a new fingerprint and reruns this sample once more.
        log.warning("input changed since the workflow started; recorded what was downloaded")
    total = sum(f.bytes for f in files)
    manifest.write_step_manifest(
        job.output.manifest,
        sample=job.wildcards.sample,
        modality=job.wildcards.modality,
        step="download",
        source=redact(job.params.uri),
        fingerprint=fingerprint,
        files=[f.to_dict() for f in files],
        total_bytes=total,
        summary={"status": statuses.OK, "warnings": [], "files": len(files), "bytes": total},
    )


def download_annotations(job: Any) -> None:
    """Rules ``download_annotations(_cohort)``: fetch an annotation file and describe it."""
    # an error met while the DAG was built (e.g. an unreadable path)
    deferred = undefer(job.params.fingerprint)
    if deferred is not None:
        raise deferred
    settings = job.config["storage"]
    files = storage.fetch(job.params.uri, job.params.target_dir, threads=1, settings=settings)
    if len(files) != 1:
        raise InputError(
            f"an annotation source must be one file, not {len(files)}", path=job.params.uri
        )
    wildcards = dict(job.wildcards.items())
    manifest.write_annotations_manifest(
        job.output.manifest,
        sample=wildcards.get("sample", "(cohort)"),
        modality=wildcards.get("modality", "ct"),
        source=redact(job.params.uri),
        files=[f.to_dict() for f in files],
        fingerprint=storage.files_fingerprint(files),
        scope=job.params.scope,
    )


def upload(job: Any) -> None:
    """Rule ``upload``: publish a sample's artifacts into a new version, then switch its
    manifest.json (``medprep.storage.layout``)."""
    steps = [manifest.read_step_manifest(path) for path in job.input.manifests]
    published = {
        "sample": job.wildcards.sample,
        "modality": job.wildcards.modality,
        "medprep": __version__,
        "steps": {step["step"]: step["summary"] for step in steps},
    }
    receipt = storage.publish(
        manifest.collect_artifacts(steps),
        job.params.destination,
        manifest=published,
        # storage.connections requests in flight
        threads=job.config["storage"]["connections"],
        settings=job.config["storage"],
        # earlier versions stay until no dataset index refers to them (the dataset rule
        # removes them: medprep.data.index.remove_superseded)
        superseded="keep",
    )
    for line in receipt.get("refused", []):
        print(f"medprep warning: {redact(line)}", file=sys.stderr)
    # what the next run compares the destination with (medprep.storage.published)
    published_check.record(
        published_check.state_path(job.wildcards.modality, job.wildcards.sample),
        job.params.destination,
        int(job.params.published_generation),
        receipt,
        job.config["storage"],
    )
    receipt["destination"] = redact(receipt["destination"])
    receipt["manifest"] = redact(receipt["manifest"])
    atomic.write_json(job.output.receipt, {"sample": job.wildcards.sample, **receipt})
    remove_working_files(job, steps)


def remove_working_files(job: Any, steps: list[dict[str, Any]]) -> None:
    """Published: the sample's working files go unless keep_working_files
    (medprep/workflow/working_files.py)."""
    download_manifest = manifest.read_step_manifest(job.params.download)
    source = download_manifest.get("source", "")
    if scratch.keep_working_files(job.config.get("keep_working_files"), source):
        return
    paths = scratch.working_files(
        [download_manifest, *steps],
        set(job.params.rule_outputs),
        raw_dir=job.params.download.removesuffix(".json") if storage.is_s3(source) else None,
    )
    freed = scratch.remove_working_files(paths)
    log.info("removed %d working files (%.1f MB) now published", len(paths), freed / 1e6)


STEPS = {"download": download, "annotations": download_annotations, "upload": upload}
