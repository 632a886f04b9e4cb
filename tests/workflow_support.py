"""Run the workflow as a user would (a `snakemake` process) on tiny data, and read what ran."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")

# Small but real: coarse CT spacing and slide resolution keep each run to seconds.
FAST_SETTINGS: dict[str, Any] = {
    "demo_dir": None,
    "ct": {"spacing": [3.0, 3.0, 3.0], "patches": {"size_mm": 48, "stride_mm": 48}},
    "wsi": {
        "resolution": {"mpp": 2.0},
        "tissue": {"mask_mpp": 16.0},
        "tile": {"size": 128, "shard_max_tiles": 50},
    },
}

_JOB_HEADER = re.compile(r"^\s*(?:local)?rule (?P<rule>\w+):\s*$")
_WILDCARDS = re.compile(r"^\s+wildcards: (?P<wildcards>.*)$")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    jobs: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def ran(self, rule: str | None = None) -> set[tuple[str, str]]:
        """(rule, sample) of every job that ran, without the target rules."""
        return {
            (r, w.get("sample", ""))
            for r, w in self.jobs
            if r not in ("all", "cohort", "dataset") and (rule is None or r == rule)
        }

    def samples(self) -> set[str]:
        return {sample for _, sample in self.ran()}


def parse_jobs(log: str) -> list[tuple[str, dict[str, str]]]:
    """The jobs Snakemake printed (rule and wildcards), in order."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in log.splitlines():
        if header := _JOB_HEADER.match(line):
            jobs.append((header["rule"], {}))
        elif (wildcards := _WILDCARDS.match(line)) and jobs:
            jobs[-1][1].update(
                item.split("=", 1) for item in wildcards["wildcards"].split(", ") if "=" in item
            )
    return jobs


def snakemake_command(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    """The `snakemake` command line of a run of this workflow in ``workdir``."""
    return [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(cores),
        *args,
    ]


def run_snakemake(
    workdir: Path,
    *args: str,
    cores: int = 2,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> Run:
    process = subprocess.run(
        snakemake_command(workdir, *args, cores=cores),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=workdir,
    )
    jobs = parse_jobs(process.stderr) or parse_jobs(process.stdout)  # dry-runs print to stdout
    run = Run(process.returncode, process.stdout, process.stderr, jobs)
    if check and process.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({process.returncode}):\n{process.stderr[-6000:]}"
        )
    return run


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_update(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def write_config(workdir: Path, **overrides: Any) -> Path:
    config = deep_update(
        {"samples": "samples.tsv", "destination": "published", **FAST_SETTINGS}, overrides
    )
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_samples(workdir: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = workdir / "samples.tsv"
    path.write_text("sample\tmodality\turi\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_workdir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


class DiskSampler:
    """The peak of the bytes under ``folder``, sampled every ``every_s`` seconds in a
    thread while the ``with`` block runs (and once more at its end)."""

    def __init__(self, folder: Path, every_s: float = 0.5):
        self.folder, self.every_s, self.peak = folder, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            self._stop.wait(self.every_s)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.folder))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed while we walked
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def make_artifacts(folder: Path, sizes: dict[str, int], seed: int = 0) -> list[dict[str, str]]:
    """Random files of ``sizes`` (by artifact name) under ``folder``, as step artifacts."""
    rng = random.Random(seed)
    artifacts = []
    for name, size in sizes.items():
        path = folder / name.replace("/", "__")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        artifacts.append({"name": name, "path": str(path)})
    return artifacts


def published_file(folder: Path, name: str) -> Path:
    """Where the publication in ``folder`` keeps file ``name``: its version folder, as its
    manifest.json says (medprep.storage.layout)."""
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["name"] == name)
    return folder / entry.get("path", entry["name"])


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
