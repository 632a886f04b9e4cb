"""Moving bytes: verified (ranged) downloads and verified (multipart) uploads.

Verification, honestly:

- Every object medprep uploads carries its SHA-256 in user metadata (``x-amz-meta-sha256``)
  and is sent with Content-MD5 per request; the ETag S3 returns is checked against the
  MD5 computed locally (single PUT: MD5 of the body; multipart: MD5 of the part MD5s,
  ``-N``), so a corrupted upload is caught even by stores that ignore Content-MD5.
- A download is checked for size, then against the strongest digest available: the
  ``sha256`` metadata if present, else the ETag when it is an MD5 (single-part uploads),
  else the multipart ETag recomputed with the object's part size (one HEAD with
  ``PartNumber=1``). Objects whose ETag is neither (SSE-KMS, some S3-compatible stores)
  are checked for size only; the download manifest records which check was made.
- S3 "additional checksums" (x-amz-checksum-*) are not used: support across
  S3-compatible stores (and moto, the test server) is partial.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprep.parallel import thread_map
from medprep.storage.s3_connect import TransferCorrupt, error_code, with_retries
from medprep.storage.s3_listing import RemoteObject

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SHA256_METADATA = "sha256"
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


class RemoteChanged(Exception):
    """The object changed on the server while it was being downloaded."""


def byte_ranges(size: int, part: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of at most ``part`` bytes covering ``size`` bytes."""
    return [(start, min(start + part, size) - 1) for start in range(0, size, part)]


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


# ---------------------------------------------------------------- download


@dataclass
class Download:
    """One object to download into ``tmp`` and then rename to ``final``."""

    bucket: str
    obj: RemoteObject
    final: Path
    tmp: Path
    whole_md5: str | None = None  # MD5 computed while streaming a whole-object GET
    whole_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _stream_to_file(body: Any, tmp: Path, offset: int, expected: int, digests: list) -> None:
    received = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(tmp, "r+b") as f:
        f.seek(offset)
        while True:
            count = body.readinto(buffer)
            if not count:
                break
            f.write(view[:count])
            for digest in digests:
                digest.update(view[:count])
            received += count
    if received != expected:
        raise TransferCorrupt(f"received {received} of {expected} bytes")


def _get(s3: Any, item: Download, byte_range: tuple[int, int] | None) -> None:
    """One GET (whole object or one range) written at its offset in ``item.tmp``."""
    kwargs = {"Bucket": item.bucket, "Key": item.obj.key}
    if item.obj.etag:
        # a concurrent overwrite must fail the download, not mix old and new bytes
        kwargs["IfMatch"] = f'"{item.obj.etag}"'
    if byte_range is not None:
        kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    try:
        response = s3.get_object(**kwargs)
    except Exception as error:
        if error_code(error) in {"PreconditionFailed", "412"}:
            raise RemoteChanged(item.obj.key) from None
        raise
    item.metadata = {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}
    if byte_range is None:
        # hash while streaming, only with the digest verify_download will compare
        if item.metadata.get(SHA256_METADATA):
            digest = hashlib.sha256()
            _stream_to_file(response["Body"], item.tmp, 0, item.obj.size, [digest])
            item.whole_sha256 = digest.hexdigest()
        elif _MD5_ETAG.match(item.obj.etag.lower()):
            digest = hashlib.md5()
            _stream_to_file(response["Body"], item.tmp, 0, item.obj.size, [digest])
            item.whole_md5 = digest.hexdigest()
        else:
            _stream_to_file(response["Body"], item.tmp, 0, item.obj.size, [])
    else:
        offset, last = byte_range
        _stream_to_file(response["Body"], item.tmp, offset, last - offset + 1, [])


def _remote_part_size(s3: Any, item: Download) -> int | None:
    try:
        head = s3.head_object(Bucket=item.bucket, Key=item.obj.key, PartNumber=1)
    except Exception as error:  # noqa: BLE001 - optional check, not supported everywhere
        log.info("no part size for %s (%s): size check only", item.obj.key, type(error).__name__)
        return None
    return int(head.get("ContentLength") or 0) or None


def verify_download(s3: Any, item: Download) -> str:
    """Check ``item.tmp`` against the object; return the check made, raise if it fails."""
    size = item.tmp.stat().st_size
    if size != item.obj.size:
        raise TransferCorrupt(f"{item.obj.key}: {size} bytes on disk, {item.obj.size} listed")
    expected_sha = item.metadata.get(SHA256_METADATA)
    if expected_sha:
        actual = item.whole_sha256 or file_digest(item.tmp, "sha256")
        _compare(item, "sha256", actual, expected_sha.lower())
        return "sha256"
    etag = item.obj.etag.lower()
    if _MD5_ETAG.match(etag):
        _compare(item, "md5", item.whole_md5 or file_digest(item.tmp, "md5"), etag)
        return "md5"
    match = _MULTIPART_ETAG.match(etag)
    if match:
        parts = int(match.group(1))
        part = item.obj.size if parts == 1 else _remote_part_size(s3, item)
        if part:
            _compare(item, "multipart md5", multipart_etag(file_part_md5s(item.tmp, part)), etag)
            return "multipart-md5"
    return "size"


def _compare(item: Download, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise TransferCorrupt(f"{item.obj.key}: {what} {actual} does not match {expected}")


def _prepare(item: Download) -> None:
    item.final.parent.mkdir(parents=True, exist_ok=True)
    with open(item.tmp, "wb") as f:
        f.truncate(item.obj.size)
    item.whole_md5 = item.whole_sha256 = None


def download_small(s3: Any, item: Download, attempts: int) -> str:
    """Download one object with one GET, verify it and rename it into place."""

    def attempt() -> str:
        _prepare(item)
        _get(s3, item, None)
        return verify_download(s3, item)

    try:
        check = with_retries(attempt, f"download {item.obj.key}", attempts)
        os.replace(item.tmp, item.final)
        return check
    finally:
        item.tmp.unlink(missing_ok=True)


def download_large(s3: Any, item: Download, part: int, threads: int, attempts: int) -> str:
    """Download one object in parallel ranges, verify it and rename it into place."""

    def get_range(byte_range: tuple[int, int]) -> None:
        with_retries(
            lambda: _get(s3, item, byte_range), f"download {item.obj.key} {byte_range}", attempts
        )

    def attempt() -> str:
        _prepare(item)
        for _ in thread_map(get_range, byte_ranges(item.obj.size, part), threads):
            pass
        return verify_download(s3, item)

    try:
        # ranges retry themselves; a checksum mismatch of the whole starts it over
        check = with_retries(attempt, f"verify {item.obj.key}", min(attempts, 3))
        os.replace(item.tmp, item.final)
        return check
    finally:
        item.tmp.unlink(missing_ok=True)


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
    """Size, SHA-256 and per-part MD5s of ``path``, read once."""
    sha = hashlib.sha256()
    part_md5s = []
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


def _read_part(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def put_small(s3: Any, bucket: str, key: str, local: LocalFile, attempts: int, **extra: Any) -> str:
    """One verified PUT; returns the ETag."""
    body = _read_part(local.path, 0, local.size)
    return put_bytes(s3, bucket, key, body, local.sha256, attempts, **extra)


def put_bytes(
    s3: Any, bucket: str, key: str, body: bytes, sha256: str, attempts: int, **extra: Any
) -> str:
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


@dataclass
class MultipartUpload:
    bucket: str
    key: str
    local: LocalFile
    upload_id: str
    part: int
    etags: dict[int, str] = field(default_factory=dict)


def start_multipart(
    s3: Any, bucket: str, key: str, local: LocalFile, part: int, attempts: int
) -> MultipartUpload:
    response = with_retries(
        lambda: s3.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata={SHA256_METADATA: local.sha256}
        ),
        f"start upload {key}",
        attempts,
    )
    return MultipartUpload(bucket, key, local, response["UploadId"], part)


def upload_part(s3: Any, upload: MultipartUpload, number: int, attempts: int) -> None:
    """Upload part ``number`` (1-based) and check the ETag against its MD5."""
    offset = (number - 1) * upload.part
    expected = upload.local.part_md5s[number - 1]

    def attempt() -> str:
        body = _read_part(upload.local.path, offset, upload.part)
        response = s3.upload_part(
            Bucket=upload.bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            PartNumber=number,
            Body=body,
            ContentMD5=_b64(expected),
        )
        etag = str(response.get("ETag", "")).strip('"')
        if _MD5_ETAG.match(etag) and etag != expected.hex():
            raise TransferCorrupt(f"{upload.key} part {number}: server stored MD5 {etag}")
        return etag

    upload.etags[number] = with_retries(attempt, f"upload {upload.key} part {number}", attempts)


def complete_multipart(s3: Any, upload: MultipartUpload, attempts: int) -> str:
    parts = [{"PartNumber": n, "ETag": f'"{upload.etags[n]}"'} for n in sorted(upload.etags)]
    expected = upload.local.expected_etag

    def attempt() -> str:
        try:
            response = s3.complete_multipart_upload(
                Bucket=upload.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
            )
            etag = str(response.get("ETag", "")).strip('"')
        except Exception as error:
            # A retried completion whose first try succeeded (the answer was lost) finds
            # no upload any more: the object itself says whether it is ours.
            if error_code(error) != "NoSuchUpload":
                raise
            etag = _etag_if_ours(s3, upload)
        if _MULTIPART_ETAG.match(etag) and etag != expected:
            raise TransferCorrupt(f"{upload.key}: multipart ETag {etag}, expected {expected}")
        return etag

    return with_retries(attempt, f"complete upload {upload.key}", attempts)


def _etag_if_ours(s3: Any, upload: MultipartUpload) -> str:
    head = s3.head_object(Bucket=upload.bucket, Key=upload.key)
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if (
        metadata.get(SHA256_METADATA) != upload.local.sha256
        or int(head["ContentLength"]) != upload.local.size
    ):
        raise TransferCorrupt(f"{upload.key}: multipart upload vanished before completion")
    return str(head.get("ETag", "")).strip('"')


def abort_multipart(s3: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as error:  # noqa: BLE001 - best effort clean-up
        log.warning("could not abort the unfinished upload of %s: %s", key, type(error).__name__)
