"""Local files and folders as sources and destinations."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from stat import S_ISREG
from typing import Any

from medprep.common import atomic
from medprep.common.errors import InputError, defer
from medprep.common.parallel import thread_map
from medprep.storage import (
    IGNORED_NAMES,
    PUBLISHED_MANIFEST,
    DestinationUnusable,
    SourceFile,
    check_artifact_names,
    check_relative_key,
    fingerprint_of,
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
    # A missing input is reported by `download` for this sample alone, not at DAG build.
    return "missing"


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


def _previous_names(
    manifest_path: Path, sample: str | None, where: str
) -> tuple[set[str], list[str]]:
    """The names the old published manifest lists that are safe to act on, and refusals.

    The old manifest is read from the destination, which others may write to: every
    name is checked like an object key before publishing may remove it.
    """
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return set(), []
    try:
        entries = atomic.read_json(manifest_path).get("files", [])
    except (ValueError, OSError, AttributeError) as error:
        cause = f"unreadable ({type(error).__name__}); nothing it lists is removed"
        return set(), [refusal(sample, where, cause)]
    if not isinstance(entries, list):
        return set(), [refusal(sample, where, "its 'files' is not a list; ignored")]
    names, refused = set(), []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        try:
            check_relative_key(name)
        except ValueError as error:
            shown = repr(name if name is not None else entry)[:200]
            refused.append(
                refusal(sample, where, f"refusing to remove {shown}, listed in it: {error}")
            )
            continue
        names.add(name)
    return names, refused


def _remove_stale(
    root: Path, target: Path, name: str, sample: str | None, where: str
) -> str | None:
    """Remove published file ``name`` no longer part of the sample; a refusal line or None."""
    path = target / name
    if not _inside(root, path):
        return refusal(
            sample,
            where,
            f"refusing to remove {name!r}, listed in it: a link on its path leaves the sample folder",
        )
    if path.is_dir() and not path.is_symlink():
        return refusal(sample, where, f"refusing to remove {name!r}, listed in it: it is a folder")
    path.unlink(missing_ok=True)  # a link is removed as a link, never followed
    log.info("removed %s, no longer part of the sample", name)
    for parent in path.parents:  # folders the removal emptied
        if parent == target or not parent.is_relative_to(target):
            break
        try:
            parent.rmdir()
        except OSError:
            break
    return None


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
    """Copy ``artifacts`` into folder ``destination``, then write ``manifest.json``.

    Nothing outside the folder is touched: artifact names and the names the old
    manifest lists are checked like object keys, and a link on the way that leaves the
    folder is refused. A bad name in the old manifest is not removed (one warning line
    each, also in the receipt's ``refused``) and the sample is still published: the
    entry is someone else's doing, refusing to act on it is the safe part, and failing
    would let whoever can write to the destination block every republish. The new
    manifest then no longer lists it.
    """
    check_artifact_names(artifacts)
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    sample = manifest.get("sample")
    inside: dict[Path, bool] = {}  # by folder: thousands of tiles share a few
    for item in artifacts:
        final = target / item["name"]
        if final.parent not in inside:
            inside[final.parent] = _inside(root, final)
        if not inside[final.parent]:
            raise InputError(
                f"refusing to publish {item['name']}: a link on its path leaves the sample folder",
                path=str(target),
            )
        if final.is_dir() and not final.is_symlink():
            raise InputError(
                f"cannot publish {item['name']}: a folder of that name is in the way",
                path=str(target),
            )
    manifest_path = target / PUBLISHED_MANIFEST
    previous, refused = _previous_names(manifest_path, sample, str(manifest_path))
    # from here on the sample does not look complete until the new manifest lands
    manifest_path.unlink(missing_ok=True)
    removed_temporaries = atomic.remove_stale_temporaries(target, recursive=True)
    if removed_temporaries:
        log.info("removed %d temporary file(s) of an interrupted publish", removed_temporaries)

    def copy_one(item: dict[str, str]) -> dict[str, Any]:
        source = Path(item["path"])
        final = target / item["name"]
        size = source.stat().st_size
        checksum = sha256_file(source)
        same = (
            not final.is_symlink()
            and final.is_file()
            and final.stat().st_size == size
            and sha256_file(final) == checksum
        )
        if same:
            action = "skipped"
        else:
            with atomic.atomic_path(final) as tmp:
                action = link_or_copy(source, tmp)
        return {"name": item["name"], "bytes": size, "sha256": checksum, "action": action}

    files = list(thread_map(copy_one, artifacts, threads))
    names = {f["name"] for f in files}
    for stale in sorted(previous - names - {PUBLISHED_MANIFEST}):
        line = _remove_stale(root, target, stale, sample, str(manifest_path))
        if line:
            refused.append(line)
    for line in refused:
        log.warning("%s", line)
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
    return {
        "destination": str(target),
        "manifest": str(manifest_path),
        "manifest_sha256": sha256_file(manifest_path),
        "files": files,
        "refused": refused,
    }


def published_state(
    destination: str, names: list[str], settings: dict[str, Any], *, fresh: bool, checksum: bool
) -> dict[str, dict[str, Any]]:
    """Size and modification time (and SHA-256 with ``checksum``) of each regular file
    ``name`` under ``destination``; names that are missing, not regular files or behind
    a link leaving the folder are left out. One ``lstat`` per name.
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
        elif modality == "ct" and entry.is_file() and volume_stem(entry.name):
            raw = volume_stem(entry.name)  # a CT volume: .mhd (+ data file), .nii, .nii.gz
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
