"""The published layout: a folder's ``manifest.json`` and the version folders it points at.

A publication (a sample's files, or a run's dataset index) lives in one folder or prefix:

    {folder}/manifest.json                 which version is the publication, and its files
    {folder}/v-<16 hex digits>/{name}      the files of one version

A version folder is named after its content (a digest of every file's name and SHA-256),
so one name always holds the same bytes: a publish that was interrupted and runs again
writes into the same folder and skips what is already there, and a file of a version
never changes while anything points at it. ``manifest.json`` is the switch: it is written
last, in one write (a rename on a local disk, one PUT on S3), and a reader that reads it
reads the files it lists under their ``path``. The old version stays whole until after
the switch, so a reader sees the old publication or the new one, never neither and never
a mix; what the previous versions held is removed after the switch (or, for a sample,
once no dataset index refers to it: ``medprep.data.index``).

Earlier versions of medprep published the files under their names directly in the
folder (no ``version``, no ``path`` in the manifest: the *legacy* layout); readers read
both (``entry_path``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

VERSION_PREFIX = "v-"
VERSION = re.compile(r"^v-[0-9a-f]{16}$")
LAYOUT = 2  # the manifest's "layout"; 1 (or no key) = files under their names


def version_of(files: Iterable[tuple[str, str]]) -> str:
    """The version folder of files given as (name, SHA-256) pairs, in any order."""
    digest = hashlib.sha256()
    for name, sha256 in sorted(files):
        digest.update(f"{name}\0{sha256}\n".encode())
    return VERSION_PREFIX + digest.hexdigest()[:16]


def is_version(name: str) -> bool:
    return bool(VERSION.match(name))


def manifest_version(manifest: Any) -> str | None:
    """The version a published ``manifest.json`` (parsed) points at; None for the earlier
    layout or anything that is not one of ours."""
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, str) and is_version(version) else None


def path_in(version: str, name: str) -> str:
    """Where file ``name`` of ``version`` lives, relative to the publication's folder."""
    return f"{version}/{name}"


def entry_path(entry: dict[str, Any]) -> str:
    """Where a file a published manifest lists lives, relative to the folder (both layouts)."""
    return entry.get("path") or entry["name"]


def manifest_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The files a published manifest lists, by name (each with its ``path``)."""
    found = {}
    for entry in manifest.get("files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            found[entry["name"]] = {**entry, "path": entry_path(entry)}
    return found


def top_level(relative: str) -> str:
    return relative.split("/", 1)[0]


def check_names(names: Iterable[str]) -> None:
    """No artifact may live where version folders do (a name of the form ``v-<hex>/...``)."""
    for name in names:
        if is_version(top_level(name)):
            raise ValueError(f"artifact name {name!r} starts with a version folder's name")
