"""S3 connections: URIs, clients from the standard AWS chain, retries with backoff.

Clients come from the standard configuration chain (environment, shared config and
credentials files, instance roles); ``settings`` (the config's ``storage`` section) may
name an ``endpoint_url`` (any S3-compatible store), a ``region`` and a ``profile``.
Credentials are never read from the workflow config, and whatever the chain yields is
registered with :mod:`medprep.common.redact` so it never reaches a log, manifest or message.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from medprep.common.redact import redact, register_secret

log = logging.getLogger(__name__)

T = TypeVar("T")

S3_SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # honoured by botocore itself
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_PART_SIZE_MB = 32
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part (all but the last)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 10.0

RETRYABLE_STATUS = {429, 500, 502, 503, 504}
THROTTLING_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
}
TRANSIENT_CODES = {"RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


class TransferCorrupt(Exception):
    """Received data did not match its expected size or checksum (worth retrying)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # object key or key prefix, may be empty

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def parse_uri(uri: str) -> S3Location:
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URI: {redact(uri)}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3:// URI without a bucket: {redact(uri)}")
    return S3Location(bucket, key)


def connection_key(settings: dict[str, Any]) -> tuple:
    """What identifies a connection: listings and clients are cached under it."""
    return (settings.get("endpoint_url"), settings.get("region"), settings.get("profile"))


def max_attempts(settings: dict[str, Any]) -> int:
    return max(1, int(settings.get("max_attempts") or DEFAULT_MAX_ATTEMPTS))


def part_size(settings: dict[str, Any]) -> int:
    """Bytes per ranged GET and per multipart part, and the size above which objects are
    transferred in parts (at least S3's 5 MiB minimum)."""
    size = int(float(settings.get("part_size_mb") or DEFAULT_PART_SIZE_MB) * 1024 * 1024)
    return max(MIN_PART_SIZE, size)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def client(settings: dict[str, Any], pool_size: int = 10) -> Any:
    """A thread-safe S3 client for ``settings`` with at least ``pool_size`` connections.

    Clients are cached per process: creating one costs tens of milliseconds.
    """
    pool_size = max(10, pool_size)
    key = (*connection_key(settings), pool_size, max_attempts(settings))
    with _clients_lock:
        if key not in _clients:
            _clients[key] = _new_client(settings, pool_size)
        return _clients[key]


def _new_client(settings: dict[str, Any], pool_size: int) -> Any:
    import boto3
    from botocore.config import Config

    # boto3 sessions are not thread-safe: one per client, created under the lock.
    session = boto3.session.Session(profile_name=settings.get("profile") or None)
    _register_credentials(session)
    endpoint_url = settings.get("endpoint_url") or None
    custom_endpoint = endpoint_url or any(os.environ.get(name) for name in ENDPOINT_VARIABLES)
    checksums = {
        # Newer botocore adds CRC checksums (aws-chunked bodies) that many S3-compatible
        # stores reject (boto3 #4435); medprep verifies with MD5/ETag and SHA-256 itself.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    config = Config(
        **{k: v for k, v in checksums.items() if k in Config.OPTION_DEFAULTS},  # botocore >= 1.36
        region_name=settings.get("region") or session.region_name or DEFAULT_REGION,
        # custom endpoints (MinIO, Ceph, moto, ...) rarely resolve bucket sub-domains
        s3={"addressing_style": "path"} if custom_endpoint else {},
        retries={"mode": "standard", "total_max_attempts": max_attempts(settings)},
        max_pool_connections=pool_size,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        tcp_keepalive=True,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _register_credentials(session: Any) -> None:
    credentials = session.get_credentials()
    if credentials is None:
        return
    frozen = credentials.get_frozen_credentials()
    for value in (frozen.access_key, frozen.secret_key, frozen.token):
        register_secret(value)


def clear_caches() -> None:
    with _clients_lock:
        _clients.clear()


def error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def error_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(error: BaseException) -> bool:
    """Throttling, server errors, dropped connections and corrupt transfers: worth retrying."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(error, ClientError):
        code = error_code(error)
        return error_status(error) in RETRYABLE_STATUS or code in THROTTLING_CODES | TRANSIENT_CODES
    return isinstance(
        error,
        (
            HTTPClientError,
            BotoConnectionError,
            IncompleteReadError,
            Urllib3Error,
            ConnectionError,
            TimeoutError,
            TransferCorrupt,
            RetriesExceededError,  # s3transfer gave up on a body that kept breaking off
        ),
    )


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.2, 0.4, 0.8 ... s, capped at 10 s."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def retried_by_botocore(error: BaseException) -> bool:
    """Errors of a request botocore has already retried ``max_attempts`` times itself."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
    )

    return isinstance(
        error, (ClientError, EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)
    )


def with_retries(operation: Callable[[], T], what: str, attempts: int) -> T:
    """Call ``operation`` until it succeeds, retrying transient errors with backoff.

    For the single requests outside s3transfer's transfers (listings, HEAD checks,
    deletes, the manifest PUT). botocore already retries each request (standard mode);
    this outer loop covers what it cannot: a checksum that does not match. For
    errors botocore retried itself it adds one more round only (its retry quota may have
    run out under sustained faults), so an unreachable store fails in seconds, not minutes.
    """
    budget = attempts
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as error:
            if retried_by_botocore(error):
                budget = min(budget, 2)
            if attempt >= budget or not is_transient(error):
                raise
            delay = backoff_delay(attempt)
            log.warning("%s: %s; retry %d in %.1f s", what, describe_error(error), attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_error(error: BaseException) -> str:
    return redact(f"{type(error).__name__}: {error}")
