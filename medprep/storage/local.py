"""Local files and folders as sources and destinations."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medprep import atomic
from medprep.errors import InputError
from medprep.parallel import thread_map
from medprep.storage import (
    IGNORED_NAMES,
    PUBLISHED_MANIFEST,
    SourceFile,
    fingerprint_of,
    safe_sample_name,
    sha256_file,
    slide_stem,
)

log = logging.getLogger(__name__)


def _list_files(root: Path) -> list[os.DirEntry]:
    """Regular files under ``root``, recursively, hidden ones (and hidden folders) skipped."""
    found = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    found.append(entry)
    return sorted(found, key=lambda e: e.path)


def source_fingerprint(uri: str, settings: dict[str, Any]) -> str:
    path = Path(uri)
    if path.is_file():
        stat = path.stat()
        return fingerprint_of([(path.name, stat.st_size, stat.st_mtime_ns)])
    if path.is_dir():
        return fingerprint_of(
            [
                (os.path.relpath(e.path, path), e.stat().st_size, e.stat().st_mtime_ns)
                for e in _list_files(path)
            ]
        )
    # A missing input is reported by `download` for this sample alone, not at DAG build.
    return "missing"


def fetch(
    uri: str, target_dir: str | os.PathLike, *, threads: int, settings: dict[str, Any]
) -> list[SourceFile]:
    """Describe a local file or folder; local inputs are read in place, not copied."""
    path = Path(uri)
    if path.is_file():
        stat = path.stat()
        return [SourceFile(str(path.resolve()), path.name, stat.st_size, mtime_ns=stat.st_mtime_ns)]
    if path.is_dir():
        files = [
            SourceFile(
                str(Path(e.path).resolve()),
                os.path.relpath(e.path, path),
                e.stat().st_size,
                mtime_ns=e.stat().st_mtime_ns,
            )
            for e in _list_files(path)
        ]
        if not files:
            raise InputError("folder is empty", path=str(path))
        return files
    raise InputError("does not exist", path=str(path))


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """A hard link on the same file system (no second copy), else a copy: "linked"/"copied".

    Safe to share: medprep writes every file to a temporary and renames it, so a working
    file rewritten later gets a new inode and never changes the published one.
    """
    try:
        os.link(source, target)
        return "linked"
    except OSError:  # another device (EXDEV), or a file system without hard links
        shutil.copyfile(source, target)
        return "copied"


def publish(
    artifacts: list[dict[str, str]],
    destination: str,
    *,
    manifest: dict[str, Any],
    threads: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    manifest_path = target / PUBLISHED_MANIFEST
    previous = set()
    if manifest_path.exists():
        try:
            previous = {f["name"] for f in atomic.read_json(manifest_path).get("files", [])}
        except (ValueError, OSError):
            previous = set()
        # from here on the sample does not look complete until the new manifest lands
        manifest_path.unlink()
    atomic.remove_stale_temporaries(target)

    def copy_one(item: dict[str, str]) -> dict[str, Any]:
        source = Path(item["path"])
        final = target / item["name"]
        size = source.stat().st_size
        checksum = sha256_file(source)
        if final.is_file() and final.stat().st_size == size and sha256_file(final) == checksum:
            action = "skipped"
        else:
            with atomic.atomic_path(final) as tmp:
                action = link_or_copy(source, tmp)
        return {"name": item["name"], "bytes": size, "sha256": checksum, "action": action}

    files = list(thread_map(copy_one, artifacts, threads))
    for stale in sorted(previous - {f["name"] for f in files}):
        (target / stale).unlink(missing_ok=True)
        log.info("removed %s, no longer part of the sample", stale)
    published = {
        **manifest,
        "files": [{k: f[k] for k in ("name", "bytes", "sha256")} for f in files],
    }
    atomic.write_json(manifest_path, published)
    copied = sum(f["action"] == "copied" for f in files)
    linked = sum(f["action"] == "linked" for f in files)
    log.info(
        "published %d files to %s (%d linked, %d copied, %d unchanged)",
        len(files),
        target,
        linked,
        copied,
        len(files) - copied - linked,
    )
    return {"destination": str(target), "manifest": str(manifest_path), "files": files}


def discover(prefix: str, modality: str, settings: dict[str, Any]) -> list[dict[str, str]]:
    """Samples under a local folder: one per sub-folder (ct) or per slide file (wsi)."""
    root = Path(prefix)
    if not root.is_dir():
        raise InputError("discovery folder does not exist", path=str(root))
    if modality not in ("ct", "wsi"):
        raise ValueError(f"unknown modality {modality!r}")
    uri_of: dict[str, str] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
            continue
        if modality == "ct" and entry.is_dir():
            raw = entry.name
        elif modality == "wsi" and entry.is_file() and slide_stem(entry.name):
            raw = slide_stem(entry.name)
        else:
            continue
        name = safe_sample_name(raw, where=entry.path)
        if name in uri_of:
            raise InputError(
                f"two samples would be named {name}: {uri_of[name]} and {entry.path}",
                path=str(root),
            )
        uri_of[name] = entry.path
    return [
        {
            "sample": name,
            "modality": modality,
            "uri": uri,
            "fingerprint": source_fingerprint(uri, settings),
        }
        for name, uri in sorted(uri_of.items())
    ]
