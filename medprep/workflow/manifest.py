"""Step manifests: the small JSON file each rule writes last and the next rule reads.

A step manifest names the sample, the step, the files the step produced that are worth
publishing (``artifacts``: the name inside the published sample folder and the local
path) and a ``summary`` of what the step found. Because the manifest is written last and
atomically, its presence means the step finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medprep import __version__
from medprep.common import atomic, statuses
from medprep.common.errors import InputError

MANIFEST_FORMAT = 1


def artifact(name: str, path: str | os.PathLike) -> dict[str, str]:
    """One publishable file: ``name`` inside the published folder, ``path`` on local disk."""
    from medprep.storage import check_relative_key

    try:
        check_relative_key(name)
    except ValueError as error:
        raise ValueError(
            f"artifact name must be a relative path inside the sample folder: {name!r}: {error}"
        ) from None
    return {"name": name, "path": os.fspath(path)}


def write_step_manifest(
    path: str | os.PathLike,
    *,
    sample: str,
    modality: str,
    step: str,
    artifacts: list[dict[str, str]] | None = None,
    summary: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    manifest = {
        "format": MANIFEST_FORMAT,
        "medprep": __version__,
        "sample": sample,
        "modality": modality,
        "step": step,
        **extra,
        "artifacts": artifacts or [],
        "summary": summary or {},
    }
    missing = [a["path"] for a in manifest["artifacts"] if not Path(a["path"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"step {step} of sample {sample} lists missing artifacts: {missing}"
        )
    atomic.write_json(path, manifest)
    return manifest


def read_step_manifest(path: str | os.PathLike) -> dict[str, Any]:
    manifest = atomic.read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a medprep step manifest of format {MANIFEST_FORMAT}")
    return manifest


def _loaded(manifest: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    return manifest if isinstance(manifest, dict) else read_step_manifest(manifest)


def artifact_path(step_manifest: str | os.PathLike | dict[str, Any], name: str) -> str:
    """The local path of the artifact ``name`` (e.g. ``preprocess/lung_mask.nii.gz``) that a
    step manifest (a path or the loaded dict) lists."""
    loaded = _loaded(step_manifest)
    for item in loaded.get("artifacts", []):
        if item["name"] == name:
            return item["path"]
    raise ValueError(
        f"{loaded.get('step')} manifest of sample {loaded.get('sample')} lists no {name}: "
        "rerun that step"
    )


def input_files(download_manifest: str | os.PathLike | dict[str, Any]) -> list[str]:
    """The local paths of a sample's input files, as its download manifest lists them."""
    return [entry["path"] for entry in _loaded(download_manifest).get("files", [])]


def collect_artifacts(manifests: list[dict[str, Any]]) -> list[dict[str, str]]:
    """All artifacts of several step manifests, in order; a later name replaces an earlier one."""
    by_name: dict[str, dict[str, str]] = {}
    for manifest in manifests:
        for item in manifest["artifacts"]:
            by_name[item["name"]] = item
    return list(by_name.values())


def annotation_file(annotations_manifest: str | os.PathLike | dict[str, Any]) -> str:
    """The local path of the annotation file that a ``download_annotations`` manifest
    (``results/{modality}/{sample}/annotations.json``, a path or the loaded dict) lists;
    ``InputError`` unless it lists exactly one."""
    loaded = _loaded(annotations_manifest)
    files = input_files(loaded)
    if len(files) != 1:
        where = None if isinstance(annotations_manifest, dict) else os.fspath(annotations_manifest)
        raise InputError(
            f"the annotation manifest of sample {loaded.get('sample')} lists {len(files)} "
            "files, not one",
            path=where,
        )
    return files[0]


def write_annotations_manifest(
    path: str | os.PathLike,
    *,
    sample: str,
    modality: str,
    source: str,
    files: list[dict[str, Any]],
    fingerprint: str,
    scope: str = "sample",
) -> dict[str, Any]:
    """The manifest of a fetched annotation file (rule ``download_annotations``).

    ``files``: the one fetched file (``SourceFile.to_dict()``); ``scope``: ``sample``
    (the sheet's ``annotations`` column) or ``cohort`` (``ct.annotations.csv``, one file
    for every CT sample, matched by series). ``source`` must be redacted already."""
    if scope not in ("sample", "cohort"):
        raise ValueError(f"annotation scope must be 'sample' or 'cohort', not {scope!r}")
    return write_step_manifest(
        path,
        sample=sample,
        modality=modality,
        step="annotations",
        source=source,
        scope=scope,
        fingerprint=fingerprint,
        files=files,
        summary={"status": statuses.OK, "warnings": [], "files": len(files)},
    )
