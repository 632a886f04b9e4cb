"""S3 and S3-compatible object stores as sources and destinations.

A sample URI is either one object (``s3://bucket/wsi/slide.svs``) or a prefix holding
the sample's objects (``s3://bucket/ct/S1/``; ``s3://bucket/ct/S1`` also works when no
object has that exact key). Keys are relative to that prefix locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.common.parallel import thread_map
from medprep.common.progress import Progress
from medprep.common.redact import redact
from medprep.storage import (
    METAIMAGE_DATA_SUFFIXES,
    MISSING,
    PUBLISHED_MANIFEST,
    DestinationFull,
    DestinationUnusable,
    SourceFile,
    check_artifact_names,
    check_relative_key,
    fingerprint_of,
    is_hidden,
    layout,
    probe_name,
    refusal,
    safe_sample_name,
    slide_stem,
    volume_stem,
)
from medprep.storage import s3_transfer as transfer
from medprep.storage.s3_connect import (
    S3Location,
    client,
    describe_error,
    error_code,
    max_attempts,
    parse_uri,
    part_size,
    with_retries,
)
from medprep.storage.s3_listing import CACHE, RemoteObject, list_objects, objects_for_uri
from medprep.storage.s3_listing import prime_listing as _prime_listing

log = logging.getLogger(__name__)

# Written last into the download folder: what each local file was downloaded from, so
# a rerun downloads only the objects that changed.
DOWNLOAD_STATE = ".medprep-download.json"


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused the request (not a property of one sample)."""


def _folder(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def relative_entries(
    location: S3Location, objects: list[RemoteObject]
) -> list[tuple[str, RemoteObject]]:
    """(key relative to the sample URI, object): a single object keeps its base name (so do
    the data files listed after a MetaImage header, see ``_metaimage_objects``)."""
    if objects and objects[0].key == location.key:
        return [(obj.key.rsplit("/", 1)[-1], obj) for obj in objects]
    folder = _folder(location.key)
    return [(obj.key[len(folder) :], obj) for obj in objects]


def _metaimage_objects(
    settings: dict[str, Any], uri: str, *, use_cache: bool
) -> list[RemoteObject] | None:
    """A ``.mhd`` object followed by its data file (same name, ``.raw`` or ``.zraw``), as
    LUNA16 stores them side by side: one sample input."""
    header = _list_or_explain(settings, uri, use_cache=use_cache)
    if not header:
        return header
    location = parse_uri(uri)
    stem = location.key[: -len(".mhd")]
    data = []
    for suffix in METAIMAGE_DATA_SUFFIXES:
        found = _list_or_explain(
            settings, f"s3://{location.bucket}/{stem}{suffix}", use_cache=use_cache
        )
        data += [obj for obj in found or [] if obj.key == stem + suffix]
    return header + data


def _sample_objects(
    settings: dict[str, Any], uri: str, *, use_cache: bool
) -> list[RemoteObject] | None:
    if uri.lower().endswith(".mhd"):
        return _metaimage_objects(settings, uri, use_cache=use_cache)
    return _list_or_explain(settings, uri, use_cache=use_cache)


def _visible(entries: list[tuple[str, RemoteObject]]) -> list[tuple[str, RemoteObject]]:
    return [(rel, obj) for rel, obj in entries if not is_hidden(rel)]


def _fingerprint(entries: list[tuple[str, RemoteObject]]) -> str:
    if not entries:
        return MISSING
    return fingerprint_of([(rel, obj.size, obj.etag) for rel, obj in entries])


def _list_or_explain(
    settings: dict[str, Any], uri: str, *, use_cache: bool
) -> list[RemoteObject] | None:
    """Objects of ``uri``; None if its bucket does not exist; StorageUnavailable otherwise."""
    parse_uri(uri)  # a malformed URI is a ValueError, not an unavailable store
    try:
        return with_retries(
            lambda: objects_for_uri(settings, uri, use_cache=use_cache),
            f"list {redact(uri)}",
            max_attempts(settings),
        )
    except Exception as error:
        if error_code(error) == "NoSuchBucket":
            return None
        raise StorageUnavailable(f"cannot list {redact(uri)}: {describe_error(error)}") from None


# ---------------------------------------------------------------- fingerprint and priming


def source_fingerprint(uri: str, settings: dict[str, Any]) -> str:
    """Digest of the sample's keys, sizes and ETags; ``missing`` when nothing is there.

    Served from the listing cache when a primed listing covers ``uri``. An unreachable
    store raises (rather than returning a value that would rerun every sample).
    """
    objects = _sample_objects(settings, uri, use_cache=True)
    if not objects:
        return MISSING
    return _fingerprint(_visible(relative_entries(parse_uri(uri), objects)))


def source_bytes(uri: str, settings: dict[str, Any]) -> int:
    """Total size of the sample's objects (from the listing cache, like the fingerprint)."""
    objects = _list_or_explain(settings, uri, use_cache=True) or []
    return sum(obj.size for _, obj in _visible(relative_entries(parse_uri(uri), objects)))


def prime_listing(prefix: str, settings: dict[str, Any], max_requests: int | None = None) -> bool:
    return with_retries(
        lambda: _prime_listing(settings, prefix, max_requests),
        f"list {redact(prefix)}",
        max_attempts(settings),
    )


def expect_sources(uris: list[str], settings: dict[str, Any]) -> None:
    CACHE.expect(settings, uris)


# ---------------------------------------------------------------- download


def _check_keys(uri: str, entries: list[tuple[str, RemoteObject]], target: Path) -> None:
    """Refuse keys that would land outside ``target`` or clash with a folder."""
    rels = set()
    for rel, obj in entries:
        try:
            check_relative_key(rel)
        except ValueError as error:
            raise InputError(
                f"refusing object key {obj.key!r}: {error}", path=redact(uri)
            ) from None
        destination = (target / rel).resolve()
        if not destination.is_relative_to(target.resolve()):
            raise InputError(
                f"refusing object key {obj.key!r}: it leaves the download folder", path=redact(uri)
            )
        rels.add(rel)
    for rel in rels:
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in rels:
                raise InputError(
                    f"object key {rel!r} is under another object's key; cannot make both local files",
                    path=redact(uri),
                )


def _read_state(target: Path) -> dict[str, dict[str, Any]]:
    try:
        return atomic.read_json(target / DOWNLOAD_STATE).get("objects", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _still_valid(state: dict[str, Any] | None, obj: RemoteObject, path: Path) -> bool:
    """The local file was downloaded from this very object and has not been touched since."""
    if not state or state.get("etag") != obj.etag or state.get("bytes") != obj.size:
        return False
    try:
        stat = path.stat()
    except OSError:
        return False
    return stat.st_size == obj.size and stat.st_mtime_ns == state.get("mtime_ns")


def _remove_unlisted(target: Path, keep: set[Path]) -> int:
    """Delete files under ``target`` that are not ``keep`` (removed objects, temporaries)."""
    removed = 0
    for folder, dirs, files in os.walk(target, topdown=False):
        for name in files:
            path = Path(folder) / name
            if path not in keep and name != DOWNLOAD_STATE:
                path.unlink(missing_ok=True)
                removed += 1
        for name in dirs:
            with contextlib.suppress(OSError):  # not empty
                (Path(folder) / name).rmdir()
    return removed


def fetch(
    uri: str, target_dir: str | os.PathLike, *, threads: int, settings: dict[str, Any]
) -> list[SourceFile]:
    """Download the sample's objects into ``target_dir``, verified, each written then renamed.

    Objects already downloaded from the same ETag are kept; local files of objects no
    longer listed are removed.
    """
    location = parse_uri(uri)
    objects = _sample_objects(settings, uri, use_cache=False)
    if objects is None:
        raise InputError("bucket does not exist", path=redact(uri))
    target = Path(target_dir).absolute()
    entries = relative_entries(location, objects)
    _check_keys(uri, entries, target)
    entries = _visible(entries)
    if not entries:
        raise InputError("no objects at this location", path=redact(uri))
    target.mkdir(parents=True, exist_ok=True)
    state = _read_state(target)
    started = time.monotonic()
    s3 = client(settings, pool_size=threads + 4)
    keep: list[Any] = []
    todo: list[Any] = []
    for rel, obj in entries:
        final = target / rel
        (keep if _still_valid(state.get(rel), obj, final) else todo).append((rel, obj))
    checks = {rel: state[rel].get("verified", "size") for rel, _ in keep}
    checks.update(_download_all(s3, location.bucket, target, todo, threads, settings))
    _remove_unlisted(target, {target / rel for rel, _ in entries})
    files = [_source_file(target / rel, rel, obj, checks[rel]) for rel, obj in entries]
    _write_state(target, files)
    elapsed = max(time.monotonic() - started, 1e-6)
    fetched = sum(obj.size for _, obj in todo)
    log.info(
        "%s: %d objects, %d downloaded (%.1f MB in %.1f s, %.1f MB/s), %d unchanged kept; checks: %s",
        redact(uri),
        len(entries),
        len(todo),
        fetched / 1e6,
        elapsed,
        fetched / 1e6 / elapsed,
        len(keep),
        dict(Counter(checks.values())),
    )
    return files


def _download_all(
    s3: Any,
    bucket: str,
    target: Path,
    todo: list[tuple[str, RemoteObject]],
    threads: int,
    settings: dict[str, Any],
) -> dict[str, str]:
    """Every object in one transfer manager: small ones whole, large ones in ranges."""
    items = [_download_item(bucket, obj, target / rel) for rel, obj in todo]
    progress = Progress("objects", len(todo))
    try:
        checks = transfer.download(s3, items, settings, threads, progress.advance)
    except transfer.RemoteChanged as changed:
        raise InputError(
            f"object {changed} changed on the server during the download; run the workflow again",
            path=f"s3://{bucket}/{changed}",
            retryable=True,
        ) from None
    return {rel: check for (rel, _), check in zip(todo, checks, strict=True)}


def _download_item(bucket: str, obj: RemoteObject, final: Path) -> transfer.Download:
    # the naming of medprep.common.atomic: hidden, so half-written files never look like data
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    return transfer.Download(bucket=bucket, obj=obj, final=final, tmp=tmp)


def _source_file(path: Path, rel: str, obj: RemoteObject, check: str) -> SourceFile:
    return SourceFile(
        path=str(path),
        key=rel,
        bytes=obj.size,
        etag=obj.etag,
        last_modified=obj.last_modified,
        verified=check,
    )


def _write_state(target: Path, files: list[SourceFile]) -> None:
    objects = {
        f.key: {
            "etag": f.etag,
            "bytes": f.bytes,
            "mtime_ns": Path(f.path).stat().st_mtime_ns,
            "verified": f.verified,
        }
        for f in files
    }
    atomic.write_json(target / DOWNLOAD_STATE, {"objects": objects})


# ---------------------------------------------------------------- upload


def _unchanged(
    s3: Any, bucket: str, prefix: str, local: transfer.LocalFile, remote: RemoteObject | None
) -> bool:
    """The remote object already holds this content (same ETag, or same SHA-256 metadata)."""
    if remote is None or remote.size != local.size:
        return False
    if remote.etag == local.expected_etag:
        return True
    head = s3.head_object(Bucket=bucket, Key=prefix + local.name)
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    return metadata.get(transfer.SHA256_METADATA) == local.sha256


def _abort_unfinished(s3: Any, bucket: str, prefix: str) -> int:
    """Abort multipart uploads a killed run left under ``prefix``, at any depth.

    They are the S3 publisher's only temporaries (it writes no temporary keys): parts
    that cost storage and never show in a listing of objects.
    """
    aborted = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        try:
            listing = s3.list_multipart_uploads(**kwargs)
        except Exception as error:  # noqa: BLE001 - not every S3-compatible store lists them
            log.info("could not list unfinished uploads: %s", type(error).__name__)
            return aborted
        for upload in listing.get("Uploads", []):
            if upload["Key"].startswith(prefix):
                transfer.abort_multipart(s3, bucket, upload["Key"], upload["UploadId"])
                log.info("aborted an unfinished upload of %s", upload["Key"])
                aborted += 1
        if not listing.get("IsTruncated"):
            return aborted
        kwargs["KeyMarker"] = listing.get("NextKeyMarker")
        kwargs["UploadIdMarker"] = listing.get("NextUploadIdMarker")


def _upload_files(
    s3: Any,
    bucket: str,
    prefix: str,
    files: list[transfer.LocalFile],
    threads: int,
    settings: dict[str, Any],
) -> dict[str, str]:
    """Upload ``files`` (small ones with one PUT, large ones in parts) in one transfer manager."""
    progress = Progress("files", len(files))
    return transfer.upload(s3, bucket, prefix, files, settings, threads, progress.advance)


def _unchanged_names(
    s3: Any,
    bucket: str,
    prefix: str,
    files: list[transfer.LocalFile],
    remote: dict[str, RemoteObject],
    threads: int,
    attempts: int,
) -> set[str]:
    def check(local: transfer.LocalFile) -> bool:
        return with_retries(
            lambda: _unchanged(s3, bucket, prefix, local, remote.get(local.name)),
            f"check {local.name}",
            attempts,
        )

    same = thread_map(check, files, threads)
    return {local.name for local, unchanged in zip(files, same, strict=True) if unchanged}


def _delete(s3: Any, bucket: str, keys: list[str], threads: int, attempts: int) -> None:
    def delete(key: str) -> None:
        with_retries(lambda: s3.delete_object(Bucket=bucket, Key=key), f"delete {key}", attempts)

    for _ in thread_map(delete, keys, threads):
        pass


def _plain_key(key: str) -> bool:
    try:
        check_relative_key(key)
    except ValueError:
        return False
    return True


def _published_entries(
    listed: list[RemoteObject], prefix: str, sample: str | None, where: str
) -> tuple[dict[str, RemoteObject], list[str]]:
    """The objects under ``prefix`` by relative name, and refusals of hostile keys.

    A listing only holds keys under the prefix, so nothing outside it can be named; but
    a key such as ``prefix/../../x`` may be resolved elsewhere by a proxy or another
    S3 implementation that normalises paths, so such keys are neither deleted nor
    overwritten (a warning line each), like bad names in a local manifest.
    """
    remote, refused = {}, []
    for obj in listed:
        rel = obj.key[len(prefix) :]
        if rel == "" or (rel.endswith("/") and _plain_key(rel[:-1])):
            continue  # a "folder" marker another tool made: harmless, not ours
        try:
            check_relative_key(rel)
        except ValueError as error:
            refused.append(
                refusal(sample, where, f"refusing to delete object {obj.key!r}: {error}")
            )
            continue
        remote[rel] = obj
    return remote, refused


def _manifest_body(
    manifest: dict[str, Any], version: str, files: list[transfer.LocalFile]
) -> bytes:
    listed = [
        {
            "name": f.name,
            "path": layout.path_in(version, f.name),
            "bytes": f.size,
            "sha256": f.sha256,
        }
        for f in files
    ]
    published = {**manifest, "layout": layout.LAYOUT, "version": version, "files": listed}
    return (json.dumps(published, indent=2, default=str, allow_nan=False) + "\n").encode("utf-8")


def _superseded(remote: dict[str, RemoteObject], version: str) -> tuple[list[str], bool]:
    """Other version folders under the prefix, and whether files of the earlier layout are."""
    tops = {layout.top_level(rel) for rel in remote if rel != PUBLISHED_MANIFEST}
    versions = sorted(t for t in tops if layout.is_version(t) and t != version)
    legacy = any(not layout.is_version(t) for t in tops)
    return versions, legacy


def _reusable(
    remote: dict[str, RemoteObject], version: str, files: list[transfer.LocalFile]
) -> dict[str, RemoteObject]:
    """Objects of earlier versions (or of the earlier layout) holding a file's bytes, by
    the file's name: same size and the ETag this file would get (same part size)."""
    by_content = {
        (obj.size, obj.etag): obj
        for rel, obj in remote.items()
        if rel != PUBLISHED_MANIFEST and layout.top_level(rel) != version
    }
    found = {}
    for local in files:
        obj = by_content.get((local.size, local.expected_etag))
        if obj is not None:
            found[local.name] = obj
    return found


def publish(
    artifacts: list[dict[str, str]],
    destination: str,
    *,
    manifest: dict[str, Any],
    threads: int,
    settings: dict[str, Any],
    superseded: str = "remove",
) -> dict[str, Any]:
    """Publish under ``destination``/: the version folder of the files' content first,
    then ``manifest.json`` (one PUT: the switch). See ``medprep.storage.layout``.

    Objects already in that version folder with the same content are skipped (an
    interrupted publish resumes); files an earlier version holds are copied within the
    store; the others are uploaded. Nothing the previous manifest points at changes
    before the switch. Keys under the prefix that a normalising proxy could resolve
    elsewhere are never deleted (a warning line each).
    """
    location = parse_uri(destination)
    bucket, prefix = location.bucket, _folder(location.key)
    check_artifact_names(artifacts)
    attempts = max_attempts(settings)
    s3 = client(settings, pool_size=threads + 4)
    started = time.monotonic()
    part = part_size(settings)
    files = list(
        thread_map(
            lambda a: transfer.describe_local(a["name"], a["path"], part), artifacts, threads
        )
    )
    version = layout.version_of((f.name, f.sha256) for f in files)
    folder = prefix + version + "/"
    listed = (
        with_retries(lambda: list_objects(settings, bucket, prefix), "list destination", attempts)
        or []
    )
    where = redact(f"s3://{bucket}/{prefix}")
    remote, refused = _published_entries(listed, prefix, manifest.get("sample"), where)
    in_version = {
        rel[len(version) + 1 :]: obj for rel, obj in remote.items() if rel.startswith(version + "/")
    }
    unchanged = _unchanged_names(s3, bucket, folder, files, in_version, threads, attempts)
    changed = [f for f in files if f.name not in unchanged]
    reusable = _reusable(remote, version, changed)
    copies = [transfer.Copy(f, reusable[f.name]) for f in changed if f.name in reusable]
    uploads = [f for f in changed if f.name not in reusable]
    body = _manifest_body(manifest, version, files)
    sha = hashlib.sha256(body).hexdigest()
    old_manifest = remote.get(PUBLISHED_MANIFEST)
    _abort_unfinished(s3, bucket, prefix)
    try:
        etags, failed = transfer.copy(s3, bucket, folder, copies, settings, threads)
        etags.update(_upload_files(s3, bucket, folder, uploads + failed, threads, settings))
        manifest_action = "skipped"
        if old_manifest is None or old_manifest.etag != hashlib.md5(body).hexdigest():
            key = prefix + PUBLISHED_MANIFEST
            transfer.put_bytes(s3, bucket, key, body, sha, attempts, ContentType="application/json")
            manifest_action = "uploaded"
    except Exception as error:
        if not (isinstance(error, DestinationFull) or transfer.is_out_of_room(error)):
            raise
        need = sum(f.size for f in changed) + len(body)
        cause = getattr(error, "cause", None) or transfer.out_of_room_cause(error)
        _remove_written(s3, bucket, folder, set(in_version), settings, threads, attempts)
        raise DestinationFull(
            f"{cause}; publishing needs {need:,} bytes there; nothing was switched, the "
            "previous publication is kept",
            path=where,
        ) from None
    versions, legacy = _superseded(remote, version)
    removed: list[str] = []
    if superseded == "remove" and (versions or legacy):
        outcome = remove_superseded(
            destination, versions, legacy, settings, threads=threads, sample=manifest.get("sample")
        )
        removed = outcome["removed"]
        refused += [line for line in outcome["refused"] if line not in refused]
    for line in refused:
        log.warning("%s", line)
    copied = {item.local.name for item in copies} - {f.name for f in failed}
    _log_published(
        destination, version, files, changed, copied, unchanged, manifest_action, started
    )
    return {
        "destination": f"s3://{bucket}/{prefix}",
        "manifest": f"s3://{bucket}/{prefix}{PUBLISHED_MANIFEST}",
        "manifest_sha256": sha,
        "version": version,
        "files": [_receipt_entry(f, version, etags, in_version, unchanged, copied) for f in files],
        "superseded": {"versions": versions, "legacy": legacy},
        "removed": removed,
        "refused": refused,
        "manifest_action": manifest_action,
    }


def _remove_written(
    s3: Any,
    bucket: str,
    folder: str,
    there_before: set[str],
    settings: dict[str, Any],
    threads: int,
    attempts: int,
) -> None:
    """Give back the room a failed publish took: the objects it wrote in the new version."""
    try:
        listed = list_objects(settings, bucket, folder) or []
        written = [o.key for o in listed if o.key[len(folder) :] not in there_before]
        _delete(s3, bucket, written, threads, attempts)
    except Exception as error:  # noqa: BLE001 - the one line about the full store matters more
        log.warning("could not remove what the failed publish wrote: %s", describe_error(error))


def _current_version(s3: Any, bucket: str, prefix: str, attempts: int) -> str | None:
    """The version the published manifest points at (None: none, earlier layout, unreadable)."""
    from medprep.storage.read import _not_found

    def get() -> bytes:
        return s3.get_object(Bucket=bucket, Key=prefix + PUBLISHED_MANIFEST)["Body"].read()

    try:
        return layout.manifest_version(
            json.loads(with_retries(get, "read manifest.json", attempts))
        )
    except Exception as error:  # noqa: BLE001 - no manifest, or not one of ours
        if not _not_found(error) and not isinstance(error, ValueError):
            raise
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
    """Delete the objects of version folders ``versions`` and (``legacy``) those of the
    earlier layout under ``destination``/; never what its manifest points at, never a key
    a normalising proxy could resolve elsewhere (a refusal line each)."""
    location = parse_uri(destination)
    bucket, prefix = location.bucket, _folder(location.key)
    attempts = max_attempts(settings)
    s3 = client(settings, pool_size=threads + 4)
    current = _current_version(s3, bucket, prefix, attempts)
    wanted = {v for v in versions if layout.is_version(v) and v != current}
    # files of the earlier layout go only once a manifest of this layout is in place
    legacy = legacy and current is not None
    if not wanted and not legacy:
        return {"removed": [], "refused": []}
    listed = (
        with_retries(lambda: list_objects(settings, bucket, prefix), "list destination", attempts)
        or []
    )
    remote, refused = _published_entries(listed, prefix, sample, redact(f"s3://{bucket}/{prefix}"))
    doomed = []
    for rel in remote:
        top = layout.top_level(rel)
        if rel == PUBLISHED_MANIFEST or top == current:
            continue
        if top in wanted or (legacy and not layout.is_version(top)):
            doomed.append(rel)
    _delete(s3, bucket, [prefix + rel for rel in sorted(doomed)], threads, attempts)
    removed = sorted(
        {
            layout.top_level(rel) if layout.is_version(layout.top_level(rel)) else rel
            for rel in doomed
        }
    )
    if doomed:
        log.info("removed %d superseded objects under %s", len(doomed), redact(destination))
    return {"removed": removed, "refused": refused}


def published_state(
    destination: str, names: list[str], settings: dict[str, Any], *, fresh: bool, checksum: bool
) -> dict[str, dict[str, Any]]:
    """Size and ETag of each object ``name`` under ``destination`` (missing ones left out).

    One listing of the sample's prefix, served from the listing cache unless ``fresh``
    (a common parent primed by ``expect_sources`` answers many samples). The ETag is the
    store's own checksum of the content, so ``checksum`` asks for nothing more.
    """
    prefix_uri = _folder(destination)
    objects = _list_or_explain(settings, prefix_uri, use_cache=not fresh)
    if not objects:
        return {}
    folder = _folder(parse_uri(prefix_uri).key)
    wanted = set(names)
    return {
        obj.key[len(folder) :]: {"bytes": obj.size, "etag": obj.etag}
        for obj in objects
        if obj.key[len(folder) :] in wanted
    }


def check_destination(destination: str, settings: dict[str, Any]) -> None:
    """Write and delete a probe object under the destination prefix (two requests)."""
    location = parse_uri(destination)
    key = _folder(location.key) + probe_name()
    try:
        # two attempts at most: an unreachable store is reported in seconds
        s3 = client({**settings, "max_attempts": min(max_attempts(settings), 2)})
        s3.put_object(Bucket=location.bucket, Key=key, Body=b"medprep write check\n")
        s3.delete_object(Bucket=location.bucket, Key=key)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line
        raise DestinationUnusable(
            f"destination {redact(destination)}: cannot publish there: "
            + _explain_refusal(error, location.bucket, settings)
        ) from None


_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}


def _explain_refusal(error: BaseException, bucket: str, settings: dict[str, Any]) -> str:
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        ProfileNotFound,
    )

    code = error_code(error)
    if code == "NoSuchBucket":
        return f"bucket {bucket} does not exist"
    if code in _CREDENTIAL_CODES:
        return (
            f"access denied ({code}); check the credentials, storage.profile and the bucket policy"
        )
    if isinstance(error, NoCredentialsError):
        return "no credentials found (environment, shared credentials file, instance role or storage.profile)"
    if isinstance(error, ProfileNotFound):
        return f"profile {settings.get('profile')!r} not found in the AWS configuration"
    if isinstance(error, EndpointConnectionError):
        return f"cannot connect to {redact(str(settings.get('endpoint_url') or 'the S3 endpoint'))}"
    return describe_error(error)


def _receipt_entry(
    local: transfer.LocalFile,
    version: str,
    etags: dict[str, str],
    in_version: dict[str, RemoteObject],
    unchanged: set[str],
    copied: set[str],
) -> dict[str, Any]:
    etag = etags.get(local.name) or (
        in_version[local.name].etag if local.name in in_version else None
    )
    if local.name in unchanged:
        action = "skipped"
    else:
        action = "copied" if local.name in copied else "uploaded"
    return {
        "name": local.name,
        "path": layout.path_in(version, local.name),
        "bytes": local.size,
        "sha256": local.sha256,
        "etag": etag,
        "action": action,
    }


def _log_published(
    destination, version, files, changed, copied, unchanged, manifest_action, started
) -> None:
    sent = sum(f.size for f in changed if f.name not in copied)
    elapsed = max(time.monotonic() - started, 1e-6)
    log.info(
        "published %d files to %s%s: %d uploaded (%.1f MB, %.1f MB/s), %d copied within the "
        "store, %d unchanged; manifest %s",
        len(files),
        redact(_folder(destination)),
        version,
        len(changed) - len(copied),
        sent / 1e6,
        sent / 1e6 / elapsed,
        len(copied),
        len(unchanged),
        manifest_action,
    )


# ---------------------------------------------------------------- discovery


def discover(prefix: str, modality: str, settings: dict[str, Any]) -> list[dict[str, str]]:
    """Samples under ``prefix`` from one paginated listing, which is cached for fingerprints.

    ct: one sample per sub-prefix (``prefix/S1/...``); wsi: one per slide object directly
    under ``prefix``. Each result carries the sample's fingerprint too.
    """
    location = parse_uri(prefix)
    folder = _folder(location.key)
    objects = _list_or_explain(settings, f"s3://{location.bucket}/{folder}", use_cache=False)
    if objects is None:
        raise InputError("bucket does not exist", path=redact(prefix))
    CACHE.store(settings, location.bucket, folder, objects)
    by_sample: dict[str, list[RemoteObject]] = {}
    uri_of: dict[str, str] = {}
    for obj in objects:
        rel = obj.key[len(folder) :]
        if modality == "ct":
            head, slash, _ = rel.partition("/")
            if not slash and (stem := volume_stem(rel)) and not is_hidden(rel):
                # a CT volume file directly under the prefix; a .mhd brings its data file
                raw, uri = stem, f"s3://{location.bucket}/{obj.key}"
                companions = (
                    [
                        o
                        for o in objects
                        if o.key in {f"{obj.key[:-4]}{x}" for x in METAIMAGE_DATA_SUFFIXES}
                    ]
                    if rel.lower().endswith(".mhd")
                    else []
                )
                name = safe_sample_name(raw, where=redact(uri))
                if name in uri_of and uri_of[name] != uri:
                    raise InputError(
                        f"two samples would be named {name}: {redact(uri_of[name])} and {redact(uri)}",
                        path=redact(prefix),
                    )
                uri_of[name] = uri
                by_sample.setdefault(name, []).extend([obj, *companions])
                continue
            if not slash or not head or is_hidden(head):
                continue
            if head in {".", ".."}:
                log.warning(
                    "skipped object key %r: not a sub-prefix a sample can be named after", obj.key
                )
                continue
            raw, uri = head, f"s3://{location.bucket}/{folder}{head}/"
        elif modality == "wsi":
            stem = slide_stem(rel) if "/" not in rel and not is_hidden(rel) else None
            if stem is None:
                continue
            raw, uri = stem, f"s3://{location.bucket}/{obj.key}"
        else:
            raise ValueError(f"unknown modality {modality!r}")
        name = safe_sample_name(raw, where=redact(uri))
        if name in uri_of and uri_of[name] != uri:
            raise InputError(
                f"two samples would be named {name}: {redact(uri_of[name])} and {redact(uri)}",
                path=redact(prefix),
            )
        uri_of[name] = uri
        by_sample.setdefault(name, []).append(obj)
    samples = []
    for name in sorted(uri_of):
        uri = uri_of[name]
        entries = _visible(relative_entries(parse_uri(uri), by_sample[name]))
        if entries:
            samples.append(
                {
                    "sample": name,
                    "modality": modality,
                    "uri": uri,
                    "fingerprint": _fingerprint(entries),
                }
            )
    log.info(
        "discovered %d %s samples under %s (%d objects listed)",
        len(samples),
        modality,
        redact(prefix),
        len(objects),
    )
    return samples
