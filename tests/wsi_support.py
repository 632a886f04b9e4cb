"""Helpers for the whole-slide tests: fixture paths, small synthetic slides, step runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medprep.common import atomic
from medprep.demo.synthetic_slide import write_pyramidal_tiff, write_synthetic_slide
from medprep.wsi import steps

DATA = Path(__file__).resolve().parent / "fixtures" / "wsi"
CMU = DATA / "CMU-1-Small-Region.svs"  # Aperio, 0.499 um/px, H&E
TCGA_NO_MPP = DATA / "TCGA-CR-7395-01A-01-TS1-crop.svs"  # Aperio, no resolution metadata
DAPI = DATA / "test3-DAPI-2-387.ndpi"  # Hamamatsu, 0.228 um/px, fluorescence
TINY = DATA / "openslide-tiny"
# one level of a real DICOM-WSI, 15.82 um/px: coarser than any usual target
CPTAC_DICOM = DATA / "cptac-brca-dicom-level" / "911f6cbd-a1ad-4e95-bdf5-4e4ea52d9977.dcm"


def small_synthetic_slide(
    path: Path, width: int = 2048, height: int = 1536, **options: Any
) -> Path:
    """A small pyramidal JPEG slide with real CMU tissue texture (fast to write)."""
    options.setdefault("downsamples", (1, 4))
    write_synthetic_slide(path, width, height, texture_slide=CMU, **options)
    return path


def write_stripes_slide(
    path: Path,
    width: int,
    height: int,
    *,
    mpp: float,
    period_x: float,
    period_y: float,
    downsamples: tuple[int, ...] = (1, 4),
) -> Path:
    """A slide of sine stripes with known periods in level-0 pixels, at every level.

    Red follows x, blue follows y, so each direction can be measured on its own.
    """

    def render(d: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        xs = (x + np.arange(w) + 0.5) * d  # level-0 centres of this level's pixels
        ys = (y + np.arange(h) + 0.5) * d
        red = 128 + 100 * np.sin(2 * math.pi * xs / period_x)
        blue = 128 + 100 * np.sin(2 * math.pi * ys / period_y)
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[..., 0] = np.round(red)[None, :]
        out[..., 1] = 60
        out[..., 2] = np.round(blue)[:, None]
        return out

    write_pyramidal_tiff(path, width, height, render, mpp=mpp, quality=98, downsamples=downsamples)
    return path


def measured_period(profile: np.ndarray) -> float:
    """Mean distance in pixels between rising zero crossings of a centred 1-D signal."""
    signal = profile - profile.mean()
    crossings = []
    for i in range(len(signal) - 1):
        a, b = signal[i], signal[i + 1]
        if a < 0 <= b:
            crossings.append(i + a / (a - b))
    if len(crossings) < 3:
        raise AssertionError("too few periods in the tile to measure")
    return (crossings[-1] - crossings[0]) / (len(crossings) - 1)


# ---- a second staining of a real slide, for the stain tests and benchmarks/bench_stain.py

# another lab's H&E: Ruifrok and Johnston's colour-deconvolution vectors, haematoxylin 0.8
# and eosin 1.2 times as strong as on the slide restained
RUIFROK_H = (0.65, 0.70, 0.29)
RUIFROK_E = (0.07, 0.99, 0.11)
RESTAIN_AMOUNTS = (0.8, 1.2)


def slide_pixels(path: Path) -> np.ndarray:
    """Level 0 of a small slide as one RGB array."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def restained(image: np.ndarray, vectors) -> np.ndarray:
    """``image`` stained with Ruifrok's H and E instead of ``vectors`` (a
    ``medprep.wsi.stain.StainVectors``): in optical density each pixel's H and E (unmixed
    by ``vectors``) are taken out and put back as Ruifrok's, in ``RESTAIN_AMOUNTS``; the
    rest of its OD (what the two stains do not explain) is kept."""
    from medprep.wsi import stain

    other = np.array([RUIFROK_H, RUIFROK_E], dtype=np.float64).T
    other /= np.linalg.norm(other, axis=0)
    od = stain.optical_density(image).reshape(-1, 3).astype(np.float64)
    concentrations = od @ np.linalg.pinv(vectors.matrix).T
    od += (concentrations * np.array(RESTAIN_AMOUNTS)) @ other.T
    od -= concentrations @ vectors.matrix.T
    rgb = np.clip(stain.IO * np.exp(-od), 0, 255).astype(np.uint8)
    return rgb.reshape(image.shape)


def write_single_level(path: Path, image: np.ndarray, mpp: float) -> Path:
    """``image`` as a one-level tiled JPEG TIFF (quality 95) at ``mpp``."""
    height, width = image.shape[:2]
    write_pyramidal_tiff(
        path,
        width,
        height,
        lambda d, x, y, w, h: image[y : y + h, x : x + w],
        mpp=mpp,
        quality=95,
        downsamples=(1,),
    )
    return path


def write_download(folder: Path, *slides: Path) -> Path:
    """A download manifest listing local files, as the download step writes it."""
    path = folder / "download.json"
    atomic.write_json(
        path,
        {
            "format": 1,
            "sample": folder.name,
            "modality": "wsi",
            "step": "download",
            "files": [{"path": str(p), "key": p.name, "bytes": p.stat().st_size} for p in slides],
            "artifacts": [],
            "summary": {},
        },
    )
    return path


def outputs(folder: Path) -> dict[str, Path]:
    """The output paths of both steps under results-like ``folder`` (one sample)."""
    return {
        "mask": folder / "preprocess" / "mask.png",
        "thumbnail": folder / "preprocess" / "thumbnail.png",
        "preprocess_summary": folder / "preprocess" / "summary.json",
        "preprocess_manifest": folder / "preprocess.json",
        "table": folder / "tiles" / "tiles.parquet",
        "overlay": folder / "tiles" / "overlay.png",
        "tile_summary": folder / "tiles" / "summary.json",
        "tile_manifest": folder / "tile.json",
        "pixels": folder / "tiles" / "pixels",
    }


def preprocess(
    folder: Path,
    slide: Path | list[Path],
    *,
    threads: int = 1,
    mpp_override: float | None = None,
    resolution: dict | None = None,
    tissue: dict | None = None,
    limits: dict | None = None,
    max_read_errors: int = 0,
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    slides = slide if isinstance(slide, list) else [slide]
    download = write_download(folder, *slides)
    out = outputs(folder)
    return steps.run_preprocess(
        download,
        mask_path=out["mask"],
        thumbnail_path=out["thumbnail"],
        summary_path=out["preprocess_summary"],
        manifest_path=out["preprocess_manifest"],
        sample=folder.name,
        resolution=resolution,
        tissue=tissue,
        mpp_override=mpp_override,
        threads=threads,
        limits=limits,
        max_read_errors=max_read_errors,
    )


def tile(
    folder: Path,
    *,
    threads: int = 1,
    sample: str | None = None,
    annotations_manifest: Path | None = None,
    **tile_settings: Any,
) -> dict[str, Any]:
    out = outputs(folder)
    return steps.run_tile(
        folder / "download.json",
        out["preprocess_manifest"],
        table_path=out["table"],
        overlay_path=out["overlay"],
        summary_path=out["tile_summary"],
        manifest_path=out["tile_manifest"],
        sample=sample or folder.name,
        tile=tile_settings,
        threads=threads,
        annotations_manifest=annotations_manifest,
    )


def finished_looking(folder: Path) -> list[str]:
    """Files under ``folder`` that a reader could take for results (no temporaries)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.name == "download.json" or path.is_dir():
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            found.append(f"temporary left behind: {path}")
            continue
        found.append(str(path.relative_to(folder)))
    return found


# ---- bad slides, for the engine's (test_wsi_bad_input) and the workflow's (test_bad_input) tests


def zero_bytes(folder: Path) -> Path:
    path = folder / "empty.svs"
    path.write_bytes(b"")
    return path


def truncated_slide(folder: Path) -> Path:
    path = folder / "truncated.svs"
    data = CMU.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def random_bytes(folder: Path) -> Path:
    path = folder / "random.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return path


def png_renamed(folder: Path) -> Path:
    from PIL import Image

    path = folder / "picture.svs"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(path, format="PNG")
    return path


def enormous_dimensions(folder: Path) -> Path:
    """A valid tiled TIFF claiming 2,000,000 x 2,000,000 pixels, with no tile stored."""
    import tifffile

    path = folder / "bomb.tiff"
    side, tile = 2_000_000, 8192
    tiles = (-(-side // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            (b"" for _ in range(tiles)),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
        )
    return path


def hollow_slide(folder: Path, tile_bytes: bytes = b"", side: int = 200_000) -> Path:
    """A 300 KB tiled TIFF claiming ``side`` x ``side`` RGB pixels at 0.25 um/px, every
    tile ``tile_bytes`` (none by default): within the dimension limits, but no data."""
    import tifffile

    path = folder / "hollow.svs"
    tile_side = 1024
    count = (-(-side // tile_side)) ** 2
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            (tile_bytes for _ in range(count)),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(tile_side, tile_side),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
        )
    return path
