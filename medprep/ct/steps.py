"""The two CT steps as the rule scripts run them: inputs in, outputs and step manifest out.

``scripts/preprocess_ct.py`` and ``scripts/tile_ct.py`` only unpack the ``snakemake``
object and call these; the tests and ``benchmarks/bench_ct.py`` call the same functions,
so the sequence "compute, write the outputs, write the step manifest last" exists once.
Every file is written under a temporary name and renamed when complete.

The engines (pydicom, scipy, nibabel, pandas) are imported inside the steps, so that a
rule script pays only for what its own step uses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medprep.common.errors import InputError
from medprep.workflow import manifest


def fixed_mmap_threshold(limit_bytes: int = 1 << 20, trim_bytes: int = 4 << 20) -> bool:
    """Let glibc serve every allocation above ``limit_bytes`` by its own mapping, returned
    to the system when freed. Its default threshold grows after each large free (up to
    32 MB), after which freed slice-sized buffers stay in the heap and add to the step's
    peak memory (measured: 295 against 262 MB on LIDC-IDRI-0001). Setting it also fixes
    the heap's trim threshold at 128 kB, so every freed plane-sized buffer (0.5-1 MB) at
    the top of the heap went back to the system and the next one faulted its pages in
    again (in-plane resampling took 3x as long); the heap keeps up to ``trim_bytes`` free
    instead (+2 MB peak on LIDC-IDRI-0001). No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        done = bool(libc.mallopt(-3, limit_bytes))  # M_MMAP_THRESHOLD
        return bool(libc.mallopt(-1, trim_bytes)) and done  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The sample's local files: from a download manifest (a path to ``download.json``)
    or given directly as a list of paths."""
    if isinstance(inputs, (str, os.PathLike)):
        return manifest.input_files(inputs)
    return [os.fspath(p) for p in inputs]


def run_preprocess(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    volume_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    metadata_path: str | os.PathLike,
    qc_path: str | os.PathLike,
    manifest_path: str | os.PathLike,
    sample: str,
    settings: dict[str, Any] | None = None,
    series_uid: str | None = None,
    include_identifiers: bool = False,
    threads: int = 1,
) -> dict[str, Any]:
    """preprocess_ct: DICOM files to HU volume, lung mask, metadata and QC picture.

    ``inputs``: the download manifest or the files; ``settings``: all or part of the
    ``ct:`` config section; ``series_uid``: the sample sheet's choice (empty means none).
    Returns the step manifest (also written to ``manifest_path``, last)."""
    from medprep.ct import preprocess

    fixed_mmap_threshold()
    if not isinstance(series_uid, str) or not series_uid.strip():
        series_uid = None  # empty or missing in the sample sheet
    result = preprocess.preprocess(
        input_files(inputs),
        settings,
        series_uid=series_uid,
        include_identifiers=bool(include_identifiers),
        threads=threads,
    )
    artifacts = preprocess.write_outputs(
        result,
        volume=volume_path,
        mask=mask_path,
        metadata=metadata_path,
        qc=qc_path,
        threads=threads,
    )
    return manifest.write_step_manifest(
        manifest_path,
        sample=sample,
        modality="ct",
        step="preprocess",
        artifacts=artifacts,
        summary=result.summary,
    )


def run_tile(
    preprocess_manifest: str | os.PathLike | dict[str, Any],
    *,
    patches_path: str | os.PathLike,
    table_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    manifest_path: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    slices_dir: str | os.PathLike | None = None,
    threads: int = 1,
    annotations_manifest: str | os.PathLike | dict[str, Any] | None = None,
    download_manifest: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """tile_ct: 3D patches over the lungs, their table, optional PNG slices.

    ``preprocess_manifest``: the preprocess step manifest (path or dict); ``slices_dir``
    defaults to ``slices/`` beside the patches. ``annotations_manifest``: the sample's
    ``download_annotations`` manifest (None: no region labels); ``download_manifest``
    (or the DICOM files): the scan, read for the geometry of an LIDC XML. Returns the
    step manifest."""
    from medprep.ct import tile

    fixed_mmap_threshold()
    previous = (
        preprocess_manifest
        if isinstance(preprocess_manifest, dict)
        else manifest.read_step_manifest(preprocess_manifest)
    )
    annotations = None
    if annotations_manifest is not None:
        annotations = load_annotations(
            annotations_manifest,
            series_uid_hash=previous.get("summary", {}).get("series_uid_hash"),
            dicom_files=None if download_manifest is None else input_files(download_manifest),
            threads=threads,
        )
    artifacts, summary = tile.tile(
        previous,
        settings,
        patches_path=patches_path,
        table_path=table_path,
        summary_path=summary_path,
        slices_dir=Path(patches_path).parent / "slices" if slices_dir is None else slices_dir,
        threads=threads,
        annotations=annotations,
    )
    return manifest.write_step_manifest(
        manifest_path,
        sample=previous["sample"],
        modality="ct",
        step="tile",
        artifacts=artifacts,
        summary=summary,
    )


def load_annotations(
    annotations_manifest: str | os.PathLike | dict[str, Any],
    *,
    series_uid_hash: str | None,
    dicom_files: Sequence[str] | None = None,
    threads: int = 1,
) -> list:
    """The sample's annotations (``medprep.ct.labels.Annotation``) from the file a
    ``download_annotations`` manifest lists: a CSV (rows of the chosen series; a file of
    the whole cohort, ``scope: cohort``, may have none) or an LIDC XML (placed through
    the DICOM headers of ``dicom_files``)."""
    from medprep.ct import labels

    loaded = (
        annotations_manifest
        if isinstance(annotations_manifest, dict)
        else manifest.read_step_manifest(annotations_manifest)
    )
    path = manifest.annotation_file(annotations_manifest)
    kind = labels.kind_of(path)
    if kind == "csv":
        found, _counts = labels.read_csv(
            path,
            series_uid_hash=series_uid_hash,
            require_series=loaded.get("scope", "sample") == "sample",
        )
        return found
    if kind == "xml":
        if not dicom_files:
            raise InputError(
                "an LIDC XML needs the scan's DICOM files (the download manifest)", path=path
            )
        return labels.read_lidc(path, dicom_files, series_uid_hash=series_uid_hash, threads=threads)
    raise InputError("not a CT annotation file (expected a .csv or an LIDC .xml)", path=path)


def run_chain(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    *,
    sample: str = "sample",
    series_uid: str | None = None,
    include_identifiers: bool = False,
    threads: int = 1,
    annotations_manifest: str | os.PathLike | dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both steps into ``out`` with the workflow's file layout (without Snakemake):
    ``out/preprocess/...``, ``out/preprocess.json``, ``out/patches/...``, ``out/tile.json``.
    Returns (preprocess manifest, tile manifest)."""
    out = Path(out)
    pre = run_preprocess(
        inputs,
        volume_path=out / "preprocess/volume.nii.gz",
        mask_path=out / "preprocess/lung_mask.nii.gz",
        metadata_path=out / "preprocess/metadata.json",
        qc_path=out / "preprocess/qc.png",
        manifest_path=out / "preprocess.json",
        sample=sample,
        settings=settings,
        series_uid=series_uid,
        include_identifiers=include_identifiers,
        threads=threads,
    )
    tiled = run_tile(
        pre,
        patches_path=out / "patches/patches.npy",
        table_path=out / "patches/patches.parquet",
        summary_path=out / "patches/summary.json",
        manifest_path=out / "tile.json",
        settings=settings,
        slices_dir=out / "patches/slices",
        threads=threads,
        annotations_manifest=annotations_manifest,
        download_manifest=inputs,
    )
    return pre, tiled
