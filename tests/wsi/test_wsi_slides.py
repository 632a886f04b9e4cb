"""The slide engine on real slides through real OpenSlide: resolution, tissue, tiling."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from wsi_support import (
    CMU,
    DAPI,
    TCGA_NO_MPP,
    TINY,
    measured_period,
    outputs,
    preprocess,
    small_synthetic_slide,
    tile,
    write_stripes_slide,
)

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.wsi import slide as slides
from medprep.wsi.preprocess import preprocess_slide
from medprep.wsi.settings import ResolutionSettings
from medprep.wsi.tissue import saturation


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return small_synthetic_slide(tmp_path_factory.mktemp("slides") / "synthetic.svs")


# --- reading and resolution -------------------------------------------------------------


def test_real_slides_are_described_with_their_resolution():
    cmu = slides.inspect_slide(CMU)
    assert (cmu.vendor, cmu.dimensions, cmu.mpp_x) == ("aperio", (2220, 2967), 0.499)
    dapi = slides.inspect_slide(DAPI)
    assert dapi.vendor == "hamamatsu" and dapi.level_count == 7
    assert dapi.mpp_x == pytest.approx(0.2282, abs=1e-4)


def test_synthetic_slide_opens_as_aperio_with_the_requested_mpp(tmp_path):
    path = small_synthetic_slide(tmp_path / "s.svs", 1200, 900, mpp=0.3)
    info = slides.inspect_slide(path)
    assert info.vendor == "aperio" and info.mpp_x == pytest.approx(0.3)
    assert info.dimensions == (1200, 900) and info.level_downsamples == (1.0, 4.0)
    generic = small_synthetic_slide(tmp_path / "g.tiff", 1200, 900, mpp=0.3, vendor="generic")
    g = slides.inspect_slide(generic)
    assert g.vendor == "generic-tiff" and g.mpp_x == pytest.approx(0.3)


def test_synthetic_slide_tissue_fraction_is_about_what_was_asked(tmp_path):
    path = small_synthetic_slide(tmp_path / "s.svs", 3072, 3072, tissue_fraction=1 / 3)
    handle = slides.open_slide(path)
    low = np.asarray(handle.read_region((0, 0), 1, handle.level_dimensions[1]))[..., :3]
    handle.close()
    # an independent measure: saturated pixels of the 4x-reduced level
    fraction = (saturation(low) > 30).mean()
    assert 0.2 < fraction < 0.45


def test_slide_without_mpp_fails_clearly_and_works_with_an_override():
    with pytest.raises(InputError) as caught:
        preprocess_slide(TCGA_NO_MPP)
    message = str(caught.value)
    assert str(TCGA_NO_MPP) in message and "sample sheet" in message
    result = preprocess_slide(TCGA_NO_MPP, mpp_override=0.25)
    assert result.summary["mpp_source"] == "sample_sheet" and result.summary["mpp"] == 0.25
    fallback = preprocess_slide(TCGA_NO_MPP, ResolutionSettings(mpp_fallback=0.25))
    assert fallback.summary["mpp_source"] == "config_fallback"
    assert any("mpp_fallback" in w for w in fallback.summary["warnings"])


def test_placeholder_tiff_resolution_fails_unless_overridden():
    with pytest.raises(InputError, match="plausible"):
        preprocess_slide(TINY / "boxes.tiff")
    assert preprocess_slide(TINY / "boxes.tiff", mpp_override=0.5).summary["mpp"] == 0.5


def test_dicom_wsi_opens_through_whichever_file_of_the_series():
    chosen = slides.pick_slide_file([TINY / "boxes_1.dcm", TINY / "boxes_0.dcm"])
    assert chosen.suffix == ".dcm"
    assert slides.inspect_slide(chosen).vendor == "dicom"


# --- tissue on real slides --------------------------------------------------------------


def test_brightfield_mask_on_cmu_agrees_with_a_plain_saturation_estimate():
    result = preprocess_slide(CMU)
    mask = result.mask
    assert result.summary["tissue_mode"] == "brightfield"
    assert mask.shape == result.thumbnail.shape[:2]
    # independent estimate: blocks of level 0 whose mean saturation is clearly above glass
    handle = slides.open_slide(CMU)
    rgb = np.asarray(handle.read_region((0, 0), 0, handle.dimensions))[..., :3]
    handle.close()
    dx, dy = result.summary["mask"]["downsample"]
    estimate = np.zeros_like(mask)
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            block = rgb[int(i * dy) : int((i + 1) * dy), int(j * dx) : int((j + 1) * dx)]
            if block.size:
                estimate[i, j] = saturation(block).mean() > 40
    iou = (mask & estimate).sum() / (mask | estimate).sum()
    assert iou > 0.75
    area = mask.sum() * (8.0**2) / 1e6
    assert result.summary["tissue_area_mm2"] == pytest.approx(area, rel=0.01)


def test_fluorescence_slide_is_detected_and_masked_sensibly():
    result = preprocess_slide(DAPI)
    assert result.summary["tissue_mode"] == "fluorescence"
    assert 0.1 < result.mask.mean() < 0.95
    # the thumbnail keeps the dark background of fluorescence, and is auto-contrasted so
    # the tissue is visible (its median was 29 of 255 before)
    assert np.median(result.thumbnail[~result.mask]) < 60
    assert np.median(result.thumbnail[result.mask]) > 70


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_low_resolution_image_does_not_depend_on_chunks_or_workers(monkeypatch, method):
    from medprep.wsi.preprocess import MaskGeometry, read_low_resolution
    from medprep.wsi.resolution import Mpp

    monkeypatch.setenv("MEDPREP_START_METHOD", method)
    info = slides.inspect_slide(CMU)
    geometry = MaskGeometry.for_slide(info, Mpp(0.499, 0.499, "metadata"), 5.0)
    whole = read_low_resolution(info, geometry)  # one read
    inline = read_low_resolution(info, geometry, 1, max_read_side=300)  # 8 x 11 chunks
    pooled = read_low_resolution(info, geometry, 2, max_read_side=300)
    assert np.array_equal(inline, pooled)
    assert np.abs(inline.astype(int) - whole).max() <= 1
    # and it is the slide reduced by area averaging: compare a 10 x 10 px patch
    handle = slides.open_slide(CMU)
    dx = geometry.downsample_x
    level0 = np.asarray(handle.read_region((0, 0), 0, (int(40 * dx), int(40 * dx))))[..., :3]
    handle.close()
    i, j = 30, 20
    patch = level0[int(i * dx) : int((i + 1) * dx), int(j * dx) : int((j + 1) * dx)]
    assert np.abs(patch.reshape(-1, 3).mean(0) - whole[i, j, :3]).max() < 6


# --- tiling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target_mpp", "expected_level"),
    [(0.6, 0), (1.1, 1)],  # resampled from level 0, and from level 1 (downsample 4)
)
def test_tiles_come_out_at_the_requested_mpp_within_one_percent(
    tmp_path, target_mpp, expected_level
):
    slide_mpp, period_x, period_y = 0.25, 37.0, 53.0  # periods in level-0 pixels
    path = write_stripes_slide(
        tmp_path / "stripes.svs", 3000, 2600, mpp=slide_mpp, period_x=period_x, period_y=period_y
    )
    folder = tmp_path / "S"
    summary = preprocess(folder, path, resolution={"mpp": target_mpp})["summary"]
    assert summary["level"] == expected_level
    tile(folder, min_tissue=0.0, container="folder", format="png")
    table = pd.read_parquet(outputs(folder)["table"])
    assert len(table) >= 4
    for row in table.iloc[:: max(1, len(table) // 4)].itertuples():
        pixels = np.asarray(Image.open(folder / "tiles" / row.file)).astype(float)
        assert pixels.shape == (256, 256, 3)
        mpp_x = slide_mpp * period_x / measured_period(pixels[..., 0].mean(axis=0))
        mpp_y = slide_mpp * period_y / measured_period(pixels[..., 2].mean(axis=1))
        assert mpp_x == pytest.approx(target_mpp, rel=0.01)
        assert mpp_y == pytest.approx(target_mpp, rel=0.01)
        assert row.target_mpp == target_mpp and row.level == expected_level


def test_tile_pixels_match_the_slide_at_native_resolution(tmp_path, synthetic):
    folder = tmp_path / "S"
    preprocess(folder, synthetic, resolution={"mpp": 0.5})
    tile(folder, container="folder", format="png")
    table = pd.read_parquet(outputs(folder)["table"])
    handle = slides.open_slide(synthetic)
    for row in table.head(3).itertuples():
        region = np.asarray(handle.read_region((int(row.x), int(row.y)), 0, (256, 256)))[..., :3]
        assert np.array_equal(np.asarray(Image.open(folder / "tiles" / row.file)), region)
    handle.close()


def test_counts_agree_between_summary_manifest_table_and_shards(tmp_path, synthetic):
    folder = tmp_path / "S"
    preprocess(folder, synthetic)
    manifest = tile(folder, shard_max_tiles=7)
    out = outputs(folder)
    table = pd.read_parquet(out["table"])
    summary = atomic.read_json(out["tile_summary"])
    assert manifest["summary"]["tiles"] == summary["tiles"] == len(table) > 7
    assert summary["candidates"] == len(table) + sum(summary["rejected"].values())
    assert summary["read_calls"] < summary["candidates"] / 4
    shards = sorted(out["pixels"].iterdir())
    assert [p.name for p in shards] == sorted(set(table["file"].str.split("/").str[-1]))
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members += [(f"pixels/{shard.name}", m) for m in tar.getnames()]
    assert members == list(zip(table["file"], table["member"], strict=True))
    assert {a["name"] for a in manifest["artifacts"]} >= {
        f"tiles/pixels/{p.name}" for p in shards
    } | {"tiles/tiles.parquet", "tiles/overlay.png", "tiles/summary.json"}
    first = table.iloc[0]
    with tarfile.open(folder / "tiles" / first.file) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(first.member).read()))
        assert image.format == "JPEG" and image.size == (256, 256)
    assert table["tissue_fraction"].between(0, 1).all() and (table["blur"] >= 0).all()
    overlay = Image.open(out["overlay"])
    assert overlay.size[0] >= Image.open(out["thumbnail"]).size[0]


def test_tiling_logs_its_progress_in_tiles(tmp_path, synthetic, caplog):
    folder = tmp_path / "S"
    preprocess(folder, synthetic)
    with caplog.at_level("INFO", logger="medprep.common.progress"):
        summary = tile(folder, container="coords")["summary"]
    lines = [r.getMessage() for r in caplog.records if r.name == "medprep.common.progress"]
    candidates = summary["candidates"]
    assert lines and lines[-1].startswith(f"tiles {candidates:,}/{candidates:,} (100%), ")
    assert lines[-1].endswith(" tiles/s")


def test_coordinates_only_writes_no_pixels(tmp_path, synthetic):
    folder = tmp_path / "S"
    preprocess(folder, synthetic)
    manifest = tile(folder, container="coords")
    table = pd.read_parquet(outputs(folder)["table"])
    assert len(table) == manifest["summary"]["tiles"] > 0
    assert table["file"].isna().all() and table["member"].isna().all()
    assert list(outputs(folder)["pixels"].iterdir()) == []
    assert not [a for a in manifest["artifacts"] if a["name"].startswith("tiles/pixels/")]


def test_qc_filters_reject_and_count_by_reason(tmp_path, synthetic):
    folder = tmp_path / "S"
    preprocess(folder, synthetic)
    everything = tile(folder, min_tissue=0.0, container="coords")["summary"]
    filtered = tile(folder, min_tissue=0.0, container="coords", filters={"max_background": 0.5})[
        "summary"
    ]
    assert filtered["candidates"] == everything["candidates"]
    assert filtered["rejected"]["max_background"] > 0
    assert filtered["tiles"] + filtered["rejected"]["max_background"] == everything["tiles"]
    table = pd.read_parquet(outputs(folder)["table"])
    assert (table["background_fraction"] <= 0.5).all()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_output_is_identical_for_one_and_two_workers(tmp_path, synthetic, monkeypatch, method):
    monkeypatch.setenv("MEDPREP_START_METHOD", method)
    results = {}
    for workers in (1, 2):
        folder = tmp_path / str(workers) / "S"
        preprocess(folder, synthetic, threads=workers)
        tile(folder, threads=workers, block_tiles=2, shard_max_tiles=9)
        out = outputs(folder)
        table = pd.read_parquet(out["table"])
        results[workers] = (
            out["mask"].read_bytes(),
            out["thumbnail"].read_bytes(),
            table.to_dict("list"),
            {p.name: p.read_bytes() for p in sorted(out["pixels"].iterdir())},
            out["overlay"].read_bytes(),
            json.loads(out["tile_summary"].read_text())["tiles"],
        )
    assert results[1] == results[2]
    assert len(results[1][3]) > 1  # several shards were compared


def test_no_tissue_gives_empty_outputs_with_a_status_not_an_error(tmp_path):
    folder = tmp_path / "S"
    manifest = preprocess(folder, TINY / "small.svs")
    assert manifest["summary"]["status"] == "no_tissue" and manifest["summary"]["warnings"]
    tiled = tile(folder)
    assert tiled["summary"]["status"] == "no_tiles" and tiled["summary"]["tiles"] == 0
    assert len(pd.read_parquet(outputs(folder)["table"])) == 0


def test_damaged_tiles_are_named_by_level_and_position_and_can_be_tolerated(tmp_path):
    path = small_synthetic_slide(tmp_path / "damaged.svs", 2048, 2048, tissue_fraction=0.9)
    folder = tmp_path / "S"
    preprocess(folder, path)
    # damage the file after preprocessing: part of level 0's tile data is overwritten
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 3)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as caught:
        tile(folder, block_tiles=2)
    message = str(caught.value)
    assert str(path) in message and re.search(r"level 0 tile at column \d+, row \d+", message)
    assert "max_read_errors = 0" in message
    assert not outputs(folder)["tile_manifest"].exists()
    assert not outputs(folder)["pixels"].exists()
    tolerant = tile(folder, block_tiles=2, max_read_errors=1000)["summary"]
    assert tolerant["rejected"]["read_error"] > 0 and tolerant["tiles"] > 0
    summary = json.loads(outputs(folder)["tile_summary"].read_text())
    assert summary["read_errors"] == len(tolerant["warnings"]) > 1
    assert all(re.search(r"level 0 tile at column \d+, row \d+", w) for w in tolerant["warnings"])


def test_resampled_tiles_do_not_depend_on_how_tiles_are_grouped_into_reads(tmp_path, synthetic):
    pixels = {}
    for block_tiles in (1, 8):
        folder = tmp_path / str(block_tiles) / "S"
        preprocess(folder, synthetic, resolution={"mpp": 0.8})
        summary = tile(
            folder, container="folder", format="png", block_tiles=block_tiles, min_tissue=0.0
        )
        assert summary["summary"]["read_calls"] < summary["summary"]["tiles"] or block_tiles == 1
        table = pd.read_parquet(outputs(folder)["table"])
        pixels[block_tiles] = {
            row.file: np.asarray(Image.open(folder / "tiles" / row.file)).astype(int)
            for row in table.itertuples()
        }
    assert pixels[1].keys() == pixels[8].keys() and len(pixels[1]) > 4
    for name, image in pixels[1].items():
        assert np.abs(image - pixels[8][name]).max() <= 1, name
