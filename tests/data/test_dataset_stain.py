"""The stain columns of the dataset index and stain normalisation and augmentation in the
loader, on real slides (an H&E and a fluorescence one) tiled by the steps, and the MONAI
datalist of the index."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pandas as pd
import pytest
from dataset_support import write_cohort
from wsi_support import CMU, DAPI, preprocess, tile

from medprep.common import atomic
from medprep.data import index as dataset
from medprep.data import open_dataset
from medprep.data.reader import decode_image
from medprep.wsi import stain


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A destination holding CMU-1 (H&E) and the DAPI NDPI (fluorescence), tiled as the
    workflow publishes them (same names), and their dataset index."""
    destination = tmp_path_factory.mktemp("published")
    entries = []
    for sample, slide in (("cmu", CMU), ("dapi", DAPI)):
        folder = destination / "wsi" / sample
        preprocess(folder, slide)
        tile(folder, size=128, format="png")
        entries.append(
            dataset.SampleEntry(
                sample, "wsi", str(folder / "tile.json"), str(folder / "preprocess.json")
            )
        )
    out = destination / "dataset" / "run"
    atomic.write_json(out / "manifest.json", dataset.build(entries, out))
    return destination


def raw_tile(destination, row) -> np.ndarray:
    data = (destination / row["file"]).read_bytes()
    return decode_image(data[row["offset"] : row["offset"] + row["nbytes"]], row["member"])


def he_image(vectors: stain.StainVectors, side: int = 200) -> np.ndarray:
    """An image stained with ``vectors``: random H and E amounts up to their strengths."""
    rng = np.random.default_rng(0)
    share = rng.beta(0.5, 0.5, side * side)
    amount = rng.uniform(0.0, 1.0, side * side)
    concentrations = np.column_stack([share * amount, (1 - share) * amount])
    od = (concentrations * vectors.max_concentrations) @ vectors.matrix.T
    return np.clip(stain.IO * np.exp(-od), 0, 255).astype(np.uint8).reshape(side, side, 3)


def recorded(destination, sample) -> stain.StainVectors:
    summary = atomic.read_json(destination / "wsi" / sample / "preprocess" / "summary.json")
    return stain.StainVectors.from_dict(summary["stain"])


def test_samples_table_carries_the_recorded_stain_vectors(published):
    samples = pd.read_parquet(published / "dataset/run/samples.parquet").set_index("sample")
    vectors = recorded(published, "cmu")
    cmu = samples.loc["cmu"]
    assert cmu["stain_status"] == "ok" and cmu["tiles_stain"] == "as_scanned"
    np.testing.assert_allclose(
        cmu[["stain_h_r", "stain_h_g", "stain_h_b"]].astype(float), vectors.h, rtol=1e-5
    )
    np.testing.assert_allclose(
        cmu[["stain_e_r", "stain_e_g", "stain_e_b"]].astype(float), vectors.e, rtol=1e-5
    )
    np.testing.assert_allclose([cmu["stain_max_h"], cmu["stain_max_e"]], vectors.max_concentrations)
    assert pd.isna(samples.loc["dapi", "stain_status"]) and pd.isna(
        samples.loc["dapi", "stain_h_r"]
    )
    assert open_dataset(published).stain_vectors("cmu") == vectors


def test_normalise_maps_each_tile_with_its_slides_vectors(published):
    ds = open_dataset(published, stain="normalise")
    plain = open_dataset(published)
    vectors = recorded(published, "cmu")
    cmu = ds.tiles.table.index[ds.tiles.table["sample"] == "cmu"]
    for i in cmu[:5]:
        pixels, row = ds.tiles[i]
        assert row["stain"] == "normalised"
        raw = raw_tile(published, row)
        np.testing.assert_array_equal(plain.tiles[i][0], raw)
        np.testing.assert_array_equal(pixels, stain.normalise(raw, vectors))
    # fluorescence tiles have no vectors: as written, and the row says so
    dapi = ds.tiles.table.index[ds.tiles.table["sample"] == "dapi"][0]
    pixels, row = ds.tiles[dapi]
    assert row["stain"] == "as_written"
    np.testing.assert_array_equal(pixels, raw_tile(published, row))


def test_stain_targets_a_sample_an_image_or_explicit_vectors(published):
    vectors = recorded(published, "cmu")
    index = int(np.flatnonzero(open_dataset(published).tiles.table["sample"] == "cmu")[0])
    raw = open_dataset(published).tiles[index][0]
    # to its own slide's stains: the tile projected on its stains' plane (Macenko's)
    itself = open_dataset(published, stain="normalise", stain_target="cmu").tiles[index][0]
    np.testing.assert_array_equal(itself, stain.normalise(raw, vectors, vectors))
    assert np.abs(itself.astype(int) - raw).mean() < 8
    explicit = open_dataset(published, stain="normalise", stain_target=vectors.as_dict())
    np.testing.assert_array_equal(explicit.tiles[index][0], itself)
    image = open_dataset(published, stain="normalise", stain_target=he_image(vectors))
    assert np.abs(image.tiles[index][0].astype(int) - itself).mean() < 6
    with pytest.raises(ValueError, match="no stain vectors"):
        open_dataset(published, stain="normalise", stain_target="dapi")
    with pytest.raises(ValueError, match="stain must be"):
        open_dataset(published, stain="normalize")


def test_augment_follows_the_seed_the_tile_and_the_epoch(published):
    ds = open_dataset(published, stain="augment", stain_seed=3)
    index = int(np.flatnonzero(ds.tiles.table["sample"] == "cmu")[0])
    first, row = ds.tiles[index]
    assert row["stain"] == "augmented"
    np.testing.assert_array_equal(ds.tiles[index][0], first)  # same seed, tile and epoch
    again = open_dataset(published, stain="augment", stain_seed=3)
    np.testing.assert_array_equal(again.tiles[index][0], first)  # another process alike
    ds.tiles.set_epoch(1)
    assert np.abs(ds.tiles[index][0].astype(int) - first).mean() > 0.5
    other = open_dataset(published, stain="augment", stain_seed=4).tiles[index][0]
    assert np.abs(other.astype(int) - first).mean() > 0.5
    # with no spread the tile stays as scanned
    still = open_dataset(published, stain="augment", stain_sigma=(0.0, 0.0)).tiles[index][0]
    raw = open_dataset(published).tiles[index][0]
    assert np.abs(still.astype(int) - raw).max() <= 2


# --- the MONAI datalist ---------------------------------------------------------------------


def test_the_datalist_lists_the_ct_samples_by_split_with_paths_beside_it(tmp_path):
    rows = [(f"CT{i}", "ct", f"P{i // 2}", str(i % 3)) for i in range(40)]
    rows += [(f"W{i}", "wsi", f"P{i}", "1") for i in range(5)]
    entries = write_cohort(tmp_path / "results", rows, tiles=5, patches=5)
    dataset.build(entries, tmp_path / "dataset" / "run")
    lists = json.loads((tmp_path / "dataset/run/datalist.json").read_text())
    assert list(lists) == ["training", "validation", "test"]
    samples = pd.read_parquet(tmp_path / "dataset/run/samples.parquet").set_index("sample")
    names = {"training": "train", "validation": "val", "test": "test"}
    for key, items in lists.items():
        assert {item["sample"] for item in items} == set(
            samples.index[(samples["modality"] == "ct") & (samples["split"] == names[key])]
        )
        for item in items:
            assert item["label"] == samples.loc[item["sample"], "label"]
            # published in the index's version folder, dataset/{run}/v-<hex>/
            publication = samples.loc[item["sample"], "publication"]
            assert item["image"] == f"../../../{publication}/preprocess/volume.nii.gz"
            resolved = posixpath.normpath(posixpath.join("dataset/run/v-0", item["image"]))
            assert resolved.startswith(f"ct/{item['sample']}")
    assert sum(len(items) for items in lists.values()) == 40
