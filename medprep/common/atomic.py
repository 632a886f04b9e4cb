"""Write-then-rename helpers: a reader never sees a partial file or folder under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temporary_sibling(path: Path) -> Path:
    # Keep the suffix so libraries that pick a format from the extension still work,
    # and start with a dot so globbing for finished files does not match it.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (RFC 8259): NaN and Infinity raise ValueError; write ``None`` for a
    missing value."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    write_text(path, text + "\n")


def write_png(path: str | os.PathLike, image: Any, compress_level: int = 6) -> None:
    """Write a PNG from a uint8 array (H x W, H x W x 3 or 4) or a PIL image.

    ``compress_level`` is zlib's (1 = fast, for large pictures that are not archives).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=compress_level)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths and dataclasses show up in summaries
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces folder ``path`` when the block succeeds.

    The old folder, if any, is removed only after the new one is complete, and the swap
    is two renames. On an exception the temporary folder is deleted.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# The names the writers above give their temporaries: ``.name.tmp-<pid>-<hex>[.suffix]``
# and ``.name.old-<pid>-<hex>`` (also those of medprep.storage.s3's downloads).
_TEMPORARY_NAME = re.compile(r"^\..*\.(?:tmp|old)-\d+-[0-9a-f]+")


def is_temporary_name(name: str) -> bool:
    return bool(_TEMPORARY_NAME.match(name))


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> int:
    """Delete leftovers of killed writers (``.name.tmp-*``/``.name.old-*``) in ``folder``.

    ``recursive``: in every sub-folder too (a published sample folder, where a killed copy
    leaves its temporary next to the file it was writing, at any depth). Links are
    removed as links and never followed.
    """
    count = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            if is_temporary_name(entry.name):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                count += 1
            elif recursive and entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return count
