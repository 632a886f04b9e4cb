"""Where inputs come from and where results go: local paths or ``s3://`` URIs.

Four operations, each dispatched on the URI's scheme:

- ``source_fingerprint(uri)``: a short string that changes when the input changes
  (local: names, sizes and modification times; S3: keys, sizes and ETags). The workflow
  passes it as a parameter of ``download`` so that Snakemake reruns a sample's chain
  when, and only when, its input changed.
- ``fetch(uri, target_dir)``: make the input available as local files (local inputs are
  used in place; S3 objects are downloaded) and describe them.
- ``publish(artifacts, destination)``: copy a sample's results, data first and
  ``manifest.json`` last, skipping files already there with the same checksum.
- ``discover(prefix, modality)``: list samples under a prefix.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any

S3_SCHEME = "s3://"
PUBLISHED_MANIFEST = "manifest.json"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


@dataclass
class SourceFile:
    """One input file made available locally."""

    path: str  # local path to read
    key: str  # name relative to the sample's URI (folder-relative path or object key suffix)
    bytes: int
    etag: str | None = None
    last_modified: str | None = None
    mtime_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_of(entries: list[tuple]) -> str:
    """A short stable digest of a sorted listing."""
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(repr(entry).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _backend(uri: str):
    if is_s3(uri):
        from medprep.storage import s3

        return s3
    from medprep.storage import local

    return local


def source_fingerprint(uri: str, settings: dict[str, Any] | None = None) -> str:
    return _backend(uri).source_fingerprint(uri, settings or {})


def fetch(
    uri: str, target_dir: str | os.PathLike, *, threads: int = 1, settings: dict[str, Any] | None = None
) -> list[SourceFile]:
    return _backend(uri).fetch(uri, target_dir, threads=threads, settings=settings or {})


def publish(
    artifacts: list[dict[str, str]],
    destination: str,
    *,
    manifest: dict[str, Any],
    threads: int = 1,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish ``artifacts`` into folder/prefix ``destination``; return the receipt.

    ``manifest`` is the content of the published ``manifest.json``, to which the list of
    files (name, bytes, sha256) is added. It is written after every data file.
    """
    return _backend(destination).publish(
        artifacts, destination, manifest=manifest, threads=threads, settings=settings or {}
    )


def discover(prefix: str, modality: str, settings: dict[str, Any] | None = None) -> list[dict[str, str]]:
    return _backend(prefix).discover(prefix, modality, settings or {})


def join(base: str, *parts: str) -> str:
    """Join a local path or an S3 URI with relative parts."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)
