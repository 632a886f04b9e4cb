"""TRIDENT/CLAM patch coordinates (tiles/{sample}_patches.h5) beside the tile table: the
same tiles in the same order, and attributes that make TRIDENT's and CLAM's readers read
each tile's own level-0 box."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from wsi_support import CMU, DAPI, TCGA_NO_MPP, finished_looking, preprocess, tile

from medprep.common import atomic
from medprep.wsi import patch_coords
from medprep.wsi.writers import read_table

TRIDENT_ATTRIBUTES = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "level0_width",
    "level0_height",
}
CLAM_ATTRIBUTES = {"patch_size", "patch_level", "downsample"}

CASES = {
    # name: slide, sample-sheet mpp, tile settings, (resampled?, level0 mpp)
    "native": (CMU, None, {"size": 128}, (False, 0.499)),  # 0.499 um/px tiled as 0.5
    "resampled": (DAPI, None, {"size": 128}, (True, 0.2282)),  # NDPI 0.228 -> 0.5
    # no mpp in its metadata: 0.25 from the sample sheet, its level 1 (2.0005x) is 0.5
    "mpp-override": (TCGA_NO_MPP, 0.25, {"size": 128, "stride": 96}, (False, 0.25)),
}


@pytest.fixture(scope="module", params=list(CASES))
def tiled(request, tmp_path_factory):
    slide, mpp, settings, expected = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / request.param
    preprocess(folder, slide, mpp_override=mpp)
    manifest = tile(folder, **settings)
    summary = atomic.read_json(folder / "preprocess" / "summary.json")
    return folder, summary, manifest, settings, expected


def test_coordinates_are_the_tile_table_in_its_order(tiled):
    folder, _, manifest, _, _ = tiled
    path = folder / "tiles" / f"{folder.name}_patches.h5"
    coords, attributes = patch_coords.read_patch_coords(path)
    table = read_table(folder / "tiles" / "tiles.parquet")
    assert len(table) == manifest["summary"]["tiles"] > 10
    assert coords.dtype == np.int64 and coords.shape == (len(table), 2)
    np.testing.assert_array_equal(coords, table[["x", "y"]].to_numpy())
    # published with the sample, written atomically
    names = {item["name"]: item["path"] for item in manifest["artifacts"]}
    assert names[f"tiles/{folder.name}_patches.h5"] == str(path)
    assert not [f for f in finished_looking(folder) if f.startswith("temporary")]


def test_attributes_read_back_with_h5py_as_trident_and_clam_write_them(tiled):
    folder, summary, _, settings, (resampled, level0_mpp) = tiled
    table = read_table(folder / "tiles" / "tiles.parquet")
    with h5py.File(folder / "tiles" / f"{folder.name}_patches.h5", "r") as f:
        assert list(f) == ["coords"]
        attributes = dict(f["coords"].attrs)
    assert set(attributes) >= TRIDENT_ATTRIBUTES | CLAM_ATTRIBUTES
    assert summary["resample"] is resampled
    assert attributes["patch_size"] == settings["size"]
    assert attributes["overlap"] == settings["size"] - settings.get("stride", settings["size"])
    assert attributes["name"] == folder.name
    assert [attributes["level0_width"], attributes["level0_height"]] == summary["dimensions"]
    assert attributes["target_magnification"] == pytest.approx(10 / summary["target_mpp"])
    assert attributes["level0_mpp"] == pytest.approx(level0_mpp, rel=1e-3)
    assert attributes["mpp"] == pytest.approx(table["mpp"].iloc[0])
    # CLAM: the level read and its downsample
    assert attributes["patch_level"] == table["level"].iloc[0] == summary["level"]
    np.testing.assert_allclose(attributes["downsample"], [summary["level_downsample"]] * 2)


def test_trident_reads_each_tiles_own_level0_box(tiled):
    folder, _, _, _, _ = tiled
    _, attributes = patch_coords.read_patch_coords(folder / "tiles" / f"{folder.name}_patches.h5")
    width_l0 = read_table(folder / "tiles" / "tiles.parquet")["width_l0"].iloc[0]
    # WSIPatcher: round(patch_size * level0_magnification / target_magnification)
    assert abs(patch_coords.level0_box(attributes) - width_l0) <= 0.01 * width_l0
    assert abs(attributes["patch_size_level0"] - width_l0) <= 0.01 * width_l0


def test_magnifications_for_an_aperio_scan_that_is_not_exactly_40x():
    # 0.2527 um/px tiled at 0.5 from 2 x 2 averaged level-0 pixels (0.5054 um/px)
    attributes = patch_coords.patch_attributes(
        name="S",
        size=256,
        step=256,
        scale_x=2.0,
        target_mpp=0.5,
        tile_mpp=0.5054,
        level0_mpp=0.2527,
        dimensions=(1000, 1000),
        level=0,
        level_downsample=1.0,
    )
    assert attributes["target_magnification"] == 20.0
    assert attributes["level0_magnification"] == 40.0
    assert patch_coords.level0_box(attributes) == 512 == attributes["patch_size_level0"]
    # TRIDENT's own mpp bucket (< 0.3: 40x) with a 20x target would read the same box here;
    # for a 0.2270 um/px scan resampled to 0.5 it would read 512, not the tile's 564
    resampled = dict(attributes, level0_magnification=20.0 * 0.5 / 0.2270)
    assert patch_coords.level0_box(resampled) == 564


def test_an_empty_tile_table_gives_an_empty_coordinate_set(tmp_path):
    path = tmp_path / "S_patches.h5"
    patch_coords.write_patch_coords(path, np.zeros(0), np.zeros(0), {"patch_size": 256})
    coords, attributes = patch_coords.read_patch_coords(path)
    assert coords.shape == (0, 2) and coords.dtype == np.int64 and attributes["patch_size"] == 256
