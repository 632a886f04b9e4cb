"""Local files and folders as sources and destinations."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from medprep.common import atomic
from medprep.common.errors import InputError, defer
from medprep.common.parallel import thread_map
from medprep.storage import (
    IGNORED_NAMES,
    MISSING,
    PUBLISHED_MANIFEST,
    DestinationFull,
    DestinationUnusable,
    SourceFile,
    check_artifact_names,
    check_relative_key,
    fingerprint_of,
    layout,
    probe_name,
    refusal,
    safe_sample_name,
    sha256_file,
    slide_stem,
    volume_stem,
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


def _single_file_inputs(path: Path) -> list[Path]:
    """A file given as a sample's uri, with the data files of a MetaImage header (which
    must sit in the header's folder: ``medprep.ct.metaimage``)."""
    if path.suffix.lower() != ".mhd":
        return [path]
    from medprep.ct import metaimage

    data = [Path(p) for p in metaimage.read_header(str(path)).data_files]
    for file in data:
        if not file.is_file():
            raise InputError(
                f"MetaImage data file {file.name} (ElementDataFile) not found", path=str(path)
            )
    return [path, *data]


def source_fingerprint(uri: str, settings: dict[str, Any]) -> str:
    path = Path(uri)
    if path.is_file():
        try:
            inputs = _single_file_inputs(path)
        except InputError:
            inputs = [path]  # reported by download for this sample alone
        return fingerprint_of([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in inputs])
    if path.is_dir():
        return fingerprint_of(_file_entries(path))
    # A missing input is reported for this sample alone (medprep.workflow.parse), not here.
    return MISSING


def fetch(
    uri: str, target_dir: str | os.PathLike, *, threads: int, settings: dict[str, Any]
) -> list[SourceFile]:
    """Describe a local file or folder; local inputs are read in place, not copied."""
    path = Path(uri)
    if path.is_file():
        return [
            SourceFile(str(p.resolve()), p.name, p.stat().st_size, mtime_ns=p.stat().st_mtime_ns)
            for p in _single_file_inputs(path)
        ]
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


def _inside(root: Path, path: Path) -> bool:
    """``path``'s folder, links resolved, is ``root`` or under it."""
    try:
        return path.parent.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop on the way
        return False


# link failures after which a copy is made (another device, no hard links there)
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT}


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """A hard link on the same file system (no second copy), else a copy: "linked"/"copied".

    Safe to share: medprep writes every file to a temporary and renames it, so a working
    file rewritten later gets a new inode and never changes the published one.
    """
    try:
        os.link(source, target)
        return "linked"
    except OSError as error:
        if error.errno not in _NO_LINK:
            raise
        shutil.copyfile(source, target)
        return "copied"


@dataclass
class _Placement:
    """One file of the new version: where it comes from and how it gets there."""

    name: str
    source: Path
    bytes: int
    sha256: str
    final: Path = Path()  # in the new version folder, set once the version is known
    action: str = "copied"  # skipped (already there), linked, or copied
    link_from: Path | None = None  # a file of the previous publication with these bytes


def _describe(item: dict[str, str]) -> _Placement:
    source = Path(item["path"])
    return _Placement(item["name"], source, source.stat().st_size, sha256_file(source))


def _same_file(path: Path, size: int, checksum: str) -> bool:
    return (
        not path.is_symlink()
        and path.is_file()
        and path.stat().st_size == size
        and sha256_file(path) == checksum
    )


def _previous_files(
    manifest_path: Path, root: Path, sample: str | None
) -> tuple[dict[str, Any], dict[tuple[int, str], Path], list[str]]:
    """The old published manifest, its files by (bytes, SHA-256), and refusals.

    The old manifest is read from the destination, which others may write to: a path it
    lists is used (as the source of a hard link, after its bytes are checked) only if it
    is a plain relative name whose folder stays inside the publication.
    """
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return {}, {}, []
    where = str(manifest_path)
    try:
        old = atomic.read_json(manifest_path)
        entries = layout.manifest_files(old).values()
    except (ValueError, OSError, AttributeError) as error:
        cause = f"unreadable ({type(error).__name__}); nothing it lists is reused"
        return {}, {}, [refusal(sample, where, cause)]
    found, refused = {}, []
    for entry in entries:
        relative = entry["path"]
        try:
            check_relative_key(relative)
        except ValueError as error:
            shown = repr(relative)[:200]
            refused.append(refusal(sample, where, f"ignoring {shown}, listed in it: {error}"))
            continue
        path = manifest_path.parent / relative
        if not _inside(root, path):
            refused.append(
                refusal(
                    sample,
                    where,
                    f"ignoring {relative!r}, listed in it: a link on its "
                    "path leaves the publication's folder",
                )
            )
            continue
        if isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int):
            found[(entry["bytes"], entry["sha256"])] = path
    return old if isinstance(old, dict) else {}, found, refused


def _plan(place: _Placement, reusable: dict[tuple[int, str], Path], device: int) -> _Placement:
    """Decide how ``place`` reaches the new version (no writing)."""
    if _same_file(place.final, place.bytes, place.sha256):
        place.action = "skipped"  # an interrupted publish of this version got this far
    elif place.source.stat().st_dev == device:
        place.action = "linked"
    else:
        earlier = reusable.get((place.bytes, place.sha256))
        if (
            earlier is not None
            and _device(earlier) == device
            and _same_file(earlier, place.bytes, place.sha256)
        ):
            place.action, place.link_from = "linked", earlier
    return place


def _device(path: Path) -> int | None:
    try:
        return path.lstat().st_dev
    except OSError:
        return None


def _room_needed(plan: list[_Placement], block: int, manifest_bytes: int) -> int:
    """Bytes the copies take on a file system of ``block``-byte blocks (links take none)."""
    rounded = lambda size: -(-size // block) * block  # noqa: E731
    return sum(rounded(p.bytes) for p in plan if p.action == "copied") + rounded(manifest_bytes)


def _free_bytes(folder: Path) -> tuple[int, int]:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize, stats.f_frsize


def _no_room(destination: str, cause: str, need: int, free: int) -> DestinationFull:
    return DestinationFull(
        f"{cause}: publishing needs {need:,} bytes there, {free:,} are free; nothing was "
        "switched, the previous publication is kept",
        path=destination,
    )


def _place(place: _Placement) -> _Placement:
    if place.action == "skipped":
        return place
    with atomic.atomic_path(place.final) as tmp:
        if place.link_from is not None:
            os.link(place.link_from, tmp)
        else:
            place.action = link_or_copy(place.source, tmp)
    return place


def _remove_new(plan: list[_Placement], folder: Path, existed: bool) -> None:
    """Give back the room a failed publish took in the new version folder."""
    for place in plan:
        if place.action != "skipped":
            place.final.unlink(missing_ok=True)
    atomic.remove_stale_temporaries(folder, recursive=True)
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)


def publish(
    artifacts: list[dict[str, str]],
    destination: str,
    *,
    manifest: dict[str, Any],
    threads: int,
    settings: dict[str, Any],
    superseded: str = "remove",
) -> dict[str, Any]:
    """Place ``artifacts`` in the version folder of their content under folder
    ``destination``, then switch ``manifest.json`` to it (see ``medprep.storage.layout``).

    Files come as hard links where the working files or an earlier version's identical
    files are on the same file system, else as copies, each written to a temporary and
    renamed. The room the copies need is checked before anything is written; a file
    system that fills up anyway (another writer, inodes, a quota) gets back what this
    publish wrote. Nothing outside the folder is touched: artifact names are checked like
    object keys, a link on the way that leaves the folder is refused, and paths the old
    manifest lists are used only to find identical bytes, after checking them.
    """
    check_artifact_names(artifacts)
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    sample = manifest.get("sample")
    described = list(thread_map(_describe, artifacts, threads))
    version = layout.version_of((p.name, p.sha256) for p in described)
    folder = target / version
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(
            f"refusing to publish into {version}: it is not a folder of this publication",
            path=str(target),
        )
    inside: dict[Path, bool] = {}  # by folder: thousands of tiles share a few
    for place in described:
        place.final = folder / place.name
        if place.final.parent not in inside:
            inside[place.final.parent] = _inside(root, place.final)
        if not inside[place.final.parent]:
            raise InputError(
                f"refusing to publish {place.name}: a link on its path leaves the sample folder",
                path=str(target),
            )
        if place.final.is_dir() and not place.final.is_symlink():
            raise InputError(
                f"cannot publish {place.name}: a folder of that name is in the way",
                path=str(target),
            )
    manifest_path = target / PUBLISHED_MANIFEST
    old, reusable, refused = _previous_files(manifest_path, root, sample)
    removed_temporaries = atomic.remove_stale_temporaries(target, recursive=True)
    if removed_temporaries:
        log.info("removed %d temporary file(s) of an interrupted publish", removed_temporaries)
    device = target.stat().st_dev
    plan = list(thread_map(lambda p: _plan(p, reusable, device), described, threads))
    published = {
        **manifest,
        "layout": layout.LAYOUT,
        "version": version,
        "files": [
            {
                "name": p.name,
                "path": layout.path_in(version, p.name),
                "bytes": p.bytes,
                "sha256": p.sha256,
            }
            for p in plan
        ],
    }
    body = json.dumps(published, indent=2, default=str, allow_nan=False) + "\n"
    free, block = _free_bytes(target)
    need = _room_needed(plan, block, len(body.encode()))
    if need > free:
        raise _no_room(str(target), "not enough space left on the device", need, free)
    existed = folder.is_dir()
    try:
        files = list(thread_map(_place, plan, threads))
        if not _unchanged_manifest(manifest_path, body):
            atomic.write_text(manifest_path, body)  # the switch
    except OSError as error:
        if error.errno not in _NO_ROOM:
            raise
        _remove_new(plan, folder, existed)
        free, _ = _free_bytes(target)
        cause = os.strerror(error.errno).lower()
        raise _no_room(str(target), cause, need, free) from None
    versions, legacy, refusals = _superseded(target, version, sample)
    refused += refusals
    removed: list[str] = []
    if superseded == "remove" and (versions or legacy):
        outcome = remove_superseded(str(target), versions, legacy, settings, sample=sample)
        removed = outcome["removed"]
        refused += [line for line in outcome["refused"] if line not in refused]
    for line in refused:
        log.warning("%s", line)
    copied = sum(p.action == "copied" for p in files)
    linked = sum(p.action == "linked" for p in files)
    log.info(
        "published %d files to %s/%s (%d linked, %d copied, %d unchanged)",
        len(files),
        target,
        version,
        linked,
        copied,
        len(files) - copied - linked,
    )
    return {
        "destination": str(target),
        "manifest": str(manifest_path),
        "manifest_sha256": sha256_file(manifest_path),
        "version": version,
        "files": [
            {
                "name": p.name,
                "path": layout.path_in(version, p.name),
                "bytes": p.bytes,
                "sha256": p.sha256,
                "action": p.action,
            }
            for p in files
        ],
        "superseded": {"versions": versions, "legacy": legacy},
        "removed": removed,
        "refused": refused,
    }


def _unchanged_manifest(path: Path, body: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == body
    except OSError:
        return False


def _superseded(
    target: Path, version: str, sample: str | None
) -> tuple[list[str], bool, list[str]]:
    """What the folder holds besides ``version`` and the manifest: other version folders,
    and whether files of the earlier layout are there."""
    versions, legacy, refused = [], False, []
    with os.scandir(target) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == PUBLISHED_MANIFEST or atomic.is_temporary_name(entry.name):
                continue
            if layout.is_version(entry.name):
                if entry.name == version:
                    continue
                if entry.is_symlink() or not entry.is_dir():
                    refused.append(
                        refusal(
                            sample,
                            entry.path,
                            "not a version folder of this publication "
                            "(a link or a file under that name); left alone",
                        )
                    )
                    continue
                versions.append(entry.name)
            else:
                legacy = True
    return versions, legacy, refused


def _current_version(target: Path) -> str | None:
    """The version ``manifest.json`` points at; None without one, for the earlier layout
    or an unreadable manifest."""
    path = target / PUBLISHED_MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return layout.manifest_version(atomic.read_json(path))
    except (OSError, ValueError):
        return None


def remove_superseded(
    destination: str,
    versions: list[str],
    legacy: bool,
    settings: dict[str, Any],
    *,
    threads: int = 1,
    sample: str | None = None,
) -> dict[str, Any]:
    """Remove version folders ``versions`` and (``legacy``) the files of the earlier layout
    from folder ``destination``; never what its ``manifest.json`` points at, never through
    a link (a link is removed as a link; a link to a folder is refused)."""
    target = Path(destination)
    removed: list[str] = []
    refused: list[str] = []
    if not target.is_dir() or target.is_symlink():
        return {"removed": removed, "refused": refused}
    current = _current_version(target)
    for version in sorted(set(versions)):
        if not layout.is_version(version) or version == current:
            continue
        folder = target / version
        if folder.is_symlink():
            refused.append(refusal(sample, str(folder), "a link, not a version folder; left alone"))
        elif folder.is_dir():
            shutil.rmtree(folder)
            removed.append(version)
    # files of the earlier layout go only once a manifest of this layout is in place
    if legacy and current is not None:
        with os.scandir(target) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                name = entry.name
                if (
                    name == PUBLISHED_MANIFEST
                    or layout.is_version(name)
                    or atomic.is_temporary_name(name)
                ):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # links inside are removed, never followed
                elif entry.is_symlink() and entry.is_dir():
                    refused.append(refusal(sample, entry.path, "a link to a folder; left alone"))
                    continue
                else:
                    os.unlink(entry.path)
                removed.append(name)
    if removed:
        log.info("removed %s from %s: superseded", ", ".join(removed[:10]), target)
    return {"removed": removed, "refused": refused}


def published_state(
    destination: str, names: list[str], settings: dict[str, Any], *, fresh: bool, checksum: bool
) -> dict[str, dict[str, Any]]:
    """Size and modification time (and SHA-256 with ``checksum``) of each regular file
    ``name`` (a path relative to the folder) under ``destination``; names that are
    missing, not regular files or behind a link leaving the folder are left out. One
    ``lstat`` per name.
    """
    target = Path(destination)
    if not target.is_dir():
        return {}
    root = target.resolve()
    inside: dict[Path, bool] = {}
    found = {}
    for name in names:
        try:
            check_relative_key(name)
        except ValueError:
            continue
        path = target / name
        if path.parent not in inside:
            inside[path.parent] = _inside(root, path)
        if not inside[path.parent]:
            continue
        try:
            stat = path.lstat()
        except OSError:
            continue
        if not S_ISREG(stat.st_mode):
            continue
        entry: dict[str, Any] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if checksum:
            entry["sha256"] = sha256_file(path)
        found[name] = entry
    return found


def check_destination(destination: str, settings: dict[str, Any]) -> None:
    """Create folder ``destination`` and write and delete a probe file in it."""
    target = Path(destination)
    probe = target / probe_name()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb") as f:
            f.write(b"medprep write check\n")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        failed = f" ({error.filename})" if error.filename else ""
        raise DestinationUnusable(
            f"destination {destination}: cannot publish there: {reason}{failed}"
        ) from None


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
        elif modality == "ct" and entry.is_file() and (stem := volume_stem(entry.name)):
            raw = stem  # a CT volume: .mhd (+ data file), .nii, .nii.gz
        elif modality == "wsi" and entry.is_file() and (stem := slide_stem(entry.name)):
            raw = stem
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
