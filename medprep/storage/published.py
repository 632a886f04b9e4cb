"""On a rerun, notice a published file that went missing or changed, and republish.

After publishing a sample, the upload job records a snapshot of what it published
(``record``), in the working directory: for every published file (``manifest.json``
included) its size, what the store tells cheaply about a change (local: modification
time; S3: ETag, from a listing) and its SHA-256.

At DAG build, ``check`` compares the destination with that snapshot. Its ``generation``
is the snapshot's generation number while the destination matches, and the next number
when a file is missing or changed. The workflow passes the number as a parameter of ``upload``,
so a changed destination is a changed parameter: Snakemake reruns that sample's upload,
and only it (``--rerun-triggers params``, a default). The republish records the new
number, so the run after it has nothing to do. (A plain fingerprint of the destination
cannot do this: Snakemake keeps the parameters a job had when it was scheduled, that is
of the destination before the upload, and would rerun every upload once more.) The
number depends only on the snapshot and the destination, never on ``upload.json``, which
Snakemake deletes before the job runs: a cluster job that evaluates the parameter again
gets the same number as the main process.

When the destination lost a file that no local copy is left of (a working file, removed
after upload), the step that makes it runs again from the source (``Check.lost_names``;
``medprep.workflow.parse.publication_state``).

``storage.verify_published`` chooses the check:

- ``size`` (default): sizes and modification times (local; one ``lstat`` per published
  file) or sizes and ETags (S3; one listing per sample prefix, or one of their common
  parent for many samples, from the listing cache);
- ``checksum``: local files are hashed too (SHA-256 of everything published, at every
  DAG build); on S3 the ETag already is the store's checksum of the content;
- ``none``: no check.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprep.common import atomic
from medprep.common.redact import redact
from medprep.storage import PUBLISHED_MANIFEST, _backend, join, layout, refusal

log = logging.getLogger(__name__)

STATE_DIR = Path(".snakemake") / "medprep" / "published"
MODES = ("size", "checksum", "none")
DEFAULT_MODE = "size"
STATE_FORMAT = 1

_checked: dict[tuple[str, str, str], Check] = {}


def state_path(modality: str, sample: str, base: str | os.PathLike = ".") -> Path:
    """Where the snapshot of a sample's publication is kept (under ``.snakemake/``)."""
    return Path(base) / STATE_DIR / modality / f"{sample}.json"


def mode_of(settings: dict[str, Any]) -> str:
    mode = settings.get("verify_published") or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"storage.verify_published must be one of {MODES}, not {mode!r}")
    return mode


def record(
    path: str | os.PathLike,
    destination: str,
    generation: int,
    receipt: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Write the snapshot of what ``receipt`` (from ``storage.publish``) says was published.

    Sizes and ETags or modification times come from the destination itself, read once
    more right after publishing (one listing on S3); SHA-256 from the receipt. Files are
    keyed by their path in the publication (``medprep.storage.layout``), with their name.
    """
    by_path = {layout.entry_path(f): f for f in receipt["files"]}
    sha256 = {relative: f["sha256"] for relative, f in by_path.items()}
    sha256[PUBLISHED_MANIFEST] = receipt.get("manifest_sha256")
    current = _backend(destination).published_state(
        destination, list(sha256), settings, fresh=True, checksum=False
    )
    missing = sorted(set(sha256) - set(current))
    if missing:
        raise RuntimeError(f"just published but not found at the destination: {missing[:5]}")
    files = {}
    for relative in sorted(sha256):
        entry = {**current[relative], "sha256": sha256[relative]}
        if relative in by_path:
            entry["name"] = by_path[relative]["name"]
        files[relative] = entry
    snapshot = {
        "format": STATE_FORMAT,
        "destination": redact(destination),
        "generation": int(generation),
        "version": receipt.get("version"),
        "files": files,
    }
    atomic.write_json(path, snapshot)
    return snapshot


def _read(path: Path) -> dict[str, Any] | None:
    try:
        snapshot = atomic.read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(snapshot, dict) or snapshot.get("format") != STATE_FORMAT:
        return None
    return snapshot


def published_files(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What the snapshot at ``path`` says was published, by name: each file's ``path`` in
    the publication and its ``sha256`` ({} without a snapshot). For restoring a working
    file when the published manifest is lost but the file is not."""
    snapshot = _read(Path(path)) or {}
    return {
        entry.get("name", relative): {"path": relative, "sha256": entry["sha256"]}
        for relative, entry in (snapshot.get("files") or {}).items()
        if relative != PUBLISHED_MANIFEST and entry.get("sha256")
    }


def differences(
    expected: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]], checksum: bool
) -> list[str]:
    """What changed, one phrase per file (``name: missing``, ``name: changed``), sorted."""
    found = []
    for name, want in sorted(expected.items()):
        have = current.get(name)
        if have is None:
            found.append(f"{name}: missing")
            continue
        keys = ["bytes", "etag", "mtime_ns"] + (["sha256"] if checksum else [])
        if any(k in want and k in have and want[k] != have[k] for k in keys):
            found.append(f"{name}: changed")
    return found


@dataclass(frozen=True)
class Check:
    """The destination compared with a sample's snapshot."""

    number: int  # the snapshot's generation number (0: never published here)
    changes: tuple[str, ...]  # ``path: missing`` / ``path: changed``, sorted
    snapshot: dict[str, Any]

    @property
    def generation(self) -> int:
        """What ``upload`` gets as its parameter: the next number when something changed."""
        return self.number + 1 if self.changes else self.number

    def lost_names(self) -> set[str]:
        """The names of the published files that went missing or changed (a snapshot of
        the earlier layout keys them by name)."""
        files = self.snapshot.get("files") or {}
        lost = set()
        for change in self.changes:
            path = change.rsplit(": ", 1)[0]
            lost.add((files.get(path) or {}).get("name", path))
        return lost


def check(
    destination: str,
    path: str | os.PathLike,
    settings: dict[str, Any],
    *,
    sample: str | None = None,
    announce: bool = False,
) -> Check:
    """The destination compared with the snapshot at ``path``; computed once per process
    and sample. ``announce``: print a warning when the check cannot be made."""
    key = (str(path), destination, mode_of(settings))
    if key not in _checked:
        _checked[key] = _check(destination, Path(path), settings, sample, announce)
    return _checked[key]


def describe(found: Check, destination: str, sample: str | None) -> str:
    """``sample S: file <first changed file>: missing (and N more) since it was published``."""
    first = found.changes[0]
    more = f" (and {len(found.changes) - 1} more)" if len(found.changes) > 1 else ""
    where = redact(join(destination, first.rsplit(": ", 1)[0]))
    cause = first.rsplit(": ", 1)[-1]
    return f"{refusal(sample, where, cause)}{more} since it was published"


def _check(
    destination: str, path: Path, settings: dict[str, Any], sample: str | None, announce: bool
) -> Check:
    snapshot = _read(path)
    if snapshot is None:
        return Check(0, (), {})
    number = int(snapshot.get("generation", 0))
    mode = mode_of(settings)
    # another destination: the `destination` parameter reruns the upload anyway
    if mode == "none" or snapshot.get("destination") != redact(destination):
        return Check(number, (), snapshot)
    expected = snapshot.get("files") or {}
    checksum = mode == "checksum"
    try:
        current = _backend(destination).published_state(
            destination, list(expected), settings, fresh=False, checksum=checksum
        )
    except Exception as error:  # noqa: BLE001 - a check that cannot run must not stop the DAG
        if announce:
            print(
                "medprep warning: "
                + refusal(
                    sample, redact(destination), f"cannot check the published files ({error})"
                )
                + "; assuming they are unchanged",
                file=sys.stderr,
            )
        return Check(number, (), snapshot)
    changes = differences(expected, current, checksum)
    if changes:
        log.info("%s: published files changed: %s", redact(destination), changes[:10])
    return Check(number, tuple(changes), snapshot)


def clear_cache() -> None:
    _checked.clear()
