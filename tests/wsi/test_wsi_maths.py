"""Whole-slide maths on plain arrays and numbers: resolution, tissue, grid, QC, writers."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from medprep.common.errors import InputError
from medprep.common.settings import config_defaults
from medprep.wsi import grid, memory, qc, resolution, tissue, writers
from medprep.wsi.settings import FilterSettings, ResolutionSettings, TileSettings, TissueSettings

REPO = Path(__file__).resolve().parents[2]

# --- resolution -------------------------------------------------------------------------


def test_sample_sheet_mpp_wins_over_metadata_and_is_recorded():
    mpp, warnings = resolution.resolve_mpp((0.25, 0.25), sample_sheet=0.5, fallback=1.0)
    assert (mpp.x, mpp.y, mpp.source) == (0.5, 0.5, "sample_sheet")
    assert any("overrides" in w for w in warnings)


def test_metadata_mpp_used_before_fallback():
    mpp, warnings = resolution.resolve_mpp((0.2528, 0.2531), fallback=1.0)
    assert (mpp.x, mpp.y, mpp.source) == (0.2528, 0.2531, "metadata")
    assert warnings == []


def test_fallback_is_used_with_a_warning_when_metadata_is_missing():
    mpp, warnings = resolution.resolve_mpp((None, None), fallback=0.5)
    assert (mpp.x, mpp.source) == (0.5, "config_fallback")
    assert len(warnings) == 1 and "mpp_fallback" in warnings[0]


def test_missing_mpp_fails_saying_how_to_supply_one():
    with pytest.raises(InputError) as caught:
        resolution.resolve_mpp((None, None))
    message = str(caught.value)
    assert "sample sheet" in message and "mpp_fallback" in message


def test_placeholder_72_dpi_resolution_is_not_taken_as_a_scan_resolution():
    with pytest.raises(InputError, match="not a plausible"):
        resolution.resolve_mpp((352.78, 352.78))
    mpp, _ = resolution.resolve_mpp((352.78, 352.78), sample_sheet=0.5)
    assert mpp.source == "sample_sheet"


@pytest.mark.parametrize(
    ("downsamples", "scale", "expected"),
    [
        ((1, 4, 16), 1.0, 0),
        ((1, 4, 16), 3.9, 0),  # 4 would be coarser than the target
        ((1, 4, 16), 4.0, 1),
        ((1, 4, 16), 10.0, 1),
        ((1, 4, 16), 100.0, 2),
        ((1, 2.0005, 4.001), 2.0, 0),  # strictly: 2.0005 is a hair coarser
        ((1, 4), 0.5, 0),  # finer than level 0: read level 0
    ],
)
def test_choose_level_takes_the_coarsest_level_at_or_finer_than_the_target(
    downsamples, scale, expected
):
    assert resolution.choose_level(downsamples, scale) == expected


def test_choose_level_tolerance_accepts_a_nearly_equal_level():
    assert resolution.choose_level((1, 2.0005, 4.001), 2.0, tolerance=0.01) == 1


def test_plan_read_resamples_unless_a_level_matches_exactly():
    mpp = resolution.Mpp(0.25, 0.25, "metadata")
    exact = resolution.plan_read((1, 2, 4), mpp, 0.5)
    assert (exact.level, exact.resample, exact.scale_x) == (1, False, 2.0)
    between = resolution.plan_read((1, 2, 4), mpp, 0.6)
    assert (between.level, between.resample) == (1, True)
    assert between.scale_x == pytest.approx(2.4)
    snapped = resolution.plan_read((1, 2.0005), mpp, 0.5, tolerance=0.01)
    assert (snapped.level, snapped.resample, snapped.scale_x) == (1, False, 2.0005)


def test_target_precedence_level_then_magnification_then_mpp():
    mpp = resolution.Mpp(0.25, 0.25, "metadata")
    both = ResolutionSettings(mpp=0.5, magnification=10, level=1)
    assert resolution.target_resolution(both, mpp, (1, 4)).mpp == pytest.approx(1.0)
    magnification = ResolutionSettings(mpp=0.5, magnification=10)
    assert resolution.target_resolution(magnification, mpp, (1, 4)).mpp == pytest.approx(1.0)
    assert resolution.target_resolution(ResolutionSettings(mpp=0.7), mpp, (1,)).mpp == 0.7
    with pytest.raises(InputError, match="only 2 level"):
        resolution.target_resolution(ResolutionSettings(level=5), mpp, (1, 4))


# --- settings ---------------------------------------------------------------------------


def test_settings_are_the_config_schemas_sections():
    wsi = config_defaults("wsi")
    assert ResolutionSettings().as_dict() == wsi["resolution"]
    assert TissueSettings().as_dict() == wsi["tissue"]
    assert TileSettings().as_dict() == wsi["tile"]
    assert TileSettings().filters == FilterSettings()
    assert TileSettings.from_config({"filters": {"min_blur": 3}}).filters.min_blur == 3


def test_shipped_config_wsi_section_is_accepted():
    config = yaml.safe_load((REPO / "config.yaml").read_text())["wsi"]
    ResolutionSettings.from_config(config["resolution"])
    TissueSettings.from_config(config["tissue"])
    TileSettings.from_config(config["tile"])


def test_unknown_setting_is_an_error_not_ignored():
    with pytest.raises(ValueError, match="min_tisue"):
        TileSettings.from_config({"min_tisue": 0.3})
    with pytest.raises(ValueError, match=r"^unknown key 'max_pen' under wsi\.tile\.filters"):
        TileSettings.from_config({"filters": {"max_pen": 0.1}})


def test_a_value_beyond_the_schemas_limits_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"^wsi\.tile\.size: 8 is less than the minimum of 16$"):
        TileSettings(size=8)
    with pytest.raises(ValueError, match=r"^wsi\.resolution\.tolerance: 0\.5 is greater than"):
        ResolutionSettings.from_config({"tolerance": 0.5})
    with pytest.raises(ValueError, match=r"^wsi\.tissue\.mode: 'dark' is not one of"):
        TissueSettings(mode="dark")


# --- tissue -----------------------------------------------------------------------------


def _brightfield_scene() -> tuple[np.ndarray, np.ndarray]:
    """Pink tissue disc (with a hole and a speck) on near-white glass, plus its truth."""
    rng = np.random.default_rng(1)
    h, w = 200, 300
    yy, xx = np.mgrid[:h, :w]
    truth = (yy - 100) ** 2 + (xx - 150) ** 2 < 70**2
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[...] = (236, 234, 238)
    rgb[truth] = (200, 110, 170)
    rgb = np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
    hole = (yy - 100) ** 2 + (xx - 150) ** 2 < 6**2  # a small lumen, filled by hole filling
    rgb[hole] = (236, 234, 238)
    rgb[10:12, 10:12] = (90, 40, 120)  # a 2 x 2 speck: smaller than min_object
    return rgb, truth


def test_brightfield_mask_finds_the_tissue_and_drops_specks():
    rgb, truth = _brightfield_scene()
    result = tissue.detect_tissue(rgb, TissueSettings(), mask_mpp=8.0)
    assert result.mode == "brightfield" and result.mode_detected
    iou = (result.mask & truth).sum() / (result.mask | truth).sum()
    assert iou > 0.95
    assert result.mask[100, 150]  # the hole is filled
    assert not result.mask[8:14, 8:14].any()  # the speck is gone


def test_fluorescence_is_detected_and_not_all_tissue_or_all_background():
    rng = np.random.default_rng(2)
    h, w = 200, 300
    rgb = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 6, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    nuclei = ((xx // 4 + yy // 4) % 2 == 0) & (xx < 150)  # bright dots on the left half
    rgb[nuclei, 2] = 200
    result = tissue.detect_tissue(rgb, TissueSettings(closing_um=32), mask_mpp=8.0)
    assert result.mode == "fluorescence"
    assert result.mask[:, :150].mean() > 0.3 and result.mask[:, 160:].mean() < 0.05
    forced = tissue.detect_tissue(rgb, TissueSettings(mode="fluorescence"), mask_mpp=8.0)
    assert np.array_equal(forced.mask, result.mask) and not forced.mode_detected


def test_blank_slide_gives_an_empty_mask_thanks_to_the_lower_bound():
    rng = np.random.default_rng(3)
    rgb = np.clip(240 + rng.normal(0, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    result = tissue.detect_tissue(rgb, TissueSettings(min_threshold=8), mask_mpp=8.0)
    assert result.tissue_fraction == 0.0
    assert result.otsu_threshold is not None and result.threshold >= 8


def test_unscanned_pixels_are_never_tissue():
    rgb, truth = _brightfield_scene()
    scanned = np.ones(truth.shape, bool)
    scanned[:, :150] = False
    result = tissue.detect_tissue(rgb, TissueSettings(), mask_mpp=8.0, scanned=scanned)
    assert not result.mask[:, :150].any() and result.mask[100, 200]


def test_closing_bridges_gaps_up_to_its_radius_and_keeps_edges():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 0:20] = True
    mask[10:30, 24:60] = True  # a 4 px gap, touching the right edge
    closed = tissue.closing(mask, 3)
    assert closed[20, 20:24].all()
    assert closed[10:30, 59].all()  # not eroded at the image edge
    assert not closed[0:5].any()


def test_closing_is_the_same_by_direct_morphology_and_by_distance_transforms():
    rng = np.random.default_rng(8)
    mask = rng.random((120, 150)) > 0.75
    radius = 5
    direct = tissue.closing(mask, radius)
    pad = radius + 1
    padded = np.pad(mask, pad)
    from scipy import ndimage

    by_distance = (
        ndimage.distance_transform_edt(ndimage.distance_transform_edt(~padded) <= radius) > radius
    )
    assert np.array_equal(direct, by_distance[pad:-pad, pad:-pad])


def test_both_closings_give_one_tissue_mask_on_a_real_slide(monkeypatch):
    import openslide

    slide = openslide.OpenSlide(str(REPO / "tests" / "fixtures" / "wsi" / "CMU-1-Small-Region.svs"))
    rgb = np.asarray(slide.get_thumbnail((554, 740)).convert("RGB"))  # about 2 um/px
    settings = TissueSettings(closing_um=16.0, min_object_um2=2000.0)  # radius 8 px
    by_footprint = tissue.detect_tissue(rgb, settings, mask_mpp=2.0).mask
    monkeypatch.setattr(tissue, "DIRECT_CLOSING_MAX_RADIUS", 0)
    by_distance = tissue.detect_tissue(rgb, settings, mask_mpp=2.0).mask
    assert np.array_equal(by_footprint, by_distance)
    assert 0.2 < by_footprint.mean() < 0.6


def test_remove_small_objects_counts_8_connected_pixels():
    mask = np.zeros((20, 20), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # diagonal: one 3-pixel object
    mask[10:14, 10:14] = True  # 16 pixels
    kept = tissue.remove_small_objects(mask, 4)
    assert not kept[1:4, 1:4].any() and kept[10:14, 10:14].all()
    assert tissue.remove_small_objects(mask, 3)[2, 2]
    # a fractional size (microns squared over pixel area) keeps only what reaches it
    assert not tissue.remove_small_objects(mask, 3.5)[2, 2]
    assert tissue.remove_small_objects(mask, 16.0)[10, 10]
    assert not tissue.remove_small_objects(mask, 16.01)[10, 10]


def test_saturation_matches_the_hsv_definition():
    rgb = np.array([[[255, 0, 0], [200, 100, 100], [0, 0, 0], [128, 128, 128]]], np.uint8)
    assert tissue.saturation(rgb).tolist() == [[255, 128, 0, 0]]


# --- grid -------------------------------------------------------------------------------


def test_grid_tiles_lie_inside_the_slide_and_follow_the_stride():
    g = grid.make_grid(1000, 700, 2.0, 2.0, size=100, step=50)
    assert g.width_l0 == 200.0
    assert g.xs.tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800]
    assert (g.ys + g.height_l0 <= 700).all() and len(g.ys) == 6


def test_grid_with_fractional_scale_has_integer_origins_close_to_exact():
    g = grid.make_grid(10000, 300, 1.002004, 1.002004, size=256, step=256)
    exact = np.arange(len(g.xs)) * 256 * 1.002004
    assert np.abs(g.xs - exact).max() <= 0.5
    assert (g.xs + g.width_l0 <= 10000 + 1e-6).all()


def test_mask_coverage_is_the_exact_overlapping_area():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # mask pixel = 10 x 10 level-0 pixels
    g = grid.Grid(np.array([0, 5]), np.array([0, 5]), 10.0, 10.0, size=10, step=5)
    coverage = grid.mask_coverage(mask, g, 10.0, 10.0)
    assert coverage == pytest.approx(np.array([[1.0, 0.5], [0.5, 0.25]]))


def test_mask_coverage_agrees_with_brute_force_on_a_random_mask():
    rng = np.random.default_rng(4)
    mask = rng.random((30, 40)) > 0.6
    dx = dy = 7.3
    g = grid.make_grid(int(40 * dx), int(30 * dy), 1.7, 1.7, size=16, step=11)
    coverage = grid.mask_coverage(mask, g, dx, dy)
    upsampled = np.repeat(np.repeat(mask, 10, 0), 10, 1)  # 0.73 level-0 px per cell
    cell = dx / 10
    for r in (0, 3, len(g.ys) - 1):
        for c in (0, 5, len(g.xs) - 1):
            x0, y0 = g.xs[c] / cell, g.ys[r] / cell
            x1, y1 = x0 + g.width_l0 / cell, y0 + g.height_l0 / cell
            brute = upsampled[round(y0) : round(y1), round(x0) : round(x1)].mean()
            assert coverage[r, c] == pytest.approx(brute, abs=0.06)


def test_blocks_are_rectangles_that_partition_the_selection():
    rng = np.random.default_rng(5)
    selected = rng.random((13, 17)) > 0.4
    selected[0:8, 8:16] = True  # one full cell: a single block
    blocks = grid.make_blocks(selected, 4)
    rows = np.concatenate([b.rows for b in blocks])
    cols = np.concatenate([b.cols for b in blocks])
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert sorted(pairs) == sorted(zip(*np.nonzero(selected), strict=True))
    assert len(set(pairs)) == len(pairs)  # each selected tile in exactly one block
    for block in blocks:
        assert len({(r // 4, c // 4) for r, c in zip(block.rows, block.cols, strict=True)}) == 1
        height = block.rows.max() - block.rows.min() + 1
        width = block.cols.max() - block.cols.min() + 1
        assert height * width == len(block.rows)  # a full rectangle: reads only selected tiles
    assert any(len(b.rows) == 16 and b.rows.min() == 0 and b.cols.min() == 8 for b in blocks)
    assert len(blocks) < selected.sum() / 2
    assert [(b.rows.tolist(), b.cols.tolist()) for b in grid.make_blocks(selected, 4)] == [
        (b.rows.tolist(), b.cols.tolist()) for b in blocks
    ]


def test_block_side_shrinks_to_bound_the_read():
    assert grid.block_side_for_read_limit(8, 256, 256, 1.0, 4096) == 8
    assert grid.block_side_for_read_limit(8, 256, 256, 3.9, 4096) == 4
    assert grid.block_side_for_read_limit(8, 4096, 4096, 3.9, 4096) == 1


# --- qc ---------------------------------------------------------------------------------


def test_laplacian_variance_of_flat_and_of_a_checkerboard():
    assert qc.laplacian_stats(np.full((32, 32), 77, np.uint8))[0] == 0.0
    board = ((np.indices((32, 32)).sum(0) % 2) * 100).astype(np.uint8)
    # interior Laplacian is +-400 everywhere (4*0 - 4*100 or 4*100 - 0), mean ~0
    assert qc.laplacian_stats(board)[0] == pytest.approx(400.0**2, rel=1e-3)


def test_blur_score_drops_when_a_tile_is_blurred():
    from scipy import ndimage

    rng = np.random.default_rng(6)
    sharp = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    blurred = ndimage.uniform_filter(sharp, size=(5, 5, 1))
    a = qc.tile_scores(sharp, "brightfield", 20)
    b = qc.tile_scores(blurred, "brightfield", 20)
    assert b.blur < a.blur / 10


def test_background_and_tissue_fractions():
    tile = np.zeros((64, 64, 3), np.uint8)
    tile[:, :16] = 250  # white glass: a quarter
    tile[:, 16:32] = 5  # black: a quarter
    tile[:, 32:] = (200, 100, 160)  # saturated tissue: half
    scores = qc.tile_scores(tile, "brightfield", 40)
    assert scores.white_fraction == pytest.approx(0.25)
    assert scores.black_fraction == pytest.approx(0.25)
    assert scores.background_fraction == pytest.approx(0.5)
    assert scores.tissue_fraction == pytest.approx(0.5)
    rgba = np.dstack([tile, np.full((64, 64), 255, np.uint8)])
    assert qc.tile_scores(rgba, "brightfield", 40) == scores


def test_rejection_reason_checks_filters_in_order():
    scores = qc.TileScores(0.1, 0.9, 0.9, 0.0, 5.0)
    assert qc.rejection_reason(scores, FilterSettings()) is None
    assert (
        qc.rejection_reason(scores, FilterSettings(max_background=0.5, min_blur=10))
        == "max_background"
    )
    assert qc.rejection_reason(scores, FilterSettings(min_blur=10)) == "min_blur"
    assert (
        qc.rejection_reason(scores, FilterSettings(min_tissue_fraction=0.2))
        == "min_tissue_fraction"
    )


# --- writers ----------------------------------------------------------------------------


def test_tar_shards_are_deterministic_and_webdataset_style(tmp_path):
    data = [(f"k{i}", bytes([i]) * (100 + i)) for i in range(5)]
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        container = writers.TarShardContainer(tmp_path / run, max_members=2)
        places, offsets = [], []
        for key, payload in data:
            places.append(container.add(key, payload, "jpg"))
            offsets.append(container.last_offset)
        container.close()
    assert container.files == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in container.files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert places[2] == ("pixels/shard-000001.tar", "k2.jpg")
    # byte for byte what the standard library writes for the same members
    reference = tmp_path / "reference.tar"
    with tarfile.open(reference, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, payload in data[2:4]:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    assert (tmp_path / "a" / "shard-000001.tar").read_bytes() == reference.read_bytes()
    with tarfile.open(tmp_path / "a" / "shard-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["k2.jpg", "k3.jpg"]
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
        assert tar.extractfile("k3.jpg").read() == data[3][1]
        # the recorded offset is where the member's data starts: one ranged read gets it
        assert offsets[3] == tar.getmember("k3.jpg").offset_data
    raw = (tmp_path / "a" / "shard-000001.tar").read_bytes()
    assert raw[offsets[3] : offsets[3] + len(data[3][1])] == data[3][1]


def test_tile_keys_have_no_dots():
    key = writers.tile_key("TCGA.01 a/b", 12, 345)
    assert "." not in key and "/" not in key and key.endswith("_x0000012_y0000345")


def test_jpeg_from_rgbx_view_equals_jpeg_from_rgb():
    from PIL import Image

    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 255, (64, 96, 4), dtype=np.uint8)
    view = rgba[:, 16:80]
    a = writers.encode_tile(view, "jpeg", 90)
    b = writers.encode_tile(np.ascontiguousarray(view[..., :3]), "jpeg", 90)
    assert a == b
    assert Image.open(io.BytesIO(a)).size == (64, 64)
    png = writers.encode_tile(view, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), view[..., :3])


def test_table_has_the_declared_schema_even_when_empty(tmp_path):
    import pyarrow.parquet as pq

    columns = {name: [] for name in writers.TABLE_COLUMNS}
    writers.write_table(columns, tmp_path / "t.parquet")
    schema = pq.read_schema(tmp_path / "t.parquet")
    assert schema.names == list(writers.TABLE_COLUMNS)


# --- memory -----------------------------------------------------------------------------


def test_memory_estimates_grow_with_what_they_depend_on():
    one = memory.estimate_tile_mem_mb(1, 256, 8, level_ratio=1)
    two = memory.estimate_tile_mem_mb(2, 256, 8, level_ratio=1)
    four = memory.estimate_tile_mem_mb(4, 256, 8, level_ratio=1)
    assert one < two < four
    assert memory.estimate_tile_mem_mb(2, 256, 8, level_ratio=1) < memory.estimate_tile_mem_mb(
        2, 256, 8
    )
    small = memory.estimate_preprocess_mem_mb((20000, 20000), 0.5)
    large = memory.estimate_preprocess_mem_mb((100000, 60000), 0.25)
    assert small < large <= memory.estimate_preprocess_mem_mb()
    # the worst case stays bounded whatever the tile settings
    assert memory.estimate_tile_mem_mb(2, 4096, 64) < 2000
    assert math.isfinite(memory.estimate_preprocess_mem_mb(workers=4))
