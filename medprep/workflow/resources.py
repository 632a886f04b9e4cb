"""Resources of the workflow's jobs: memory (``mem_mb``), threads, global resources and
local disk (``disk_mb``), estimated from what is known when a job is scheduled.

The formulas live next to the code whose cost they describe (``medprep.ct.memory``,
``medprep.wsi.memory``); each is checked against what the benchmarks measure. Nothing
here raises for one sample: an estimate that cannot be made falls back to the bound for
unknown inputs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medprep import storage
from medprep.common import atomic
from medprep.ct import memory as ct_memory
from medprep.ct.patches import bytes_per_patch_voxel, patch_voxels
from medprep.workflow.runner import DEFAULT_DISK_BUDGET_ENV

log = logging.getLogger(__name__)


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
    from medprep.common.errors import InputError
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
    from medprep.wsi.settings import TileSettings

    settings = TileSettings.from_config(tile_settings)
    summary = _read_manifest(preprocess_manifest).get("summary", {})
    return memory.estimate_tile_mem_mb(
        threads,
        settings.size,
        settings.block_tiles,
        image_format=settings.image_format,
        tiles=_expected_tiles(summary, settings),
    )


def _expected_tiles(summary: dict[str, Any], settings: Any) -> int | None:
    """Tiles on the slide's tissue at the tile grid's step (None if not known);
    ``settings``: the ``wsi.tile`` settings (``TileSettings``)."""
    area_mm2, target_mpp = summary.get("tissue_area_mm2"), summary.get("target_mpp")
    if area_mm2 is None or not target_mpp:
        return None
    step_mm = settings.step * target_mpp / 1000
    return math.ceil(area_mm2 / step_mm**2)


_ESTIMATORS: dict[str, Callable[..., float]] = {
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

    One sample per core keeps the cores as busy as threads would, and a one-core job
    starts on any core that frees (a multi-thread job would wait for several at once).
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

    Downloads (which hold no core) wait until the working sets of the samples fetched but
    not yet published fit in it (``medprep.workflow.transfers.RunAhead``), and every job
    reserves its sample's working set from it. The default is room for ``cores + 2`` of
    the largest sample's working set (enough to keep every core busy while transfers run)
    and at most the free space where the run writes. Local inputs are read in place: no
    default.
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
    # user chose) runs alone instead of failing (medprep.workflow.runner.check_disk_budget)
    os.environ[DEFAULT_DISK_BUDGET_ENV] = str(budget)


##### local disk #####

# metadata, summaries and QC pictures of a step, at most
SMALL_OUTPUTS_MB = 2
# a job that only writes a small record (rule `rebuild`): Python and medprep's imports
SMALL_JOB_MB = 200


# Before its outputs are known, a sample is reserved its raw bytes times a factor. A CT
# series' volume and mask take about 0.9 bytes per output voxel (gzip; measured 0.8-0.9:
# the cohort benchmark's 63 MB series of 0.7 x 0.7 x 2.5 mm voxels holds 31 MB at 1 mm;
# tests/workflow/test_resources_disk_estimate.py). Its raw int16 bytes are taken to be voxels of the volume
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
        per_voxel = bytes_per_patch_voxel(config["ct"]["patches"]["materialise"])
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
    as known at that step). The download's estimate is held from the download until the
    upload, by the run-ahead bound (``medprep.workflow.transfers``, rule resource
    ``disk_need_mb``): with ``--resources disk_mb=N`` the samples in progress then fit in
    N. Inputs read in place (local paths) and remote destinations count as 0.
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
    from medprep.ct.settings import PatchesSettings

    settings = PatchesSettings.from_config(patch_settings)
    summary = atomic.read_json(preprocess_manifest).get("summary", {})
    spacing = summary.get("spacing_out") or [1.0, 1.0, 1.0]
    size_mm, stride_mm = float(settings.size_mm), float(settings.stride_mm)
    lung_mm3 = float(summary.get("lung_volume_ml") or 0) * 1000
    per_lung_side = (lung_mm3 / 2) ** (1 / 3) if lung_mm3 else 0
    # patches touching the lungs, over the lungs' volume at the patch stride: two lungs
    # each taken as a cube, widened by one patch on every side
    patches = 2 * math.ceil((per_lung_side + size_mm) / stride_mm) ** 3 if lung_mm3 else 0
    voxels = math.prod(patch_voxels(size_mm, stride_mm, spacing)[0])
    per_value = bytes_per_patch_voxel(settings.materialise)
    return (
        _raw_bytes(download_manifest)
        + _artifact_bytes(preprocess_manifest)
        + patches * voxels * per_value
        + SMALL_OUTPUTS_MB * MB
    )


def _disk_tile_wsi(
    *, download_manifest: str, preprocess_manifest: str, tile_settings: dict[str, Any]
) -> float:
    from medprep.wsi.settings import TileSettings

    settings = TileSettings.from_config(tile_settings)
    summary = atomic.read_json(preprocess_manifest).get("summary", {})
    tiles = _expected_tiles(summary, settings) or 0
    # an encoded tile is at most its raw RGB size (coords: no pixels written)
    per_tile = 0 if settings.image_format is None else 3 * settings.size**2
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


_DISK: dict[str, Callable[..., float]] = {
    "download": _disk_download,
    "preprocess_ct": _disk_preprocess_ct,
    "preprocess_wsi": _disk_preprocess_wsi,
    "tile_ct": _disk_tile_ct,
    "tile_wsi": _disk_tile_wsi,
    "upload": _disk_upload,
}
