"""Helpers for ``rules/common.smk``: sample table, fingerprints, settings and memory formulas.

Kept in the package (not in the .smk files) so that they are unit-tested and cheap to call
at parse time: nothing here does per-sample I/O except ``source_fingerprint``, which
Snakemake calls once per download job while building the DAG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medprep import atomic, storage
from medprep.sheet import read_sample_sheet

log = logging.getLogger(__name__)

SAMPLE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
PACKAGE_DIR = Path(__file__).resolve().parent


##### samples #####


def demo_sheet_path(config: dict[str, Any]) -> str | None:
    demo_dir = config.get("demo_dir")
    return os.path.join(demo_dir, "samples.tsv") if demo_dir else None


def build_demo_if_requested(config: dict[str, Any]) -> None:
    """Build the demo dataset when ``samples`` is the demo sheet and it is missing."""
    sheet = demo_sheet_path(config)
    if sheet is None or os.path.normpath(config["samples"]) != os.path.normpath(sheet):
        return
    if os.path.exists(sheet):
        return
    from medprep import demo

    print(f"medprep: building the demo dataset in {config['demo_dir']}/ (first run only)")
    demo.build(config["demo_dir"])


def load_samples(config: dict[str, Any], schema: str | os.PathLike) -> pd.DataFrame:
    """The sample table: the sample sheet, validated, indexed by sample name."""
    return read_sample_sheet(config["samples"], schema)


def optional_value(value: Any) -> Any:
    """``None`` for empty cells (NaN/None), the value otherwise, as a plain Python type."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def source_fingerprint(uri: str, storage_settings: dict[str, Any]) -> str:
    return storage.source_fingerprint(uri, storage_settings)


def join_uri(base: str, *parts: str) -> str:
    return storage.join(base, *parts)


##### parameters #####


def settings_without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A copy of a config section without ``keys``, so a rule reruns only for what it uses."""
    return {k: v for k, v in settings.items() if k not in keys}


def settings_only(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: settings[k] for k in keys if k in settings}


def code_fingerprint(engine: str) -> str:
    """A digest of the engine's source code (``medprep/<engine>/**/*.py``).

    Passed as a rule parameter so that changing the engine reruns the rules that use it,
    as Snakemake already does for changes to the rule scripts themselves.
    """
    digest = hashlib.sha256()
    for path in sorted((PACKAGE_DIR / engine).rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


##### memory #####

MB = 1024 * 1024


def mem_mb(step: str, *, threads: int = 1, attempt: int = 1, **inputs: Any) -> int:
    """Memory to reserve for one job of ``step``, in MB, scaled by the retry attempt.

    The formulas live next to the code whose memory they describe; each is checked
    against the peak RSS that the benchmarks measure.
    """
    estimate = _ESTIMATORS[step](threads=threads, **inputs)
    return int(math.ceil(estimate * attempt))


def _transfer_mb(threads: int) -> float:
    # Interpreter and boto3 (~150 MB), plus one buffered part (8 MB) per transfer thread.
    return 200 + 16 * threads


def _download_bytes(download_manifest: str | os.PathLike) -> int:
    return int(atomic.read_json(download_manifest).get("total_bytes", 0))


def _preprocess_ct_mb(*, download_manifest: str, threads: int) -> float:
    from medprep.ct import memory

    return memory.preprocess_ct_mb(_download_bytes(download_manifest), threads=threads)


def _tile_ct_mb(*, preprocess_manifest: str, threads: int) -> float:
    from medprep.ct import memory

    return memory.tile_ct_mb(atomic.read_json(preprocess_manifest), threads=threads)


def _preprocess_wsi_mb(*, download_manifest: str, threads: int) -> float:
    from medprep.wsi import memory

    return memory.preprocess_wsi_mb(_download_bytes(download_manifest))


def _tile_wsi_mb(*, tile_settings: dict[str, Any], threads: int) -> float:
    from medprep.wsi import memory

    return memory.tile_wsi_mb(
        workers=threads,
        tile_size=tile_settings["size"],
        block_tiles=tile_settings["block_tiles"],
    )


_ESTIMATORS = {
    "download": lambda threads: _transfer_mb(threads),
    "upload": lambda threads: _transfer_mb(threads),
    "preprocess_ct": _preprocess_ct_mb,
    "tile_ct": _tile_ct_mb,
    "preprocess_wsi": _preprocess_wsi_mb,
    "tile_wsi": _tile_wsi_mb,
}
