"""Local files and folders as sources and destinations."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from medprep import atomic
from medprep.errors import InputError, defer
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


def _list_files(root: Path) -> list[tuple[str, os.stat_result]]:
    """Regular files under folder ``root``, recursively, as (path, stat), sorted by path.

    Hidden files and folders are skipped. Symbolic links are followed, with limits that
    keep the listing inside the sample: a link to a folder outside ``root`` is refused,
    and so is a folder reached twice (a link loop, or a link or mount to a folder listed
    already; folders are told apart by device and inode). A link to a file may point
    anywhere (data stores such as git-annex keep files behind links). A broken link, an
    unreadable folder or an entry that is neither a file nor a folder (device, socket,
    pipe) is refused too. Every refusal is an ``InputError`` naming the entry.
    """
    top = os.path.realpath(root)
    root_stat = os.stat(root)
    listed = {(root_stat.st_dev, root_stat.st_ino): str(root)}
    found: list[tuple[str, os.stat_result]] = []
    stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [
        (str(root), ((root_stat.st_dev, root_stat.st_ino),))
    ]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as error:
            raise InputError(f"cannot list folder: {error.strerror}", path=folder) from None
        for entry in entries:
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES:
                continue
            info = _stat_entry(entry)
            if stat.S_ISREG(info.st_mode):
                found.append((entry.path, info))
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise InputError(
                    "not a regular file or folder (a device, socket or pipe); refused",
                    path=entry.path,
                )
            identity = (info.st_dev, info.st_ino)
            target = os.path.realpath(entry.path)
            if entry.is_symlink() and os.path.commonpath([top, target]) != top:
                raise InputError(
                    f"symbolic link to {target}, a folder outside the sample's folder "
                    f"{top}; refused",
                    path=entry.path,
                )
            if identity in ancestors:
                raise InputError(
                    f"symbolic link loop: leads back to {target}, a folder that contains it",
                    path=entry.path,
                )
            if identity in listed:
                raise InputError(
                    f"the same folder as {listed[identity]} (a link or a mount): its files "
                    "would be listed twice",
                    path=entry.path,
                )
            listed[identity] = entry.path
            stack.append((entry.path, (*ancestors, identity)))
    return sorted(found, key=lambda item: item[0])


def _stat_entry(entry: os.DirEntry) -> os.stat_result:
    """The entry's stat, links followed; an ``InputError`` for broken links and loops."""
    try:
        return entry.stat(follow_symlinks=True)
    except OSError as error:
        if error.errno == errno.ELOOP:
            cause = "symbolic link loop (too many levels of links)"
        elif entry.is_symlink() and error.errno == errno.ENOENT:
            cause = f"broken symbolic link (to {os.readlink(entry.path)}, which does not exist)"
        else:
            cause = f"cannot be read: {error.strerror}"
        raise InputError(cause, path=entry.path) from None


def _file_entries(folder: Path) -> list[tuple[str, int, int]]:
    """(path relative to ``folder``, size, mtime_ns) of the files ``_list_files`` finds."""
    return [
        (os.path.relpath(path, folder), info.st_size, info.st_mtime_ns)
        for path, info in _list_files(folder)
    ]


def source_fingerprint(uri: str, settings: dict[str, Any]) -> str:
    path = Path(uri)
    if path.is_file():
        info = path.stat()
        return fingerprint_of([(path.name, info.st_size, info.st_mtime_ns)])
    if path.is_dir():
        return fingerprint_of(_file_entries(path))
    # A missing input is reported by `download` for this sample alone, not at DAG build.
    return "missing"


def fetch(
    uri: str, target_dir: str | os.PathLike, *, threads: int, settings: dict[str, Any]
) -> list[SourceFile]:
    """Describe a local file or folder; local inputs are read in place, not copied."""
    path = Path(uri)
    if path.is_file():
        info = path.stat()
        return [SourceFile(str(path.resolve()), path.name, info.st_size, mtime_ns=info.st_mtime_ns)]
    if path.is_dir():
        files = [
            SourceFile(
                str(Path(full).resolve()),
                os.path.relpath(full, path),
                info.st_size,
                mtime_ns=info.st_mtime_ns,
            )
            for full, info in _list_files(path)
        ]
        if not files:
            raise InputError("folder is empty", path=str(path))
        return files
    raise InputError("does not exist", path=str(path))


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
                shutil.copyfile(source, tmp)
            action = "copied"
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
    log.info(
        "published %d files to %s (%d copied, %d unchanged)",
        len(files),
        target,
        copied,
        len(files) - copied,
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
            "fingerprint": _fingerprint_or_deferred(uri, settings),
        }
        for name, uri in sorted(uri_of.items())
    ]


def _fingerprint_or_deferred(uri: str, settings: dict[str, Any]) -> str:
    """One bad folder must not stop the discovery of the others: its download reports it."""
    try:
        return source_fingerprint(uri, settings)
    except InputError as error:
        return defer(error, path=uri)
