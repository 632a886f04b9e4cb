"""Reading published files whole or by byte range: local paths and ``s3://`` URIs.

The readers of ``medprep.data`` get a tile with one ranged read of its shard (an S3
``GET`` with a ``Range`` header), the tables and volumes with one whole read.
"""

from __future__ import annotations

import os
from typing import Any

from medprep.storage import is_s3


def read_bytes(
    uri: str,
    offset: int | None = None,
    size: int | None = None,
    settings: dict[str, Any] | None = None,
    *,
    exact: bool = True,
) -> bytes:
    """The bytes of ``uri``: all of them, or ``size`` bytes from ``offset``.

    Raises FileNotFoundError when the file or object does not exist, and (with ``exact``)
    ValueError when fewer bytes than asked for come back (a truncated file); without
    ``exact`` a range may end early at the end of the file.
    """
    if offset is not None and (offset < 0 or size is None or size < 0):
        raise ValueError("a range needs offset >= 0 and size >= 0")
    if is_s3(uri):
        data = _read_s3(uri, offset, size, settings or {})
    else:
        data = _read_local(uri, offset, size)
    if exact and size is not None and len(data) != size:
        raise ValueError(f"{uri}: asked for {size} bytes at {offset}, got {len(data)}")
    return data


def exists(uri: str, settings: dict[str, Any] | None = None) -> bool:
    if not is_s3(uri):
        return os.path.isfile(uri)
    try:
        _head(uri, settings or {})
    except FileNotFoundError:
        return False
    return True


def _read_local(path: str, offset: int | None, size: int | None) -> bytes:
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        return f.read(size)


def _not_found(error: BaseException) -> bool:
    from medprep.storage.s3_connect import error_code, error_status

    return error_status(error) == 404 or error_code(error) in ("NoSuchKey", "404", "NotFound")


def _read_s3(uri: str, offset: int | None, size: int | None, settings: dict[str, Any]) -> bytes:
    from medprep.storage.s3_connect import client, max_attempts, parse_uri, with_retries

    if size == 0:
        return b""
    location = parse_uri(uri)
    s3 = client(settings)
    extra = (
        {} if offset is None or size is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
    )

    def get() -> bytes:
        response = s3.get_object(Bucket=location.bucket, Key=location.key, **extra)
        return response["Body"].read()

    try:
        return with_retries(get, f"read {uri}", max_attempts(settings))
    except Exception as error:
        if _not_found(error):
            raise FileNotFoundError(uri) from None
        raise


def _head(uri: str, settings: dict[str, Any]) -> None:
    from medprep.storage.s3_connect import client, parse_uri

    location = parse_uri(uri)
    try:
        client(settings).head_object(Bucket=location.bucket, Key=location.key)
    except Exception as error:
        if _not_found(error):
            raise FileNotFoundError(uri) from None
        raise
