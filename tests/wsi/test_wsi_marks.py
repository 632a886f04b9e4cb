"""QC per stain type (fluorescence and brightfield), pen marks and artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from wsi_support import CMU, DAPI, TCGA_NO_MPP, outputs, preprocess, tile

from medprep.common import atomic
from medprep.demo.synthetic_slide import write_pyramidal_tiff
from medprep.wsi import marks, qc
from medprep.wsi.writers import read_table

# Marker inks as transmittances (ink absorbs: the slide's colour is multiplied by these).
INKS = {
    "blue": (0.15, 0.30, 0.85),
    "green": (0.20, 0.65, 0.30),
    "black": (0.16, 0.16, 0.19),
    "red": (0.95, 0.12, 0.14),
}
STROKE_WIDTH = 120  # level-0 pixels: 60 um at 0.499 um/px, 7.5 mask pixels


def cmu_pixels() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(CMU)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def stroke_masks(width: int, height: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Four strokes across the tissue of CMU, in level-0 pixels divided by ``scale``."""
    lines = {
        "blue": [(100, 700), (1200, 900), (2100, 650)],
        "green": [(900, 1300), (1050, 2000), (1000, 2900)],
        "black": [(300, 2700), (1500, 1700)],
        "red": [(1250, 2350), (2100, 2550)],
    }
    masks = {}
    for name, points in lines.items():
        image = Image.new("L", (math.ceil(width / scale), math.ceil(height / scale)), 0)
        draw = ImageDraw.Draw(image)
        draw.line(
            [(x / scale, y / scale) for x, y in points],
            fill=255,
            width=max(1, round(STROKE_WIDTH / scale)),
            joint="curve",
        )
        masks[name] = np.asarray(image) > 127
    return masks


def ink(rgb: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    out = rgb.astype(np.float32)
    for name, mask in masks.items():
        out[mask] *= np.asarray(INKS[name], dtype=np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --- QC per stain type ------------------------------------------------------------------


def fluorescence_tile(seed: int = 0, gain: float = 1.0) -> np.ndarray:
    """A DAPI-like tile: glass at 4, faint tissue at 12, bright nuclei; blue channel only."""
    rng = np.random.default_rng(seed)
    blue = np.full((256, 256), 12.0)
    yy, xx = np.mgrid[:256, :256]
    for _ in range(60):
        cy, cx = rng.uniform(0, 256, 2)
        blue[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 200
    blue = blue * gain + rng.normal(0, 1, blue.shape)
    out = np.zeros((256, 256, 3), np.uint8)
    out[..., 2] = np.clip(blue, 0, 255).astype(np.uint8)
    return out


def test_fluorescence_background_is_the_slides_glass_not_the_space_between_nuclei():
    tile_rgb = fluorescence_tile()
    scores = qc.tile_scores(tile_rgb, "fluorescence", 74.0, dark=qc.dark_level(4.0, 74.0))
    assert scores.black_fraction < 0.05 and scores.background_fraction < 0.05
    assert scores.tissue_fraction > 0.95
    glass = np.zeros_like(tile_rgb)
    glass[..., 2] = 4
    assert qc.tile_scores(glass, "fluorescence", 74.0, dark=8.0).background_fraction == 1.0
    # the brightfield reading of the same pixels calls nearly all of it black background
    assert qc.tile_scores(tile_rgb, "brightfield", 20.0).black_fraction > 0.9


def test_dark_level_follows_the_glass_and_stays_below_the_tissue_threshold():
    assert qc.dark_level(4.0, 74.0) == 8.0
    assert qc.dark_level(20.0, 74.0) == 40.0
    assert qc.dark_level(60.0, 74.0) == 74.0
    assert qc.dark_level(None, 74.0) == qc.BLACK_LEVEL


def test_sharpness_does_not_depend_on_contrast_and_falls_with_blur():
    sharp = cmu_pixels()[1000:1256, 700:956]
    faint = (sharp.astype(np.float32) * 0.35 + 150).astype(np.uint8)
    a = qc.tile_scores(sharp, "brightfield", 20)
    b = qc.tile_scores(faint, "brightfield", 20)
    assert b.blur < 0.2 * a.blur  # the raw score moves with contrast...
    assert b.sharpness == pytest.approx(a.sharpness, rel=0.25)  # ...the normalised one not
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(1)))
    assert qc.tile_scores(blurred, "brightfield", 20).sharpness < 0.5 * a.sharpness
    # fluorescence: on the signal channel, at two exposures
    f1 = qc.tile_scores(fluorescence_tile(gain=1.0), "fluorescence", 74, dark=8)
    f2 = qc.tile_scores(fluorescence_tile(gain=0.5), "fluorescence", 74, dark=8)
    assert f2.sharpness == pytest.approx(f1.sharpness, rel=0.25)
    assert f1.blur > 100  # measured on the blue channel, not on luma (x 0.114)


def test_fluorescence_tiles_survive_the_qc_filters_and_the_overlay_is_visible(tmp_path):
    folder = tmp_path / "DAPI"
    preprocess(folder, DAPI)
    summary = atomic.read_json(outputs(folder)["preprocess_summary"])
    assert summary["tissue_mode"] == "fluorescence" and summary["thumbnail_autocontrast"]
    assert summary["thresholds"]["dark_level"] == pytest.approx(8.0)
    filters = {"max_background": 0.5, "min_tissue_fraction": 0.5, "min_sharpness": 0.4}
    manifest = tile(folder, container="coords", filters=filters)
    result = manifest["summary"]
    assert result["candidates"] >= 40
    assert result["tiles"] == result["candidates"], result["rejected"]
    table = read_table(outputs(folder)["table"])
    assert table["black_fraction"].mean() < 0.3  # was 0.87 with brightfield rules
    assert table["sharpness"].median() > 0.5
    assert (table[["pen_fraction", "fold_fraction", "gap_fraction"]] == 0).all().all()
    overlay = np.asarray(Image.open(outputs(folder)["overlay"]))
    assert np.median(overlay) > 30  # was nearly black (median 3)


# --- pen marks and artifacts ------------------------------------------------------------


def test_ink_strokes_are_found_on_the_mask_resolution_image_and_clean_tissue_is_not(tmp_path):
    folder = tmp_path / "CMU"
    preprocess(folder, CMU)
    thumbnail = np.asarray(Image.open(outputs(folder)["thumbnail"]))[..., :3]
    mask = np.asarray(Image.open(outputs(folder)["mask"])) > 127
    summary = atomic.read_json(outputs(folder)["preprocess_summary"])
    threshold = summary["thresholds"]["threshold"]
    clean = marks.detect_marks(thumbnail, mask, tissue_threshold=threshold)
    assert not clean["pen"].any()
    scale = summary["mask"]["downsample"][0]
    strokes = stroke_masks(2220, 2967, scale)
    strokes = {k: v[: mask.shape[0], : mask.shape[1]] for k, v in strokes.items()}
    flags = marks.detect_marks(ink(thumbnail, strokes), mask, tissue_threshold=threshold)
    for name, stroke in strokes.items():
        found = flags["pen"][stroke].mean()
        assert found > 0.9, f"{name} ink: {found:.0%} of its pixels flagged"
    anywhere = np.zeros_like(mask)
    for stroke in strokes.values():
        anywhere |= stroke
    assert not flags["pen"][~anywhere].any()


def test_clean_he_slides_raise_no_pen_flags():
    for slide, mpp in ((CMU, None), (TCGA_NO_MPP, 0.25)):
        from medprep.wsi.preprocess import preprocess_slide
        from medprep.wsi.settings import ResolutionSettings

        result = preprocess_slide(slide, ResolutionSettings(mpp_fallback=mpp))
        flags = marks.detect_marks(
            result.thumbnail,
            result.mask,
            tissue_threshold=result.summary["thresholds"]["threshold"],
        )
        assert not flags["pen"].any(), slide.name


def write_inked_cmu(path: Path) -> dict[str, np.ndarray]:
    """CMU with blue, green, black and red marker strokes, as a tiled JPEG pyramid (Aperio-style)."""
    pixels = cmu_pixels()
    height, width = pixels.shape[:2]
    strokes = stroke_masks(width, height)
    inked = ink(pixels, strokes)
    levels = {1: inked, 4: np.asarray(Image.fromarray(inked).reduce(4))}

    def render(d, x, y, w, h):
        return levels[int(d)][y : y + h, x : x + w]

    write_pyramidal_tiff(path, width, height, render, mpp=0.499, quality=90, downsamples=(1, 4))
    return strokes


def test_tiles_under_a_stroke_are_flagged_end_to_end(tmp_path):
    slide = tmp_path / "inked.svs"
    strokes = write_inked_cmu(slide)
    anywhere = np.zeros_like(next(iter(strokes.values())))
    for stroke in strokes.values():
        anywhere |= stroke
    folder = tmp_path / "INKED"
    preprocess(folder, slide)
    manifest = tile(folder, container="coords", size=128)
    table = read_table(outputs(folder)["table"])
    margin = 16  # level-0 pixels (8 um, one mask pixel): edges blur into the neighbours

    def stroke_cover(row, pad=0) -> float:
        x0, y0 = max(int(row.x) - pad, 0), max(int(row.y) - pad, 0)
        x1 = min(math.ceil(row.x + row.width_l0) + pad, anywhere.shape[1])
        y1 = min(math.ceil(row.y + row.height_l0) + pad, anywhere.shape[0])
        return float(anywhere[y0:y1, x0:x1].mean())

    under = [r for r in table.itertuples() if stroke_cover(r) >= 0.25]
    clean = [r for r in table.itertuples() if stroke_cover(r, margin) == 0]
    assert len(under) >= 15 and len(clean) >= 40
    hit = np.mean([r.pen_fraction >= marks.FLAG_MIN_FRACTION for r in under])
    false = np.mean([r.pen_fraction >= marks.FLAG_MIN_FRACTION for r in clean])
    print(
        f"under a stroke: {len(under)} tiles, {hit:.0%} flagged; clean: {len(clean)}, {false:.0%}"
    )
    assert hit >= 0.95 and false == 0
    assert manifest["summary"]["flagged"]["pen"] >= len(under)
    # the filter drops them and counts the reason; the overlay shows the ink in magenta
    filtered = tmp_path / "FILTERED"
    preprocess(filtered, slide)
    result = tile(filtered, container="coords", size=128, filters={"max_pen_fraction": 0.05})
    assert result["summary"]["rejected"]["max_pen_fraction"] >= len(under)
    assert (
        result["summary"]["tiles"] == len(table) - result["summary"]["rejected"]["max_pen_fraction"]
    )
    overlay = np.asarray(Image.open(outputs(filtered)["overlay"]))[..., :3].astype(int)
    magenta = (overlay[..., 0] > 150) & (overlay[..., 1] < 120) & (overlay[..., 2] > 150)
    assert magenta.sum() > 1000
