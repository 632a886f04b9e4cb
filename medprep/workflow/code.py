"""Which code a rule runs, found from the import graph of ``medprep``.

``code_fingerprint``: a digest of an engine's code, a rule parameter, so that editing that
code reruns the rules that use it (and only those). ``step_modules``: what the step
server imports before the first job of a rule script. No pandas here: the step server
imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Code that no rule of an engine runs: editing it must not rerun any sample.
NOT_ENGINE_CODE = ("demo",)


def _imported_modules(path: Path) -> frozenset[str]:
    """The ``medprep`` modules a source file imports (anywhere in it, lazily or not)."""
    stat = path.stat()
    # the engines share most of their modules: each file is parsed once while unchanged
    return _imported_modules_of(path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _imported_modules_of(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    import ast

    source = path.read_bytes()
    if b"medprep" not in source:
        return frozenset()
    found: set[str] = set()
    for node in _statements(ast.parse(source, filename=str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from medprep.x import y`: y may be a module of medprep.x or a name in it
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name == "medprep" or name.startswith("medprep."))


def _statements(body: list[Any]) -> Iterator[Any]:
    """Every statement in ``body``, nested ones included (function and class bodies,
    branches, handlers, match cases); expressions, which hold no import, are not
    walked: a fifth of the time of ``ast.walk`` at parse time."""
    import ast

    for node in body:
        yield node
        for value in vars(node).values():
            if isinstance(value, list) and value:
                if isinstance(value[0], ast.stmt):
                    yield from _statements(value)
                elif isinstance(value[0], (ast.excepthandler, ast.match_case)):
                    for part in value:
                        yield from _statements(part.body)


def _module_files(name: str, package_dir: Path) -> list[Path]:
    """The files Python runs to import module ``name``: its package ``__init__`` files
    (not medprep's own, which holds the version) and the module itself, if they exist."""
    parts = name.split(".")[1:]
    if not parts or parts[0] in NOT_ENGINE_CODE:
        return []
    files = [package_dir.joinpath(*parts[:n], "__init__.py") for n in range(1, len(parts) + 1)]
    files.append(package_dir.joinpath(*parts).with_suffix(".py"))
    return [f for f in files if f.is_file()]


def engine_modules(engine: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The source files an engine's rules run: ``medprep/<engine>/`` and every medprep
    module those import, followed through the imports (the demo data generators are not
    engine code)."""
    return imported_closure(sorted((package_dir / engine).rglob("*.py")), package_dir)


def imported_closure(files: list[Path], package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """``files`` and the medprep source files they import, followed through the imports
    (lazy ones too; the demo data generators left out)."""
    todo = list(files)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_modules(path):
            todo.extend(f for f in _module_files(name, package_dir) if f not in seen)
    return sorted(seen)


def step_modules(script: str | os.PathLike, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The names of the medprep modules a rule script may import, lazily or not: what the
    step server imports before the first job of that script."""
    names = []
    for path in imported_closure([Path(script)], package_dir):
        if package_dir not in path.parents:
            continue  # the script itself
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("medprep", *parts)))
    return names


@functools.cache
def code_fingerprint(engine: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of the code an engine's rules run (``engine_modules``).

    Passed as a rule parameter so that changing that code reruns the rules that use it:
    the engine's own package, and the shared modules it imports (manifests, tables,
    atomic writes, storage, ...). Code the engine does not import (the cohort report, the
    demo data) reruns nothing.
    """
    digest = hashlib.sha256()
    for path in engine_modules(engine, package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rule_code_fingerprint(engine: str, script: str | os.PathLike) -> str:
    """``code_fingerprint`` of the engine with the rule's own ``script``: a ``run:``
    rule's script is no input of it for Snakemake, so its changes rerun through this."""
    digest = hashlib.sha256(code_fingerprint(engine).encode())
    digest.update(b"script\0" + Path(script).read_bytes())
    return digest.hexdigest()[:16]
