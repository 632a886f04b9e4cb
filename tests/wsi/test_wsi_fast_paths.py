"""The tiler's fast paths: the box pre-reduction of resampled blocks (geometry, grouping and
quality against the bicubic path) and coordinates-only tiling without pixel reads."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image
from wsi_support import CMU, outputs, preprocess, small_synthetic_slide, tile

from medprep.wsi import qc
from medprep.wsi.slide import SlideReader
from medprep.wsi.workers import (
    PREREDUCED_FILTER,
    BlockTask,
    TileJob,
    prereduce_factor,
    resample_tiles,
)

# CMU-1 (0.499 um/px) read as if scanned at Aperio 40x, 0.2527 um/px, tiled at 0.5 um/px
RATIO = 0.5 / 0.2527


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return small_synthetic_slide(tmp_path_factory.mktemp("fast") / "synthetic.svs")


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    """Aperio 40x: 0.2527 um/px, levels 1 and 4 (no level near 0.5)."""
    path = tmp_path_factory.mktemp("fast") / "fine.svs"
    return small_synthetic_slide(path, 1400, 1100, mpp=0.2527)


@pytest.mark.parametrize(
    ("ratio", "tolerance", "factor"),
    [
        (RATIO, 0.025, 2),  # 0.2527 -> 0.5: averaged pixels 0.5054 um, 1.1% coarser
        (RATIO, 0.0, 1),  # no tolerance: nothing coarser than the output
        (1.9, 0.025, 1),  # 5% coarser is outside the tolerance
        (2.0, 0.0, 2),
        (3.96, 0.025, 4),
        (3.5, 0.025, 3),
        (1.004, 0.025, 1),
    ],
)
def test_prereduction_is_never_coarser_than_the_tolerance(ratio, tolerance, factor):
    assert prereduce_factor(ratio, tolerance) == factor
    assert factor / ratio - 1 <= tolerance + 1e-12


def _job(size: int, extent: float, prereduce: int) -> TileJob:
    return TileJob(
        "x", 0, 1.0, True, size, extent, extent, None, 90, "brightfield", 20.0, (0, 0, 0),
        prereduce=prereduce,
    )  # fmt: skip


def _cmu_block(side: int = 1100) -> np.ndarray:
    reader = SlideReader(CMU)
    try:
        return np.ascontiguousarray(reader.read_rgba(0, 500, 700, side, side))
    finally:
        reader.close()


def _grid_task(size: int, step: int, ratio: float, cols: int, rows: int, offset: int = 6):
    xs = [round(c * step * ratio) + offset for c in range(cols)]
    ys = [round(r * step * ratio) + offset for r in range(rows)]
    return tuple(x for _ in ys for x in xs), tuple(y for y in ys for _ in xs)


def test_prereduced_tiles_are_the_averaged_block_resized_over_each_exact_footprint():
    rgba = _cmu_block(700)
    size, k = 96, 2
    extent = size * RATIO
    xs, ys = _grid_task(size, 80, RATIO, 3, 3)  # overlapping tiles, rounded origins
    task = BlockTask(0, 0, 0, rgba.shape[1], rgba.shape[0], xs, ys)
    ours = resample_tiles(rgba, _job(size, extent, k), task)
    averaged = Image.fromarray(rgba[..., :3]).reduce(k)
    resample = getattr(Image.Resampling, PREREDUCED_FILTER)
    for ours_tile, x, y in zip(ours, xs, ys, strict=True):
        box = (x / k, y / k, (x + extent) / k, (y + extent) / k)
        reference = np.asarray(averaged.resize((size, size), resample, box=box))
        assert ours_tile.shape == (size, size, 4)
        assert np.array_equal(ours_tile[..., :3], reference)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_prereduced_resampling_stays_close_to_the_bicubic_path_on_real_tissue():
    """Quality of the fast filter on CMU-1 tissue at the 0.2527 -> 0.5 reduction: PSNR
    against the wide bicubic resize (the tiler's path without pre-reduction) and the blur
    score of the tiles (what ``min_blur`` / ``min_sharpness`` filter on)."""
    rgba = _cmu_block()
    size = 256
    extent = size * RATIO
    xs, ys = _grid_task(size, size, RATIO, 2, 2)
    task = BlockTask(0, 0, 0, rgba.shape[1], rgba.shape[0], xs, ys)
    bicubic = resample_tiles(rgba, _job(size, extent, 1), task)
    fast = resample_tiles(rgba, _job(size, extent, prereduce_factor(RATIO, 0.025)), task)
    psnr = _psnr(np.stack(fast)[..., :3], np.stack(bicubic)[..., :3])
    assert psnr >= 34.0, psnr  # measured 36.0 dB
    for a, b in zip(fast, bicubic, strict=True):
        blur_fast = qc.tile_scores(a, "brightfield", 20.0).blur
        blur_bicubic = qc.tile_scores(b, "brightfield", 20.0).blur
        assert abs(blur_fast / blur_bicubic - 1) < 0.05, (blur_fast, blur_bicubic)  # <= 2.4%
        mean_diff = np.abs(a[..., :3].mean() - b[..., :3].mean())
        assert mean_diff < 0.5  # no brightness shift


def test_prereduced_tiling_keeps_the_grid_and_does_not_depend_on_block_grouping(tmp_path, fine):
    pixels = {}
    for block_tiles in (1, 3):
        folder = tmp_path / str(block_tiles) / "S"
        preprocess(folder, fine, resolution={"mpp": 0.5, "tolerance": 0.025})
        manifest = tile(
            folder,
            container="folder",
            format="png",
            size=128,
            block_tiles=block_tiles,
            min_tissue=0.0,
        )
        assert manifest["summary"]["tiles"] > 12
        table = pd.read_parquet(outputs(folder)["table"])
        pixels[block_tiles] = {
            (row.x, row.y): np.asarray(Image.open(folder / "tiles" / row.file))
            for row in table.itertuples()
        }
        # 2 x 2 averaged pixels are 0.5054 um, within the tolerance: used as they are
        assert np.allclose(table["mpp"], 2 * 0.2527) and set(table["size"]) == {128}
    tile_summary = json.loads(outputs(folder)["tile_summary"].read_text())
    assert tile_summary["resample"] and tile_summary["resample_prereduce"] == 2
    assert pixels[1].keys() == pixels[3].keys()
    # the averaging cells are the same whatever the block
    for key, image in pixels[1].items():
        assert image.shape == (128, 128, 3)
        assert np.array_equal(image, pixels[3][key]), key
    # each output pixel is the mean of its 2 x 2 level-0 pixels (no resizing after it)
    with openslide.OpenSlide(str(fine)) as slide:
        for x, y in list(pixels[1])[:4]:
            level0 = np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)))[..., :3]
            mean = level0.reshape(128, 2, 128, 2, 3).astype(float).mean(axis=(1, 3))
            assert np.abs(pixels[1][(x, y)] - mean).max() <= 1.0, (x, y)


def test_coordinates_only_reads_no_pixels_unless_a_pixel_filter_needs_them(tmp_path, synthetic):
    folder = tmp_path / "S"
    preprocess(folder, synthetic)

    def run(**settings):
        tile(folder, **settings)
        summary = json.loads(outputs(folder)["tile_summary"].read_text())
        return summary, pd.read_parquet(outputs(folder)["table"])

    tiles, full = run(container="tar")
    coords, cheap = run(container="coords")
    assert coords["read_calls"] == 0 and coords["pixel_scores"] is False
    assert tiles["read_calls"] > 0 and tiles["pixel_scores"] is True
    # the same tiles, coverage and artifact fractions; no pixel scores at all (null)
    same = ["x", "y", "mask_coverage", "mpp", "pen_fraction", "fold_fraction", "gap_fraction"]
    pd.testing.assert_frame_equal(cheap[same], full[same])
    assert cheap[list(qc.SCORE_NAMES)].isna().all().all()
    assert full[list(qc.SCORE_NAMES)].notna().all().all()

    scored, with_scores = run(container="coords", coords_scores=True)
    assert scored["read_calls"] == tiles["read_calls"] and scored["pixel_scores"] is True
    pd.testing.assert_frame_equal(with_scores[list(qc.SCORE_NAMES)], full[list(qc.SCORE_NAMES)])

    filtered, _ = run(container="coords", filters={"min_blur": 1.0})
    assert filtered["read_calls"] > 0 and filtered["pixel_scores"] is True


def test_fast_ink_masks_equal_the_hsv_rules_pixel_for_pixel():
    from medprep.wsi import marks

    rng = np.random.default_rng(3)
    tissue = np.asarray(Image.fromarray(_cmu_block(600)[..., :3]).reduce(4))
    for rgb in (rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), tissue):
        hsv = marks.to_hsv(rgb)
        masks, saturation, value = marks.fast_ink_masks(rgb)
        assert np.array_equal(saturation, hsv.saturation) and np.array_equal(value, hsv.value)
        reference = marks.ink_masks(hsv)
        assert masks.keys() == reference.keys()
        for name, mask in reference.items():
            assert np.array_equal(masks[name], mask), name
    # small ink components are dropped wherever they are, large ones kept
    mask = np.zeros((50, 60), dtype=bool)
    mask[3:5, 40:42] = True  # 4 pixels: kept
    mask[30, 7] = True  # 1 pixel: dropped
    kept = marks.remove_small(mask, marks.MIN_INK_PIXELS)
    assert kept.sum() == 4 and kept[3:5, 40:42].all()


def test_tint_blends_only_flagged_pixels_and_leaves_the_thumbnail_alone():
    from medprep.wsi import marks

    rng = np.random.default_rng(4)
    thumbnail = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    before = thumbnail.copy()
    flags = {"pen": rng.random((40, 50)) < 0.2, "fold": rng.random((40, 50)) < 0.2}
    tinted = marks.tint(thumbnail, flags)
    assert np.array_equal(thumbnail, before)
    either = flags["pen"] | flags["fold"]
    assert np.array_equal(tinted[~either], thumbnail[~either])
    # a pen-only pixel: 55% of the way to magenta, rounded
    y, x = np.argwhere(flags["pen"] & ~flags["fold"])[0]
    expected = thumbnail[y, x] * 0.45 + np.array(marks.FLAG_COLOURS["pen"]) * 0.55
    assert np.abs(tinted[y, x].astype(float) - expected).max() <= 0.5 + 1e-4
