"""The two WSI steps as the rule scripts run them: manifests in, outputs and manifest out.

``scripts/preprocess_wsi.py`` and ``scripts/tile_wsi.py`` only unpack the ``snakemake``
object and call these, so the steps can be run and tested without Snakemake. Every file
is written under a temporary name and renamed when complete; the step manifest is last.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.workflow import manifest
from medprep.wsi.settings import ResolutionSettings, TileSettings, TissueSettings
from medprep.wsi.slide import pick_slide_file

# The engines (scipy, pyarrow, ...) are imported inside the steps: pool workers started
# with "spawn" import the rule script, and should not pay for what they do not use.

PREPROCESS_ARTIFACTS = {
    "mask": "preprocess/mask.png",
    "thumbnail": "preprocess/thumbnail.png",
    "summary": "preprocess/summary.json",
}
TILE_ARTIFACTS = {
    "table": "tiles/tiles.parquet",
    "overlay": "tiles/overlay.png",
    "summary": "tiles/summary.json",
}
PATCHES_ARTIFACT = "tiles/{sample}_patches.h5"  # TRIDENT/CLAM patch coordinates
PIXELS_ARTIFACT_PREFIX = "tiles/pixels"
PIXELS_FOLDER = "pixels"
TILE_SUMMARY_KEYS = (
    "status",
    "warnings",
    "tiles",
    "candidates",
    "rejected",
    "flagged",
    "read_calls",
    "stain",
)


def slide_from_download(download_manifest: str | os.PathLike) -> Path:
    """The slide file of a sample, from its download manifest."""
    return pick_slide_file(manifest.input_files(download_manifest))


def sample_sheet_mpp(value: Any) -> float | None:
    """The sample sheet's ``mpp`` cell as a float, or None when empty (None, "", NaN)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def read_png(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def run_preprocess(
    download_manifest: str | os.PathLike,
    *,
    mask_path: str | os.PathLike,
    thumbnail_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    manifest_path: str | os.PathLike,
    sample: str,
    resolution: dict[str, Any] | None = None,
    tissue: dict[str, Any] | None = None,
    mpp_override: float | None = None,
    threads: int = 1,
    limits: dict[str, Any] | None = None,
    max_read_errors: int = 0,
) -> dict[str, Any]:
    from medprep.wsi.guard import Limits
    from medprep.wsi.preprocess import manifest_summary, preprocess_slide

    mpp_override = sample_sheet_mpp(mpp_override)
    slide = slide_from_download(download_manifest)
    result = preprocess_slide(
        slide,
        ResolutionSettings.from_config(resolution),
        TissueSettings.from_config(tissue),
        mpp_override=mpp_override,
        workers=threads,
        limits=Limits.from_config(limits),
        max_read_errors=max_read_errors,
    )
    atomic.write_png(mask_path, result.mask.astype(np.uint8) * 255, compress_level=1)
    atomic.write_png(thumbnail_path, result.thumbnail, compress_level=1)
    atomic.write_json(summary_path, result.summary)
    return manifest.write_step_manifest(
        manifest_path,
        sample=sample,
        modality="wsi",
        step="preprocess",
        slide=os.fspath(slide),
        artifacts=[
            manifest.artifact(PREPROCESS_ARTIFACTS["mask"], mask_path),
            manifest.artifact(PREPROCESS_ARTIFACTS["thumbnail"], thumbnail_path),
            manifest.artifact(PREPROCESS_ARTIFACTS["summary"], summary_path),
        ],
        summary=manifest_summary(result.summary),
    )


def mark_flags(
    thumbnail: np.ndarray, mask: np.ndarray, summary: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Pen, fold and gap masks of a brightfield slide's thumbnail (none for fluorescence)."""
    from medprep.wsi import marks

    if summary["tissue_mode"] != "brightfield" or thumbnail.shape[:2] != mask.shape:
        return {}
    return marks.detect_marks(
        thumbnail[..., :3], mask, tissue_threshold=summary["thresholds"]["threshold"]
    )


def baked_stain(
    settings: TileSettings, summary: dict[str, Any]
) -> tuple[np.ndarray | None, str | None]:
    """With ``wsi.tile.stain: normalise``: the OD matrix that normalises this slide's
    tiles to Macenko's reference H&E, or None and why not (fluorescence: nothing to say)."""
    from medprep.wsi import stain

    if settings.stain != "normalise":
        return None, None
    record = summary.get("stain")
    if record is None:
        return None, None
    if record.get("status") != "ok":
        return None, f"tiles not stain-normalised: {record.get('reason')}"
    source = stain.StainVectors.from_dict(record)
    return stain.normalisation_matrix(source, stain.REFERENCE), None


def run_tile(
    download_manifest: str | os.PathLike,
    preprocess_manifest: str | os.PathLike,
    *,
    table_path: str | os.PathLike,
    overlay_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    manifest_path: str | os.PathLike,
    sample: str,
    tile: dict[str, Any] | None = None,
    threads: int = 1,
    annotations_manifest: str | os.PathLike | None = None,
    patches_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Tile a preprocessed slide. ``annotations_manifest``: a download-style manifest
    listing the sample's GeoJSON annotation file (``medprep.wsi.labels``), or None: then
    the table has no label columns and the sheet's label applies to every tile.
    ``patches_path``: where the TRIDENT/CLAM coordinates go (``medprep.wsi.patch_coords``;
    default ``{sample}_patches.h5`` beside the table)."""
    from medprep.wsi import labels, marks, patch_coords, writers
    from medprep.wsi.tiler import SlidePlan, draw_overlay, tile_slide

    settings = TileSettings.from_config(tile)
    slide = slide_from_download(download_manifest)
    previous = manifest.read_step_manifest(preprocess_manifest)
    summary = atomic.read_json(manifest.artifact_path(previous, PREPROCESS_ARTIFACTS["summary"]))
    plan = SlidePlan.from_summary(slide, summary)
    mask = read_png(manifest.artifact_path(previous, PREPROCESS_ARTIFACTS["mask"])) > 127
    if mask.shape != (summary["mask"]["height"], summary["mask"]["width"]):
        raise InputError(
            f"tissue mask is {mask.shape[1]} x {mask.shape[0]}, the preprocess summary says "
            f"{summary['mask']['width']} x {summary['mask']['height']}: rerun preprocess",
            path=manifest.artifact_path(previous, PREPROCESS_ARTIFACTS["mask"]),
        )
    thumbnail = read_png(manifest.artifact_path(previous, PREPROCESS_ARTIFACTS["thumbnail"]))
    flags = mark_flags(thumbnail, mask, summary)
    annotations = None
    if annotations_manifest is not None:
        annotation_path = manifest.annotation_file(annotations_manifest)
        annotations = labels.read_annotations(annotation_path)
        annotations.warnings.extend(
            labels.check_extent(annotations, *plan.dimensions, os.fspath(annotation_path))
        )

    stain_matrix, stain_note = baked_stain(settings, summary)
    pixels_dir = Path(table_path).parent / PIXELS_FOLDER
    with atomic.staged_dir(pixels_dir) as staging:
        result = tile_slide(
            plan,
            mask,
            settings,
            sample=sample,
            pixels_dir=staging,
            workers=threads,
            flags=flags,
            annotations=annotations,
            stain_matrix=stain_matrix,
        )
    if annotations is not None:
        result.summary["warnings"] += annotations.warnings
    result.summary["stain"] = "normalised" if stain_matrix is not None else "as_scanned"
    if stain_note:
        result.summary["warnings"].append(stain_note)
    writers.write_table(result.table, table_path)
    patches_name = PATCHES_ARTIFACT.format(sample=sample)
    if patches_path is None:
        patches_path = Path(table_path).parent / Path(patches_name).name
    patch_coords.write_patch_coords(
        patches_path,
        result.table["x"],
        result.table["y"],
        patch_coords.patch_attributes(
            name=sample,
            size=settings.size,
            step=settings.step,
            scale_x=plan.scale_x,
            target_mpp=plan.target_mpp,
            tile_mpp=plan.tile_mpp,
            level0_mpp=float(summary["mpp_x"]),
            dimensions=plan.dimensions,
            level=plan.level,
            level_downsample=plan.level_downsample,
        ),
    )
    overlay = draw_overlay(
        marks.tint(thumbnail, flags),
        result.kept_boxes,
        result.rejected_boxes,
        plan.mask_downsample_x,
        plan.mask_downsample_y,
        labels.outlines(annotations) if annotations is not None else None,
    )
    atomic.write_png(overlay_path, overlay, compress_level=1)
    atomic.write_json(summary_path, result.summary)
    artifacts = [
        manifest.artifact(TILE_ARTIFACTS["table"], table_path),
        manifest.artifact(TILE_ARTIFACTS["overlay"], overlay_path),
        manifest.artifact(TILE_ARTIFACTS["summary"], summary_path),
        manifest.artifact(patches_name, patches_path),
    ]
    artifacts += [
        manifest.artifact(f"{PIXELS_ARTIFACT_PREFIX}/{name}", pixels_dir / name)
        for name in result.pixel_files
    ]
    return manifest.write_step_manifest(
        manifest_path,
        sample=sample,
        modality="wsi",
        step="tile",
        slide=os.fspath(slide),
        artifacts=artifacts,
        summary={key: result.summary[key] for key in TILE_SUMMARY_KEYS},
    )
