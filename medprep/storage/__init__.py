"""Where inputs come from and where results go: local paths or ``s3://`` URIs.

Four operations, each dispatched on the URI's scheme:

- ``source_fingerprint(uri)``: a short string that changes when the input changes
  (local: names, sizes and modification times; S3: keys, sizes and ETags). The workflow
  passes it as a parameter of ``download`` so that Snakemake reruns a sample's chain
  when, and only when, its input changed.
- ``fetch(uri, target_dir)``: make the input available as local files (local inputs are
  used in place; S3 objects are downloaded) and describe them.
- ``publish(artifacts, destination)``: copy a sample's results into a version folder
  named after their content, skipping files already there with the same checksum, then
  switch ``manifest.json`` to it (``medprep.storage.layout``).
- ``discover(prefix, modality)``: list samples under a prefix.

For thousands of S3 samples, fingerprints at DAG build are served from cached listings:
``expect_sources(uris)`` (no I/O) lets the S3 backend list each common parent prefix
once, ``prime_listing(prefix)`` lists one prefix explicitly, and ``discover`` caches the
listing it makes. Local paths need none of this (the calls are no-ops for them).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from medprep.common.errors import InputError

S3_SCHEME = "s3://"
PUBLISHED_MANIFEST = "manifest.json"
# the fingerprint of an input with nothing at its location
MISSING = "missing"

# file names in an input folder or prefix that are never image data
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}

# single-file slide formats: one object or file = one slide for discovery
SLIDE_SUFFIXES = (
    ".ome.tiff", ".ome.tif", ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide", ".bif",
)  # fmt: skip


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
    verified: str | None = None  # check made after download: sha256, md5, multipart-md5, size

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


def files_fingerprint(files: list[SourceFile]) -> str:
    """The ``source_fingerprint`` of exactly these files (as returned by ``fetch``)."""
    return fingerprint_of(
        [(f.key, f.bytes, f.etag if f.etag is not None else f.mtime_ns) for f in files]
    )


def check_relative_key(key: str) -> str:
    """Return ``key`` if it is a plain relative path; ValueError if it could leave its folder.

    The one check for every name that becomes a path or key under a sample's folder:
    object keys of downloads, artifact names and the names an old published manifest
    lists. Backslashes are refused too: a Windows reader (or an SMB share) takes them
    for separators.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty or not a string")
    if key.startswith("/"):
        raise ValueError("is an absolute path")
    if "\x00" in key:
        raise ValueError("contains a NUL character")
    if "\\" in key:
        raise ValueError("contains a backslash")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("has an empty, '.' or '..' path component")
    return key


def check_artifact_names(artifacts: list[dict[str, str]]) -> None:
    """Artifact names are plain relative keys, unique, not the published manifest's, and
    not under a version folder's name."""
    from medprep.storage import layout

    names = set()
    for item in artifacts:
        name = item["name"]
        try:
            check_relative_key(name)
        except ValueError as error:
            raise ValueError(f"artifact name {name!r} cannot be published: {error}") from None
        layout.check_names([name])
        if name == PUBLISHED_MANIFEST:
            raise ValueError(f"artifact name {name} is reserved for the published manifest")
        if name in names:
            raise ValueError(f"two artifacts are named {name}")
        names.add(name)


def refusal(sample: str | None, where: str, cause: str) -> str:
    """The one line that says what publishing refused to touch, and why."""
    return str(InputError(cause, path=where, sample=sample))


def is_hidden(relative: str) -> bool:
    """Hidden files and folders (dot names) and OS clutter are not sample data."""
    parts = relative.split("/")
    return parts[-1] in IGNORED_NAMES or any(
        p.startswith(".") and p not in (".", "..") for p in parts
    )


def slide_stem(name: str) -> str | None:
    """``A1.svs`` -> ``A1``; None if ``name`` is not a single-file slide."""
    lowered = name.lower()
    for suffix in SLIDE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


# single-file CT volumes: one file = one sample for discovery (a .mhd brings its data file)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd")
# data files a MetaImage header (.mhd) names in ElementDataFile: LUNA16 keeps x.mhd + x.raw
METAIMAGE_DATA_SUFFIXES = (".raw", ".zraw")


def volume_stem(name: str) -> str | None:
    """``1.3.6...mhd`` -> ``1.3.6...``; None if ``name`` is not a CT volume file."""
    lowered = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def safe_sample_name(raw: str, where: str = "") -> str:
    """A sample name from a folder, prefix or file name: characters outside
    ``[A-Za-z0-9._-]`` become ``_``, leading non-alphanumerics go, at most 128 characters.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", raw)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:128]
    from medprep.common.settings import periodic_suffix_pattern, sample_name_pattern

    if not re.fullmatch(sample_name_pattern(), name):
        raise InputError(f"cannot make a sample name from {raw!r}", path=where or None)
    if re.search(periodic_suffix_pattern(), name):
        raise InputError(
            f"sample name {name!r} ends in a part repeated 20 or more times, which Snakemake "
            "refuses as a wildcard value (PeriodicWildcardError); rename the source",
            path=where or None,
        )
    return name


def _backend(uri: str):
    if is_s3(uri):
        from medprep.storage import s3

        return s3
    from medprep.storage import local

    return local


def source_fingerprint(uri: str, settings: dict[str, Any] | None = None) -> str:
    return _backend(uri).source_fingerprint(uri, settings or {})


def fetch(
    uri: str,
    target_dir: str | os.PathLike,
    *,
    threads: int = 1,
    settings: dict[str, Any] | None = None,
) -> list[SourceFile]:
    return _backend(uri).fetch(uri, target_dir, threads=threads, settings=settings or {})


SUPERSEDED_POLICIES = ("remove", "keep")


def publish(
    artifacts: list[dict[str, str]],
    destination: str,
    *,
    manifest: dict[str, Any],
    threads: int = 1,
    settings: dict[str, Any] | None = None,
    superseded: str = "remove",
) -> dict[str, Any]:
    """Publish ``artifacts`` into folder/prefix ``destination``; return the receipt.

    The files go into the version folder their content names (``medprep.storage.layout``);
    ``manifest`` is the content of the published ``manifest.json``, to which the version
    and the list of files (name, path, bytes, sha256) are added. It is written after
    every data file, in one write: until then the previous publication is untouched.

    ``superseded``: what becomes of the previous versions (and of files of the earlier
    layout) after the switch: ``remove`` them, or ``keep`` them for the caller to remove
    (``remove_superseded``) when nothing refers to them any more; the receipt's
    ``superseded`` lists them either way. Raises ``DestinationFull`` (one line, the bytes
    needed) when the destination has no room, having changed nothing a reader sees.
    """
    if superseded not in SUPERSEDED_POLICIES:
        raise ValueError(f"superseded must be one of {SUPERSEDED_POLICIES}, not {superseded!r}")
    return _backend(destination).publish(
        artifacts,
        destination,
        manifest=manifest,
        threads=threads,
        settings=settings or {},
        superseded=superseded,
    )


def remove_superseded(
    destination: str,
    versions: list[str],
    legacy: bool,
    settings: dict[str, Any] | None = None,
    *,
    threads: int = 1,
    sample: str | None = None,
) -> dict[str, Any]:
    """Remove ``versions`` (folders ``v-<hex>``) and, with ``legacy``, the files of the
    earlier layout from the publication at ``destination``.

    Never what its ``manifest.json`` points at: a version it names is kept, and so are
    files of the earlier layout while the manifest is of that layout. Returns
    ``{"removed": [...], "refused": [one line each, naming ``sample``]}``.
    """
    return _backend(destination).remove_superseded(
        destination, versions, legacy, settings or {}, threads=threads, sample=sample
    )


class DestinationFull(InputError):
    """No room at the destination (a full file system, a quota): one line with the
    destination and the bytes needed. Not bad input, and not retried in the same run."""

    kind = "destination"


class DestinationUnusable(RuntimeError):
    """The destination cannot be published to (``str()`` is one line, no credentials)."""


def check_destination(destination: str, settings: dict[str, Any] | None = None) -> None:
    """Make sure results can be published under ``destination`` before any work starts.

    Local: the folder is created and a probe file written and deleted in it. S3: a probe
    object is written and deleted under the prefix (one PUT and one DELETE, which also
    proves the bucket exists and the credentials work). Raises ``DestinationUnusable``.
    """
    _backend(destination).check_destination(destination, settings or {})


def probe_name() -> str:
    """A hidden, unique name for the write probe of ``check_destination``."""
    import uuid

    return f".medprep-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def discover(
    prefix: str, modality: str, settings: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """Samples under ``prefix``: dicts of ``sample``, ``modality``, ``uri``, ``fingerprint``.

    ct: one sample per sub-folder/sub-prefix; wsi: one per slide file/object directly
    under ``prefix``. Names are made safe (see ``safe_sample_name``); two sources that
    would get the same name are refused.
    """
    return _backend(prefix).discover(prefix, modality, settings or {})


def prime_listing(
    prefix: str, settings: dict[str, Any] | None = None, max_requests: int | None = None
) -> bool:
    """List S3 ``prefix`` once (paginated) so fingerprints of URIs under it need no request.

    Returns False (caching nothing) if the listing needs more than ``max_requests``
    requests. A no-op for local paths.
    """
    if not is_s3(prefix):
        return True
    from medprep.storage import s3

    return s3.prime_listing(prefix, settings or {}, max_requests)


def expect_sources(uris: list[str], settings: dict[str, Any] | None = None) -> None:
    """Announce the sample URIs fingerprints will be asked for (no I/O; cheap at parse time).

    The S3 backend then lists each parent prefix holding two or more of them once, at
    the second fingerprint asked for under it, unless that listing would take more
    requests than listing the samples one by one.
    """
    remote = [u for u in uris if is_s3(u)]
    if remote:
        from medprep.storage import s3

        s3.expect_sources(remote, settings or {})


def clear_caches() -> None:
    """Forget cached listings and clients (tests; long-lived processes)."""
    from medprep.storage import published, s3_connect, s3_listing

    s3_listing.CACHE.clear()
    s3_connect.clear_caches()
    published.clear_cache()


def join(base: str, *parts: str) -> str:
    """Join a local path or an S3 URI with relative parts."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(uri: str, levels: int = 1) -> str:
    """The folder or prefix ``levels`` above a local path or an S3 URI (``s3://`` kept)."""
    if not is_s3(uri):
        path = uri.rstrip("/") or "/"
        for _ in range(levels):
            path = os.path.dirname(path)
        return path
    bucket_and_key = uri[len(S3_SCHEME) :].strip("/").split("/")
    kept = bucket_and_key[: max(1, len(bucket_and_key) - levels)]
    return S3_SCHEME + "/".join(kept)
