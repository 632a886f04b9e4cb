"""Listing S3 prefixes, cached per process so fingerprints at DAG build stay cheap.

Snakemake evaluates ``source_fingerprint`` for every sample each time it builds the DAG.
One listing per sample would mean thousands of requests for thousands of samples, so:

- ``prime_listing(prefix)`` lists a common parent prefix once (paginated, 1000 keys per
  request); every sample URI under it is then answered from memory.
- ``expect_sources(uris)`` (no I/O) lets the cache prime parents by itself: when a
  second fingerprint under the same parent prefix is asked for, that parent is listed
  once, giving up (and falling back to one listing per sample) if the parent holds so
  many other objects that listing it would cost more requests than it saves. A cluster
  job asks for one sample's fingerprint and so never lists a parent.
- Without either, each sample URI costs one listing of its own prefix.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from medprep.common.redact import redact
from medprep.storage.s3_connect import S3Location, client, connection_key, parse_uri

log = logging.getLogger(__name__)

# Keys sort in UTF-8 byte order; every key under "a/b/" sorts before "a/b0" ('0' follows '/').
_AFTER_SLASH = chr(ord("/") + 1)
PAGE_SIZE = 1000  # keys per list request (S3's maximum)


@dataclass(frozen=True)
class RemoteObject:
    key: str  # full object key
    size: int
    etag: str  # without quotes
    last_modified: str  # ISO 8601, UTC


class Listing:
    """All objects under ``prefix`` in one bucket, sorted by key."""

    def __init__(self, prefix: str, objects: list[RemoteObject]):
        self.prefix = prefix
        self.objects = sorted(objects, key=lambda o: o.key)
        self.keys = [o.key for o in self.objects]

    def covers(self, key_prefix: str) -> bool:
        return key_prefix.startswith(self.prefix)

    def starting_with(self, key_prefix: str) -> list[RemoteObject]:
        start = bisect.bisect_left(self.keys, key_prefix)
        found = []
        for obj in self.objects[start:]:
            if not obj.key.startswith(key_prefix):
                break
            found.append(obj)
        return found


def _remote_object(entry: dict[str, Any]) -> RemoteObject:
    modified = entry.get("LastModified")
    return RemoteObject(
        key=entry["Key"],
        size=int(entry["Size"]),
        etag=str(entry.get("ETag", "")).strip('"'),
        last_modified=modified.isoformat()
        if modified is not None and hasattr(modified, "isoformat")
        else str(modified),
    )


def list_objects(
    settings: dict[str, Any],
    bucket: str,
    prefix: str,
    *,
    stop_at: str | None = None,
    max_requests: int | None = None,
) -> list[RemoteObject] | None:
    """Objects whose key starts with ``prefix``: one paginated listing.

    Stops early at the first key >= ``stop_at``. Returns None if the listing would need
    more than ``max_requests`` requests.
    """
    s3 = client(settings)
    objects: list[RemoteObject] = []
    token = None
    requests = 0
    while True:
        if max_requests is not None and requests >= max_requests:
            return None
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE}
        if token:
            kwargs["ContinuationToken"] = token
        page = s3.list_objects_v2(**kwargs)
        requests += 1
        for entry in page.get("Contents", []):
            if stop_at is not None and entry["Key"] >= stop_at:
                return objects
            objects.append(_remote_object(entry))
        if not page.get("IsTruncated"):
            return objects
        token = page.get("NextContinuationToken")


def select_for_key(objects: list[RemoteObject], key: str) -> list[RemoteObject]:
    """The objects a sample URI stands for: the object ``key`` itself, or all under ``key/``.

    An empty key or one ending in ``/`` is always a folder.
    """
    if key and not key.endswith("/"):
        exact = [o for o in objects if o.key == key]
        if exact:
            return exact
        key += "/"
    return [o for o in objects if o.key.startswith(key) and not o.key.endswith("/")]


def list_for_uri(settings: dict[str, Any], location: S3Location) -> list[RemoteObject]:
    """One listing for one sample URI (object or folder), without the cache."""
    key = location.key
    if key and not key.endswith("/"):
        # "ct/S1" lists "ct/S1", "ct/S1.x" and "ct/S1/..." but stops before "ct/S10..."
        objects = list_objects(settings, location.bucket, key, stop_at=key + _AFTER_SLASH)
    else:
        objects = list_objects(settings, location.bucket, key)
    return select_for_key(objects or [], key)


def parent_prefix(key: str) -> str:
    """``ct/S1/`` -> ``ct/``; ``wsi/a.svs`` -> ``wsi/``; ``a.svs`` -> ``""``."""
    stripped = key.rstrip("/")
    return stripped.rsplit("/", 1)[0] + "/" if "/" in stripped else ""


class ListingCache:
    """Per-process listings by (connection, bucket, prefix); safe to use from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listings: dict[tuple, list[Listing]] = {}
        self._expected: dict[tuple, set[str]] = {}
        self._asked: Counter = Counter()
        self._primed: set[tuple] = set()

    def clear(self) -> None:
        with self._lock:
            self._listings.clear()
            self._expected.clear()
            self._asked.clear()
            self._primed.clear()

    def store(
        self, settings: dict[str, Any], bucket: str, prefix: str, objects: list[RemoteObject]
    ) -> None:
        with self._lock:
            self._listings.setdefault((connection_key(settings), bucket), []).append(
                Listing(prefix, objects)
            )

    def lookup(self, settings: dict[str, Any], location: S3Location) -> list[RemoteObject] | None:
        """The objects of ``location`` if a cached listing covers it, else None."""
        key = location.key
        with self._lock:
            listings = self._listings.get((connection_key(settings), location.bucket), [])
            covering = [entry for entry in listings if entry.covers(key)]
        if not covering:
            return None
        listing = max(covering, key=lambda entry: len(entry.prefix))
        return select_for_key(listing.starting_with(key), key)

    def expect(self, settings: dict[str, Any], uris: list[str]) -> None:
        with self._lock:
            for uri in uris:
                location = parse_uri(uri)
                group = (connection_key(settings), location.bucket, parent_prefix(location.key))
                self._expected.setdefault(group, set()).add(uri)

    def claim_priming(
        self, settings: dict[str, Any], location: S3Location
    ) -> tuple[str, int] | None:
        """If ``location``'s parent should be primed now, (parent prefix, request budget)."""
        parent = parent_prefix(location.key)
        group = (connection_key(settings), location.bucket, parent)
        with self._lock:
            self._asked[group] += 1
            expected = len(self._expected.get(group, ()))
            if group in self._primed or expected < 2 or self._asked[group] < 2:
                return None
            self._primed.add(group)
        # A sample URI costs one request when listed alone, so listing the parent is
        # worth it only if it takes no more requests than the samples under it.
        return parent, expected


CACHE = ListingCache()


def prime_listing(settings: dict[str, Any], uri: str, max_requests: int | None = None) -> bool:
    """List ``uri`` (a prefix) once and cache it; False if ``max_requests`` ran out."""
    location = parse_uri(uri)
    prefix = location.key
    objects = list_objects(settings, location.bucket, prefix, max_requests=max_requests)
    if objects is None:
        log.info(
            "did not cache the listing of %s: more than %s requests", redact(uri), max_requests
        )
        return False
    CACHE.store(settings, location.bucket, prefix, objects)
    log.info("cached the listing of %s: %d objects", redact(uri), len(objects))
    return True


def objects_for_uri(
    settings: dict[str, Any], uri: str, *, use_cache: bool = True
) -> list[RemoteObject]:
    """The objects of a sample URI, from the listing cache where possible."""
    location = parse_uri(uri)
    if not use_cache:
        return list_for_uri(settings, location)
    cached = CACHE.lookup(settings, location)
    if cached is not None:
        return cached
    claim = CACHE.claim_priming(settings, location)
    if claim is not None:
        parent, budget = claim
        prime_listing(settings, f"s3://{location.bucket}/{parent}", max_requests=budget)
        cached = CACHE.lookup(settings, location)
        if cached is not None:
            return cached
    return list_for_uri(settings, location)
