"""Moving bytes: s3transfer's ``TransferManager`` moves them, medprep checks them.

s3transfer (boto3's transfer layer) runs the transfers: ``storage.connections`` requests in
flight, objects larger than ``storage.part_size_mb`` downloaded in parallel ranges and
uploaded in parallel multipart parts, bodies interrupted while streaming fetched again
(botocore retries each request itself: throttling, 5xx answers, dropped connections). Every
GET carries ``If-Match`` with the ETag of the listing, so an object overwritten during a
download fails it instead of mixing old and new bytes. s3transfer writes a download to a
temporary name and renames it; medprep downloads to its own hidden temporary name and
renames that into place only after the checks.

Verification on top, honestly:

- Every object medprep uploads carries its SHA-256 in user metadata (``x-amz-meta-sha256``).
  After the upload one HEAD checks what the store holds: the size, that SHA-256, and the
  ETag against the MD5 computed locally (single PUT: MD5 of the body; multipart: MD5 of the
  part MD5s, ``-N``), so a corrupted upload is caught even by stores that ignore checksums.
- A download is checked for size, then against the strongest digest available: the ETag
  when it is an MD5 (single-part uploads); for a multipart ETag one HEAD with
  ``PartNumber=1`` gives the ``sha256`` metadata if present, else the object's part size to
  recompute the multipart ETag. Objects whose ETag is neither (SSE-KMS, some S3-compatible
  stores) are checked for size only; the download manifest records which check was made.
- An object that fails its check is transferred again, up to ``VERIFY_ATTEMPTS`` times.
- S3 "additional checksums" (x-amz-checksum-*) are not used: support across
  S3-compatible stores (and moto, the test server) is partial.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprep.common.errors import InputError
from medprep.common.redact import redact
from medprep.storage.s3_connect import (
    TransferCorrupt,
    describe_error,
    error_code,
    error_status,
    is_transient,
    max_attempts,
    part_size,
    with_retries,
)
from medprep.storage.s3_listing import RemoteObject

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SHA256_METADATA = "sha256"
VERIFY_ATTEMPTS = 3  # transfers of one object whose check fails, before giving up
IO_QUEUE_CHUNKS_PER_CONNECTION = 32  # of s3transfer's 256 KB io chunks
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


class RemoteChanged(Exception):
    """The object changed on the server while it was being downloaded."""


# What S3-compatible stores answer when they have no room for an object: MinIO's full
# drives and bucket quota, Ceph RGW's quota (403 QuotaExceeded), Huawei OBS's quota
# (403 InsufficientStorageSpace), and 507 Insufficient Storage from any store. Not
# transient: trying the same request again cannot succeed until someone frees room.
NO_ROOM_CODES = {
    "XMinioStorageFull",
    "XMinioAdminBucketQuotaExceeded",
    "QuotaExceeded",
    "InsufficientStorageSpace",
}


def is_out_of_room(error: BaseException) -> bool:
    return error_code(error) in NO_ROOM_CODES or error_status(error) == 507


def out_of_room_cause(error: BaseException) -> str:
    code = error_code(error) or f"HTTP {error_status(error)}"
    return f"the store has no room for it (full or over its quota: {code})"


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives an object uploaded in these parts."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def file_part_md5s(path: str | os.PathLike, part: int) -> list[bytes]:
    digests = []
    with open(path, "rb") as f:
        while True:
            digest = hashlib.md5()
            remaining = part
            while remaining and (chunk := f.read(min(CHUNK * 8, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
            if remaining == part:
                break
            digests.append(digest.digest())
    return digests


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata(response: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}


# ---------------------------------------------------------------- the transfer manager


def transfer_config(settings: dict[str, Any], threads: int):
    """s3transfer's settings: ``threads`` requests in flight, parts of ``part_size``."""
    from s3transfer.manager import TransferConfig

    part = part_size(settings)
    return TransferConfig(
        # above one part, like describe_local: an object of exactly one part is one PUT
        multipart_threshold=part + 1,
        multipart_chunksize=part,
        max_request_concurrency=max(1, threads),
        num_download_attempts=max_attempts(settings),
        # downloaded chunks waiting for the disk: at most ~8 MB per connection, as
        # medprep.workflow's memory estimate of a transfer job assumes
        max_io_queue_size=IO_QUEUE_CHUNKS_PER_CONNECTION * max(1, threads),
    )


@contextlib.contextmanager
def transfer_manager(s3: Any, settings: dict[str, Any], threads: int) -> Iterator[Any]:
    """A ``TransferManager``; leaving the block waits for (or, on error, cancels) its transfers."""
    from s3transfer.manager import TransferManager

    with TransferManager(s3, transfer_config(settings, threads)) as manager:
        yield manager


def _failure(action: str, uri: str, error: BaseException) -> Exception:
    """One line naming the object and the cause; retryable when the cause is transient."""
    from s3transfer.exceptions import S3DownloadFailedError

    if isinstance(error, (RemoteChanged, InputError)):
        return error
    if is_out_of_room(error):
        from medprep.storage import DestinationFull

        return DestinationFull(f"{action} refused: {out_of_room_cause(error)}", path=redact(uri))
    if isinstance(error, S3DownloadFailedError) or error_code(error) in {
        "PreconditionFailed",
        "412",
    }:
        return RemoteChanged(uri.split("/", 3)[-1])
    return InputError(
        f"{action} failed: {describe_error(error)}", path=redact(uri), retryable=is_transient(error)
    )


# ---------------------------------------------------------------- download


@dataclass
class Download:
    """One object to download into ``tmp`` and then rename to ``final``."""

    bucket: str
    obj: RemoteObject
    final: Path
    tmp: Path

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.obj.key}"


def _listed(obj: RemoteObject):
    """A subscriber giving s3transfer the listed size and ETag: no HEAD before the GETs,
    and every GET carries ``If-Match`` with that ETag."""
    from s3transfer.subscribers import BaseSubscriber

    class Listed(BaseSubscriber):
        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(obj.size)
            if obj.etag:
                future.meta.provide_object_etag(f'"{obj.etag}"')

    return Listed()


def _head_part(s3: Any, item: Download) -> dict[str, Any] | None:
    try:
        return s3.head_object(Bucket=item.bucket, Key=item.obj.key, PartNumber=1)
    except Exception as error:  # noqa: BLE001 - optional check, not supported everywhere
        log.info("no part size for %s (%s): size check only", item.obj.key, type(error).__name__)
        return None


def verify_download(s3: Any, item: Download) -> str:
    """Check ``item.tmp`` against the object; return the check made, raise if it fails."""
    size = item.tmp.stat().st_size
    if size != item.obj.size:
        raise TransferCorrupt(f"{item.obj.key}: {size} bytes on disk, {item.obj.size} listed")
    etag = item.obj.etag.lower()
    if _MD5_ETAG.match(etag):
        _compare(item, "md5", file_digest(item.tmp, "md5"), etag)
        return "md5"
    match = _MULTIPART_ETAG.match(etag)
    if not match:
        return "size"
    if int(match.group(1)) == 1:
        part = item.obj.size
    else:
        head = _head_part(s3, item)
        if head is None:
            return "size"
        expected_sha = _metadata(head).get(SHA256_METADATA)
        if expected_sha:
            _compare(item, "sha256", file_digest(item.tmp, "sha256"), expected_sha.lower())
            return "sha256"
        part = int(head.get("ContentLength") or 0)
        if not part:
            return "size"
    _compare(item, "multipart md5", multipart_etag(file_part_md5s(item.tmp, part)), etag)
    return "multipart-md5"


def _compare(item: Download, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise TransferCorrupt(f"{item.obj.key}: {what} {actual} does not match {expected}")


def download(
    s3: Any,
    items: list[Download],
    settings: dict[str, Any],
    threads: int,
    done: Callable[[], None] | None = None,
) -> list[str]:
    """Download ``items`` (all in flight together), verify each and rename it into place.

    Returns the check made for each item, in order; ``done`` is called after each one.
    """
    if not items:
        return []
    checks = []
    try:
        with transfer_manager(s3, settings, threads) as manager:

            def submit(item: Download) -> Any:
                item.final.parent.mkdir(parents=True, exist_ok=True)
                return manager.download(
                    item.bucket, item.obj.key, str(item.tmp), subscribers=[_listed(item.obj)]
                )

            futures = [submit(item) for item in items]
            for item, future in zip(items, futures, strict=True):
                checks.append(_verified(s3, item, future, submit))
                os.replace(item.tmp, item.final)
                if done is not None:
                    done()
    finally:
        for item in items:
            item.tmp.unlink(missing_ok=True)
    return checks


def _verified(s3: Any, item: Download, future: Any, submit: Callable[[Download], Any]) -> str:
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        try:
            future.result()
            return verify_download(s3, item)
        except TransferCorrupt as error:
            if attempt == VERIFY_ATTEMPTS:
                raise _failure("download", item.uri, error) from None
            log.warning("%s; downloading it again", describe_error(error))
            future = submit(item)
        except Exception as error:
            raise _failure("download", item.uri, error) from None
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- upload


@dataclass
class LocalFile:
    """A file to upload and its digests (one read pass)."""

    name: str
    path: str
    size: int
    sha256: str
    part_md5s: list[bytes]  # one per part; a single entry for a single PUT

    @property
    def multipart(self) -> bool:
        return len(self.part_md5s) > 1

    @property
    def expected_etag(self) -> str:
        """The ETag of this file uploaded by medprep (with the same part size)."""
        return multipart_etag(self.part_md5s) if self.multipart else self.part_md5s[0].hex()


def describe_local(name: str, path: str, part: int) -> LocalFile:
    """Size, SHA-256 and per-part MD5s of ``path``, read once, in the parts s3transfer
    will upload (it enlarges them for files of more than 10,000 parts)."""
    from s3transfer.utils import ChunksizeAdjuster

    part = ChunksizeAdjuster().adjust_chunksize(part, os.path.getsize(path))
    sha = hashlib.sha256()
    part_md5s: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        while True:
            md5 = hashlib.md5()
            read = 0
            while read < part and (chunk := f.read(min(CHUNK * 8, part - read))):
                sha.update(chunk)
                md5.update(chunk)
                read += len(chunk)
            if read == 0 and part_md5s:
                break
            part_md5s.append(md5.digest())
            size += read
            if read < part:
                break
    return LocalFile(name, path, size, sha.hexdigest(), part_md5s)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def put_bytes(
    s3: Any, bucket: str, key: str, body: bytes, sha256: str, attempts: int, **extra: Any
) -> str:
    """One verified PUT of a small body held in memory (the published manifest); returns
    the ETag."""
    md5 = hashlib.md5(body).digest()

    def attempt() -> str:
        response = s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentMD5=_b64(md5),
            Metadata={SHA256_METADATA: sha256},
            **extra,
        )
        etag = str(response.get("ETag", "")).strip('"')
        if _MD5_ETAG.match(etag) and etag != md5.hex():
            raise TransferCorrupt(f"{key}: server stored MD5 {etag}, sent {md5.hex()}")
        return etag

    return with_retries(attempt, f"upload {key}", attempts)


def stored_etag(s3: Any, bucket: str, key: str, local: LocalFile) -> str:
    """The ETag of ``key`` if the store holds ``local`` there (size, SHA-256 metadata and
    ETag checked); TransferCorrupt otherwise."""
    head = s3.head_object(Bucket=bucket, Key=key)
    etag = str(head.get("ETag", "")).strip('"')
    if int(head.get("ContentLength", -1)) != local.size:
        raise TransferCorrupt(f"{key}: {head.get('ContentLength')} bytes stored, {local.size} sent")
    if _metadata(head).get(SHA256_METADATA) != local.sha256:
        raise TransferCorrupt(f"{key}: the stored object lacks the SHA-256 of the upload")
    if (_MD5_ETAG.match(etag) or _MULTIPART_ETAG.match(etag)) and etag != local.expected_etag:
        raise TransferCorrupt(f"{key}: ETag {etag} stored, {local.expected_etag} expected")
    return etag


def upload(
    s3: Any,
    bucket: str,
    prefix: str,
    files: list[LocalFile],
    settings: dict[str, Any],
    threads: int,
    done: Callable[[], None] | None = None,
) -> dict[str, str]:
    """Upload ``files`` under ``prefix`` (all in flight together) and check each stored
    object; returns name -> ETag. ``done`` is called after each file."""
    etags: dict[str, str] = {}
    if not files:
        return etags
    with transfer_manager(s3, settings, threads) as manager:

        def submit(local: LocalFile) -> Any:
            extra = {"Metadata": {SHA256_METADATA: local.sha256}}
            return manager.upload(local.path, bucket, prefix + local.name, extra_args=extra)

        futures = [submit(local) for local in files]
        for local, future in zip(files, futures, strict=True):
            etags[local.name] = _stored(s3, bucket, prefix + local.name, local, future, submit)
            if done is not None:
                done()
    return etags


def _stored(s3: Any, bucket: str, key: str, local: LocalFile, future: Any, submit) -> str:
    uri = f"s3://{bucket}/{key}"
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        failure = None
        try:
            future.result()
        except Exception as error:  # noqa: BLE001 - the stored object decides, below
            failure = error
        try:
            # a retried completion whose first try succeeded (the answer was lost) fails,
            # yet the object is there: what the store holds decides
            return stored_etag(s3, bucket, key, local)
        except TransferCorrupt as error:
            if failure is not None:
                raise _failure("upload", uri, failure) from None
            if attempt == VERIFY_ATTEMPTS:
                raise _failure("upload", uri, error) from None
            log.warning("%s; uploading it again", describe_error(error))
            future = submit(local)
        except Exception as error:
            raise _failure("upload", uri, failure or error) from None
    raise AssertionError("unreachable")


@dataclass
class Copy:
    """A file of the new version whose bytes an object of an earlier version holds."""

    local: LocalFile
    source: RemoteObject


def copy(
    s3: Any,
    bucket: str,
    prefix: str,
    items: list[Copy],
    settings: dict[str, Any],
    threads: int,
    done: Callable[[], None] | None = None,
) -> tuple[dict[str, str], list[LocalFile]]:
    """Copy objects within the store (no bytes through this machine) to ``prefix`` +
    each file's name, checked like uploads; in parts of the upload's size, so the ETag is
    the one an upload would get. Returns name -> ETag of the copies, and the files whose
    copy failed for another reason than a full store (the caller uploads them)."""
    etags: dict[str, str] = {}
    failed: list[LocalFile] = []
    if not items:
        return etags, failed
    with transfer_manager(s3, settings, threads) as manager:

        def submit(item: Copy) -> Any:
            extra = {
                "MetadataDirective": "REPLACE",
                "Metadata": {SHA256_METADATA: item.local.sha256},
            }
            return manager.copy(
                {"Bucket": bucket, "Key": item.source.key},
                bucket,
                prefix + item.local.name,
                extra_args=extra,
                subscribers=[_listed(item.source)],
            )

        futures = [submit(item) for item in items]
        for item, future in zip(items, futures, strict=True):
            key = prefix + item.local.name
            try:
                future.result()
                etags[item.local.name] = stored_etag(s3, bucket, key, item.local)
            except Exception as error:  # noqa: BLE001 - an upload replaces a failed copy
                if is_out_of_room(error):
                    raise _failure("copy", f"s3://{bucket}/{key}", error) from None
                log.info("copy of %s failed (%s): uploading it", key, describe_error(error))
                failed.append(item.local)
            if done is not None:
                done()
    return etags, failed


def abort_multipart(s3: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as error:  # noqa: BLE001 - best effort clean-up
        log.warning("could not abort the unfinished upload of %s: %s", key, type(error).__name__)
