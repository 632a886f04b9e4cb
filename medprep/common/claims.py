"""What a file claims, checked before a buffer is allocated for it.

A header can claim any size for almost no bytes: two 2 KB RLE slices claiming 65535 x
65535 pixels, or a MetaImage claiming 65535 x 65535 x 500 voxels. Decoding such a claim
allocates what it says and ends in a killed job or a ``MemoryError``. Two bounds hold
whatever the format:

- the stored bytes must be able to back the decoded bytes: at most ``max_ratio`` decoded
  bytes per stored byte (a codec's physical limit, or a generous bound for codecs
  without one), and an uncompressed claim needs its bytes in full;
- the decoded bytes must fit in the memory this process can ever have: the machine's
  memory or the cgroup limit it runs under (a SLURM job's ``--mem``), whichever is less.

The slide check in ``medprep.wsi.guard`` applies the same idea to TIFF directories.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from medprep.common.errors import InputError

# deflate (zlib, gzip) cannot expand one stored byte into more than 1032 decoded bytes
DEFLATE_MAX_RATIO = 1032
# DICOM RLE (PackBits): two bytes encode at most 128 equal bytes, plus a 64-byte header
RLE_MAX_RATIO = 64
# codecs with no small physical limit (JPEG family, JPEG-LS runs, JPEG 2000): real CT
# and slide data measure 2-20:1; claims of bombs are 1e4-1e7:1
GENERAL_MAX_RATIO = 5000

# Largest coordinate an annotation may hold, in mm (a scan) or level-0 pixels (a slide):
# a body is about 2e3 mm across and a 75 mm slide at 0.12 um/px 6.3e5 pixels, so a value
# beyond 1e7 is damage, and squaring it (areas, distances) stays far from overflow.
MAX_COORDINATE = 1e7

CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def coordinate_problem(value: float, unit: str) -> str | None:
    """Why ``value`` cannot be a coordinate in ``unit`` ("mm", "pixels"), or None."""
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if abs(value) > MAX_COORDINATE:
        return f"{value:g} is beyond +-{MAX_COORDINATE:g} {unit}, outside any slide or scan"
    return None


def memory_limit_bytes() -> int:
    """The memory this process can ever have: physical memory, or a lower cgroup limit."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def check_claim(
    claimed_bytes: int,
    *,
    what: str,
    path: str,
    stored_bytes: int | None = None,
    max_ratio: float | None = None,
    memory_bytes: int | None = None,
) -> None:
    """Refuse ``claimed_bytes`` of decoded data before anything is allocated for them.

    ``what``: the claim in the file's own terms, e.g. ``"65535 x 65535 pixels x 2 bytes"``.
    ``stored_bytes``: the bytes that back the claim. ``max_ratio``: decoded bytes per
    stored byte at most (None: uncompressed, the stored bytes must hold the claim whole).
    ``memory_bytes``: the bound (default ``memory_limit_bytes()``).
    Raises ``InputError`` naming ``path``, the claim and the bound it breaks.
    """
    claim = f"claims {what} ({human_bytes(claimed_bytes)} decoded)"
    if stored_bytes is not None:
        if max_ratio is None and claimed_bytes > stored_bytes:
            raise InputError(
                f"{claim} but stores only {human_bytes(stored_bytes)} (truncated or damaged)",
                path=path,
            )
        if max_ratio is not None and claimed_bytes > max_ratio * max(stored_bytes, 1):
            raise InputError(
                f"{claim} from {human_bytes(stored_bytes)} of compressed data, more than "
                f"{max_ratio:g}:1 (a damaged header or a decompression bomb); refused unread",
                path=path,
            )
    limit = memory_limit_bytes() if memory_bytes is None else memory_bytes
    if claimed_bytes > limit:
        raise InputError(
            f"{claim}, more than the {human_bytes(limit)} of memory this job can have; "
            "refused unread",
            path=path,
        )


# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC) and JPEG-LS's SOF55
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def codestream_claim(data: bytes) -> tuple[int, int, int] | None:
    """The (width, height, components) a JPEG, JPEG-LS or JPEG 2000 codestream claims in
    its own header (SOF or SIZ), read without decoding; ``None`` if none is found.

    A decoder allocates what this header says, whatever the container (a DICOM file's
    Rows and Columns, a TIFF tile's size) claims, so the two are compared first.
    """
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 42:  # J2K: SOC, SIZ
        xsiz, ysiz, xosiz, yosiz = (int.from_bytes(data[i : i + 4], "big") for i in (8, 12, 16, 20))
        return xsiz - xosiz, ysiz - yosiz, int.from_bytes(data[40:42], "big")
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF and pos + 10 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height, data[pos + 9]
        if length < 2:
            return None
        pos += 2 + length
    return None
