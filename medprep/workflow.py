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
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from medprep import atomic, errors, storage
from medprep.ct import memory as ct_memory
from medprep.runner import DEFAULT_DISK_BUDGET_ENV
from medprep.sheet import read_sample_sheet

log = logging.getLogger(__name__)

SAMPLE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
PACKAGE_DIR = Path(__file__).resolve().parent


##### samples #####


def demo_sheet_path(config: dict[str, Any]) -> str | None:
    demo_dir = config.get("demo_dir")
    return os.path.join(demo_dir, "samples.tsv") if demo_dir else None


def check_config_keys(config: dict[str, Any]) -> None:
    """Stop at parse time, one line per misspelt or unknown config key (its parent named)."""
    from medprep.schema import unknown_keys

    lines = unknown_keys(config)
    if lines:
        for line in lines:
            print(f"medprep error: config: {line}", file=sys.stderr)
        sys.exit(1)


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


##### runs: what one sample sheet owns #####


def run_name(config: dict[str, Any]) -> str:
    """The run's name: ``run_name`` if set, else the sample sheet's file stem.

    It scopes what belongs to one sheet (``results/cohort/{run}/``,
    ``results/dataset/{run}/``, ``{destination}/dataset/{run}/``, their logs), so runs of
    two sheets never overwrite each other's cohort. Stops at parse time, in one line, when
    the stem is not a safe name (letters, digits, ``.``, ``_``, ``-``).
    """
    import re

    name = config.get("run_name") or Path(str(config["samples"])).stem
    if not re.fullmatch(SAMPLE_PATTERN, name):
        print(
            f"medprep error: config: the run name {name!r} (from samples: "
            f"{config['samples']}) is not a safe name; set run_name to letters, digits, "
            "'.', '_' or '-'",
            file=sys.stderr,
        )
        sys.exit(1)
    return name


def cohort_outputs(run: str) -> dict[str, str]:
    """The cohort table, page and plot of run ``run``."""
    folder = f"results/cohort/{run}"
    return {
        "table": f"{folder}/cohort.csv",
        "html": f"{folder}/cohort.html",
        "plot": f"{folder}/cohort.png",
    }


def building_report(argv: list[str] | None = None) -> bool:
    """Whether this Snakemake process was asked for ``--report``."""
    argv = sys.argv if argv is None else argv
    return any(arg == "--report" or arg.startswith("--report=") for arg in argv)


def check_report_inputs(run: str, outputs: dict[str, str], argv: list[str] | None = None) -> None:
    """For ``snakemake --report``: stop in one line when run ``run`` has no cohort table.

    A report of a run that never ended (or of a sheet other than the run's: pass the same
    ``--config``/``--configfile``) would show no cohort, or another run's.
    """
    if not building_report(argv) or os.path.isfile(outputs["table"]):
        return
    others = sorted(p.parent.name for p in Path("results/cohort").glob("*/cohort.csv"))
    hint = f" (runs with a cohort: {', '.join(others)})" if others else ""
    print(
        f"medprep error: no cohort table for run {run!r} ({outputs['table']} is missing): "
        f"run the workflow with this sample sheet first, or pass the --config of the run "
        f"you want a report of{hint}",
        file=sys.stderr,
    )
    sys.exit(1)


DISCOVERED_CACHE = Path(".snakemake") / "medprep" / "discovered.json"


def with_discovered(
    samples: pd.DataFrame, config: dict[str, Any], *, main_process: bool
) -> pd.DataFrame:
    """The sample sheet plus the samples found under ``storage.discover`` prefixes.

    The main Snakemake process lists each prefix (one paginated listing, which also
    serves the fingerprints) and writes what it found to ``DISCOVERED_CACHE``; jobs
    (which re-parse the Snakefile, on a cluster too) read that file instead of listing.
    """
    entries = config["storage"].get("discover") or []
    if not entries:
        return samples
    if main_process:
        found = [
            s
            for entry in entries
            for s in storage.discover(entry["uri"], entry["modality"], config["storage"])
        ]
        atomic.write_json(DISCOVERED_CACHE, found)
    else:
        found = atomic.read_json(DISCOVERED_CACHE)
    clashes = sorted({s["sample"] for s in found} & set(samples.index))
    if clashes:
        raise ValueError(f"discovered samples also in the sample sheet: {clashes[:10]}")
    rows = pd.DataFrame.from_records(
        [{"sample": s["sample"], "modality": s["modality"], "uri": s["uri"]} for s in found],
        columns=["sample", "modality", "uri"],
    )
    rows["mpp"] = None
    rows["series_uid"] = None
    rows["annotations"] = None
    return pd.concat([samples, rows.set_index("sample", drop=False)])


def sample_records(samples: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Each sample's row as a plain dict (empty cells as None), by sample name.

    Input functions run once per job; a dict lookup costs microseconds where
    ``DataFrame.loc`` costs tens, which adds up over tens of thousands of jobs.
    """
    return {
        str(name): {column: optional_value(value) for column, value in row.items()}
        for name, row in zip(samples.index, samples.to_dict(orient="records"), strict=True)
    }


def optional_value(value: Any) -> Any:
    """``None`` for empty cells (NaN/None), the value otherwise, as a plain Python type."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def source_fingerprint(uri: str, storage_settings: dict[str, Any], sample: str = "") -> str:
    """The sample's input fingerprint (a parameter of its ``download`` job).

    Called by Snakemake for every sample while it builds the DAG, where an exception would
    stop the whole run. An error of the sample (a symbolic link loop in its folder, a
    hostile key, a bug) becomes a marker instead (``errors.defer``): that sample's download
    fails with the error's one line, and every other sample runs.

    An object store that cannot be reached at all still stops the run: that is no
    property of one sample, and a marker would change the fingerprint of every finished
    sample, so their downloads would rerun, fail and take their outputs with them.
    """
    try:
        return storage.source_fingerprint(uri, storage_settings)
    except Exception as error:  # noqa: BLE001 - one sample's problem, reported by its job
        if storage.is_s3(uri):
            from medprep.storage.s3 import StorageUnavailable

            if isinstance(error, StorageUnavailable):
                raise
        marker = errors.defer(error, path=uri)
        found = errors.undefer(marker, note="")
        log.warning("medprep: sample %s: %s (its download will fail)", sample, found)
        return marker


def join_uri(base: str, *parts: str) -> str:
    return storage.join(base, *parts)


def start_run() -> str:
    """A new run identity for the failure records (``medprep.runner.start_run``)."""
    from medprep import runner

    return runner.start_run()


##### publishing #####


def expect_published(samples: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    """Announce the published sample prefixes the check of ``upload`` lists (no I/O)."""
    storage.expect_sources(
        [
            join_uri(config["destination"], row["modality"], name) + "/"
            for name, row in samples.items()
        ],
        config["storage"],
    )


def published_generation(
    config: dict[str, Any], modality: str, sample: str, *, main_process: bool
) -> int:
    """The ``upload`` parameter that changes when a published file went missing or changed."""
    from medprep.storage import published

    return published.generation(
        join_uri(config["destination"], modality, sample),
        published.state_path(modality, sample),
        config["storage"],
        sample=sample,
        announce=main_process,
    )


def check_destination_or_exit(config: dict[str, Any]) -> None:
    """Stop the run, before any job, if results cannot be published (for ``onstart``)."""
    try:
        storage.check_destination(config["destination"], config["storage"])
    except storage.DestinationUnusable as error:
        print(f"medprep error: {error}", file=sys.stderr)
        sys.exit(1)


##### parameters #####


def settings_without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A copy of a config section without ``keys``, so a rule reruns only for what it uses."""
    return {k: v for k, v in settings.items() if k not in keys}


def settings_only(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: settings[k] for k in keys if k in settings}


def code_fingerprint(engine: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of the engine's source code (``medprep/<engine>/**/*.py``).

    Passed as a rule parameter so that changing the engine reruns the rules that use it,
    as Snakemake already does for changes to the rule scripts themselves.
    """
    digest = hashlib.sha256()
    for path in sorted((package_dir / engine).rglob("*.py")):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


##### memory #####

MB = 1024 * 1024

# A job on a cluster runs inside two Snakemake processes (the batch script's and the job
# step's, 180-190 MB each, measured on SLURM), and the job's memory limit counts them.
CLUSTER_JOB_OVERHEAD_MB = 400

# A transfer process: Python, medprep.storage and boto3 with an S3 client (50 MB measured).
TRANSFER_BASE_MB = 100
# Per transfer thread: downloads stream 1 MB chunks; an S3 upload holds one part
# (storage.part_size_mb, at most the object's size) plus boto3's copy of it while sending.
STREAM_BUFFER_MB = 8


def mem_mb(
    step: str, *, threads: int = 1, attempt: int = 1, on_cluster: bool = False, **inputs: Any
) -> int:
    """Memory to reserve for one job of ``step``, in MB, scaled by the retry attempt.

    The formulas live next to the code whose memory they describe; each is checked
    against the peak RSS that the benchmarks measure. ``on_cluster``: the job runs on a
    cluster (remote executor), inside Snakemake processes of its own.
    """
    try:
        estimate = _ESTIMATORS[step](threads=threads, **inputs)
    except Exception as error:  # noqa: BLE001 - Snakemake would stop every job, not this one
        # The job itself reports what is wrong with its inputs; here, an exception would
        # end the whole run. Estimate as for inputs that cannot be read.
        log.warning("%s: memory estimate failed (%s); the bound for unknown inputs", step, error)
        unknown = {k: (None if k in _MANIFEST_INPUTS else v) for k, v in inputs.items()}
        estimate = _ESTIMATORS[step](threads=threads, **unknown)
    if on_cluster:
        estimate += CLUSTER_JOB_OVERHEAD_MB
    return int(math.ceil(estimate * attempt))


def _download_mb(*, threads: int, connections: int = 1) -> float:
    # the job's own I/O pool: `connections` requests in flight, whatever its `threads`
    return TRANSFER_BASE_MB + STREAM_BUFFER_MB * max(threads, connections)


def _upload_mb(
    *, destination: str, part_size_mb: float, threads: int, connections: int = 1
) -> float:
    per_thread = 2 * part_size_mb if storage.is_s3(destination) else STREAM_BUFFER_MB
    return TRANSFER_BASE_MB + per_thread * max(threads, connections)


# inputs of the estimators that are files read when the job is scheduled
_MANIFEST_INPUTS = ("download_manifest", "preprocess_manifest")


def _read_manifest(path: str | os.PathLike | None) -> dict[str, Any]:
    """A step manifest for a memory estimate; {} (unknown) if there is none or it is unreadable."""
    if path is None:
        return {}
    try:
        manifest = atomic.read_json(path)
    except (OSError, ValueError) as error:
        log.warning("memory estimate: cannot read %s (%s); assuming unknown inputs", path, error)
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _download_bytes(download_manifest: str | os.PathLike | None) -> int:
    return int(_read_manifest(download_manifest).get("total_bytes", 0))


def _preprocess_ct_mb(*, download_manifest: str, spacing_out: list[float], threads: int) -> float:
    return ct_memory.preprocess_ct_mb(
        _download_bytes(download_manifest), threads=threads, spacing_out=spacing_out
    )


def _tile_ct_mb(*, preprocess_manifest: str, threads: int) -> float:
    return ct_memory.tile_ct_mb(_read_manifest(preprocess_manifest), threads=threads)


def _preprocess_wsi_mb(*, download_manifest: str, mask_mpp: float, threads: int) -> float:
    from medprep.wsi import memory

    dimensions, mpp = _slide_geometry(download_manifest)
    return memory.estimate_preprocess_mem_mb(dimensions, mpp, mask_mpp=mask_mpp, workers=threads)


def _slide_geometry(download_manifest: str) -> tuple[tuple[int, int] | None, float | None]:
    """Level-0 size and mpp from the slide's header; (None, None) if it cannot be read.

    An unreadable slide is reported by the job itself; for its memory the standard-slide
    bound applies.
    """
    from medprep.errors import InputError
    from medprep.wsi.slide import inspect_slide
    from medprep.wsi.steps import slide_from_download

    if download_manifest is None:
        return None, None
    try:
        info = inspect_slide(slide_from_download(download_manifest))
    except (InputError, ValueError, OSError):
        return None, None
    return info.dimensions, info.mpp_x


def _tile_wsi_mb(*, preprocess_manifest: str, tile_settings: dict[str, Any], threads: int) -> float:
    from medprep.wsi import memory

    summary = _read_manifest(preprocess_manifest).get("summary", {})
    return memory.estimate_tile_mem_mb(
        threads,
        tile_settings["size"],
        tile_settings["block_tiles"],
        image_format=None if tile_settings["container"] == "coords" else tile_settings["format"],
        tiles=_expected_tiles(summary, tile_settings),
    )


def _expected_tiles(summary: dict[str, Any], tile_settings: dict[str, Any]) -> int | None:
    """Tiles on the slide's tissue at the tile grid's step (None if not known)."""
    area_mm2, target_mpp = summary.get("tissue_area_mm2"), summary.get("target_mpp")
    if area_mm2 is None or not target_mpp:
        return None
    step_mm = (tile_settings.get("stride") or tile_settings["size"]) * target_mpp / 1000
    return math.ceil(area_mm2 / step_mm**2)


_ESTIMATORS = {
    "download": _download_mb,
    "upload": _upload_mb,
    "preprocess_ct": _preprocess_ct_mb,
    "tile_ct": _tile_ct_mb,
    "preprocess_wsi": _preprocess_wsi_mb,
    "tile_wsi": _tile_wsi_mb,
}


##### threads #####


def cpu_job_threads(most: int, *, samples: int, cores: int | None, on_cluster: bool) -> int:
    """Threads of a CPU job: ``most``, or 1 locally when there are ``cores`` samples or more.

    One sample per core keeps the cores as busy as threads would, and one-core jobs let
    the scheduler finish started samples first (rule priorities) instead of filling a
    core left free by a transfer with the next download.
    """
    if on_cluster or not cores or samples < cores:
        return most
    return 1


##### global resources #####

# Transfer jobs running at once when neither the profile nor --resources says.
DEFAULT_TRANSFERS = 2


def available_memory_mb() -> int:
    """Memory this machine has available now (MemAvailable), in MB."""
    import psutil

    return int(psutil.virtual_memory().available / MB)


def default_global_resources(workflow: Any) -> None:
    """Give a local run a memory budget and every run a transfer cap, unless already set.

    ``mem_mb``: the memory available when the run starts (``--resources mem_mb=N`` wins),
    so ``snakemake --cores 8`` never starts more jobs than memory holds. Cluster runs get
    none: there each job's memory is the node's business. ``transfers``: see
    profiles/default; a ``--resources`` on the command line replaces the profile's list,
    so the default is restored here.
    """
    if not workflow.is_main_process:
        return
    have = workflow.global_resources
    if not workflow.non_local_exec and "mem_mb" not in have:
        workflow.register_resource("mem_mb", available_memory_mb())
    if "transfers" not in have:
        workflow.register_resource("transfers", DEFAULT_TRANSFERS)


def default_disk_budget(
    workflow: Any, samples: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    """Bound a local run's disk by default when samples come from S3.

    Without a ``--resources disk_mb=N`` a one-core download fits beside any CPU job and
    would fetch ahead without limit. The default is room for ``cores + 2`` of the largest
    sample's working set (enough to keep every core busy while transfers run) and at most
    the free space where the run writes. Local inputs are read in place: no default.
    """
    if not workflow.is_main_process or workflow.non_local_exec:
        return
    if "disk_mb" in workflow.global_resources:
        return
    remote = [row for row in samples if storage.is_s3(row["uri"])]
    if not remote:
        return
    largest = max(
        disk_mb(
            "download",
            uri=row["uri"],
            modality=row["modality"],
            config=config,
        )
        for row in remote
    )
    cores = workflow.global_resources["_cores"].value or os.cpu_count() or 1
    free_mb = int(shutil.disk_usage(".").free / MB)
    budget = max(1, min(free_mb, (cores + 2) * largest))
    workflow.register_resource("disk_mb", budget)
    # local jobs inherit it: a job whose estimate exceeds this default (not a budget the
    # user chose) runs alone instead of failing (medprep.runner.check_disk_budget)
    os.environ[DEFAULT_DISK_BUDGET_ENV] = str(budget)


##### local disk #####

# metadata, summaries and QC pictures of a step, at most
SMALL_OUTPUTS_MB = 2
# patches touching the lungs, over the lungs' volume at the patch stride: two lungs each
# taken as a cube, widened by one patch on every side; bytes per voxel by
# ct.patches.materialise (none: only the table, the patches are cut from the volume)
CT_PATCH_BYTES = {"none": 0, "uint8": 1, "hu": 2, "normalised": 4}


# Before its outputs are known, a sample is reserved its raw bytes times a factor. A CT
# series' volume and mask take about 0.9 bytes per output voxel (gzip; measured 0.8-0.9:
# the cohort benchmark's 63 MB series of 0.7 x 0.7 x 2.5 mm voxels holds 31 MB at 1 mm;
# tests/test_disk_estimate.py). Its raw int16 bytes are taken to be voxels of the volume
# the memory estimates assume (medprep.ct.memory), so at 1 mm that is 0.55x the raw bytes,
# plus the patches when materialised (float32: 1.7x, 105 MB measured; int16 half and
# uint8 a quarter of that). Both scale with ct.spacing's voxel count (1 / its volume in
# mm3). A slide holds its tiles.
CT_BYTES_PER_OUTPUT_VOXEL = 0.9
CT_VOLUME_AND_MASK = CT_BYTES_PER_OUTPUT_VOXEL * ct_memory.ASSUMED_INPUT_VOXEL_MM3 / 2
CT_FLOAT32_PATCHES = 1.7
WSI_RAW_TO_WORKING_SET = 3.0
# Series of coarser voxels (thick slices) hold more than that factor says: what their
# volume and mask take depends on the body's extent, not on the raw bytes. A chest field
# (400 x 400 x 250 mm) at CT_BYTES_PER_OUTPUT_VOXEL is at least what a CT sample is
# reserved, plus 0.25 MB of QC picture, tables and manifests.
CT_SERIES_MM3 = 400 * 400 * 250
CT_SMALL_OUTPUTS = 0.25 * 1024 * 1024


def raw_to_working_set(modality: str, config: dict[str, Any]) -> float:
    """A sample's working set (raw download and artifacts) over its raw bytes, estimated
    before any step ran for series of the usual voxels (see ``least_artifact_bytes``)."""
    if modality == "ct":
        per_voxel = CT_PATCH_BYTES[config["ct"]["patches"]["materialise"]]
        voxels_per_mm3 = 1.0 / math.prod(config["ct"]["spacing"])
        return 1.0 + (CT_VOLUME_AND_MASK + CT_FLOAT32_PATCHES * per_voxel / 4) * voxels_per_mm3
    return WSI_RAW_TO_WORKING_SET


def least_artifact_bytes(modality: str, config: dict[str, Any]) -> float:
    """The artifacts a sample is reserved at least, whatever its raw size: for CT, a chest
    field's volume and mask at ``ct.spacing`` and the small outputs."""
    if modality != "ct":
        return 0.0
    voxels = CT_SERIES_MM3 / math.prod(config["ct"]["spacing"])
    return voxels * CT_BYTES_PER_OUTPUT_VOXEL + CT_SMALL_OUTPUTS


def estimated_working_set(modality: str, config: dict[str, Any], raw_bytes: float) -> float:
    """The bytes a sample of ``raw_bytes`` is reserved before its outputs are known."""
    factor = raw_to_working_set(modality, config)
    return raw_bytes + max((factor - 1.0) * raw_bytes, least_artifact_bytes(modality, config))


def disk_mb(step: str, **inputs: Any) -> int:
    """Local disk to reserve for the sample while a job of ``step`` runs, in MB.

    Snakemake holds a job's resources only while it runs, not between a sample's jobs, so
    every job reserves the sample's whole working set (raw download plus every artifact,
    as known at that step): with ``--resources disk_mb=N`` the samples in progress then
    fit in N. Inputs read in place (local paths) and remote destinations count as 0.
    """
    return max(1, int(math.ceil(_DISK[step](**inputs) / MB)))


def _raw_bytes(download_manifest: str | os.PathLike) -> int:
    """Bytes of the sample's download in results/ (0 for local inputs, read in place)."""
    found = atomic.read_json(download_manifest)
    return int(found.get("total_bytes", 0)) if storage.is_s3(found.get("source", "")) else 0


def _artifact_bytes(step_manifest: str | os.PathLike) -> int:
    total = 0
    for artifact in atomic.read_json(step_manifest).get("artifacts", []):
        try:
            total += os.stat(artifact["path"]).st_size
        except OSError:  # removed after an earlier upload: fetched again when needed
            total += int(artifact.get("bytes", 0))
    return total


def _disk_download(*, uri: str, modality: str, config: dict[str, Any]) -> float:
    if not storage.is_s3(uri):
        return 0
    from medprep.storage import s3

    return estimated_working_set(modality, config, s3.source_bytes(uri, config["storage"]))


def _disk_preprocess_ct(*, download_manifest: str, config: dict[str, Any]) -> float:
    # the download's estimate: an uncompressed bound (3 bytes per voxel) would hold a
    # downloaded sample back while others run, and samples waiting between two jobs hold
    # their disk unreserved (Snakemake reserves only for running jobs)
    total = int(atomic.read_json(download_manifest).get("total_bytes", 0))
    artifacts = estimated_working_set("ct", config, total) - total
    return _raw_bytes(download_manifest) + artifacts


def _disk_preprocess_wsi(*, download_manifest: str, config: dict[str, Any]) -> float:
    raw = _raw_bytes(download_manifest)
    return max(raw + SMALL_OUTPUTS_MB * MB, raw_to_working_set("wsi", config) * raw)


def _disk_tile_ct(
    *, download_manifest: str, preprocess_manifest: str, patch_settings: dict[str, Any]
) -> float:
    summary = atomic.read_json(preprocess_manifest).get("summary", {})
    spacing = summary.get("spacing_out") or [1.0, 1.0, 1.0]
    size_mm, stride_mm = float(patch_settings["size_mm"]), float(patch_settings["stride_mm"])
    lung_mm3 = float(summary.get("lung_volume_ml") or 0) * 1000
    per_lung_side = (lung_mm3 / 2) ** (1 / 3) if lung_mm3 else 0
    patches = 2 * math.ceil((per_lung_side + size_mm) / stride_mm) ** 3 if lung_mm3 else 0
    voxels = math.prod(math.ceil(size_mm / s) for s in spacing)
    per_value = CT_PATCH_BYTES[patch_settings.get("materialise", "none")]
    return (
        _raw_bytes(download_manifest)
        + _artifact_bytes(preprocess_manifest)
        + patches * voxels * per_value
        + SMALL_OUTPUTS_MB * MB
    )


def _disk_tile_wsi(
    *, download_manifest: str, preprocess_manifest: str, tile_settings: dict[str, Any]
) -> float:
    summary = atomic.read_json(preprocess_manifest).get("summary", {})
    tiles = _expected_tiles(summary, tile_settings) or 0
    # an encoded tile is at most its raw RGB size (coords: no pixels written)
    per_tile = 0 if tile_settings["container"] == "coords" else 3 * tile_settings["size"] ** 2
    return (
        _raw_bytes(download_manifest)
        + _artifact_bytes(preprocess_manifest)
        + tiles * per_tile
        + SMALL_OUTPUTS_MB * MB
    )


def _disk_upload(*, download_manifest: str, step_manifests: list[str], destination: str) -> float:
    artifacts = sum(_artifact_bytes(path) for path in step_manifests)
    copy = 0
    if not storage.is_s3(destination):
        # a destination on another device holds a copy (on that device: counted anyway)
        existing = Path(destination).absolute()
        while not existing.exists():
            existing = existing.parent
        if existing.stat().st_dev != os.stat(download_manifest).st_dev:
            copy = artifacts
    return _raw_bytes(download_manifest) + artifacts + copy


_DISK = {
    "download": _disk_download,
    "preprocess_ct": _disk_preprocess_ct,
    "preprocess_wsi": _disk_preprocess_wsi,
    "tile_ct": _disk_tile_ct,
    "tile_wsi": _disk_tile_wsi,
    "upload": _disk_upload,
}
