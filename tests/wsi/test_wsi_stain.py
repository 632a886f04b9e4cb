"""Stain vectors: Macenko's maths on plain arrays, the per-slide estimate of preprocess on
real slides (H&E and fluorescence), and tiles written normalised (wsi.tile.stain)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from wsi_support import (
    CMU,
    DAPI,
    TINY,
    finished_looking,
    preprocess,
    restained,
    slide_pixels,
    tile,
    write_single_level,
)

from medprep.common import atomic
from medprep.wsi import stain
from medprep.wsi.writers import read_table

# a second H&E, as another lab's (Ruifrok and Johnston's colour-deconvolution vectors)
OTHER = stain.StainVectors(h=(0.65, 0.70, 0.29), e=(0.07, 0.99, 0.11), max_h=1.4, max_e=1.6)


def angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    cosine = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    return math.degrees(math.acos(min(1.0, cosine)))


def mixed_concentrations(vectors: stain.StainVectors, n: int, seed: int = 0) -> np.ndarray:
    """N x 2 random concentrations of the two stains (each pixel mostly one of them)."""
    rng = np.random.default_rng(seed)
    share = rng.beta(0.5, 0.5, n)
    amount = rng.uniform(0.2, 1.0, n)
    return np.column_stack([share * amount * vectors.max_h, (1 - share) * amount * vectors.max_e])


def mixed_pixels(vectors: stain.StainVectors, n: int, seed: int = 0, noise: float = 0.01):
    """OD pixels of ``mixed_concentrations``, with a little noise."""
    concentrations = mixed_concentrations(vectors, n, seed)
    noise_od = np.random.default_rng(seed + 1).normal(0, noise, (n, 3))
    return concentrations @ vectors.matrix.T + noise_od


def to_rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(stain.IO * np.exp(-od), 0, 255).astype(np.uint8)


# --- maths on arrays ---------------------------------------------------------------------


def test_the_estimate_recovers_known_stain_vectors():
    for vectors in (stain.REFERENCE, OTHER):
        estimate = stain.estimate(mixed_pixels(vectors, 50_000))
        assert estimate.reason is None and estimate.pixels > 10_000
        # within 3 degrees: OTHER's eosin absorbs little red, so pure eosin pixels fall
        # under BETA on red and the estimate leans a little towards the mixed ones
        assert angle(estimate.vectors.h, vectors.h) < 3.0
        assert angle(estimate.vectors.e, vectors.e) < 3.0
        strengths = np.percentile(mixed_concentrations(vectors, 50_000), 99, axis=0)
        np.testing.assert_allclose(estimate.vectors.max_concentrations, strengths, rtol=0.1)


def test_degenerate_estimates_give_the_reason_and_no_vectors():
    one_stain = stain.StainVectors(stain.REFERENCE.h, stain.REFERENCE.h, 1.9, 1.9)
    estimate = stain.estimate(mixed_pixels(one_stain, 50_000))
    assert estimate.vectors is None and estimate.reason.startswith("one stain")
    few = stain.estimate(mixed_pixels(stain.REFERENCE, 300))
    assert few.vectors is None and "too little stained tissue" in few.reason
    glass = stain.estimate_rgb(np.full((100, 100, 3), 235, np.uint8))
    assert glass.vectors is None and glass.pixels == 0
    record = glass.summary(regions=0)
    assert record["status"] == "degenerate" and record["reason"] and "h" not in record


def test_normalising_maps_one_staining_onto_the_target_staining():
    rng = np.random.default_rng(1)
    concentrations = rng.uniform(0, 1, (64 * 64, 2))
    image_other = to_rgb(concentrations * OTHER.max_concentrations @ OTHER.matrix.T)
    image_reference = to_rgb(
        concentrations * stain.REFERENCE.max_concentrations @ stain.REFERENCE.matrix.T
    )
    normalised = stain.normalise(image_other.reshape(64, 64, 3), OTHER)
    difference = np.abs(normalised.astype(int) - image_reference.reshape(64, 64, 3))
    assert difference.mean() < 1.0 and difference.max() <= 4  # uint8 rounding of the input


def test_augmenting_is_one_matrix_on_the_slide_vectors_and_follows_the_seed():
    image = to_rgb(mixed_pixels(stain.REFERENCE, 64 * 64, noise=0)).reshape(64, 64, 3)
    first = stain.augment(image, stain.REFERENCE, np.random.default_rng(5))
    again = stain.augment(image, stain.REFERENCE, np.random.default_rng(5))
    other = stain.augment(image, stain.REFERENCE, np.random.default_rng(6))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 1.0
    # scale 1 and shift 0 leave the tile as it was (up to the uint8 round trip)
    matrix, offset = stain.augmentation_matrix(stain.REFERENCE, np.ones(2), np.zeros(2))
    same = stain.apply_od_matrix(image, matrix, offset)
    assert np.abs(same.astype(int) - image).max() <= 2
    # doubling haematoxylin only: the eosin concentrations stay where they were
    matrix, offset = stain.augmentation_matrix(stain.REFERENCE, np.array([2.0, 1.0]), np.zeros(2))
    od = stain.optical_density(image).reshape(-1, 3)
    before = od @ np.linalg.pinv(stain.REFERENCE.matrix).T
    after = (od @ matrix.T) @ np.linalg.pinv(stain.REFERENCE.matrix).T
    np.testing.assert_allclose(after[:, 0], 2 * before[:, 0], atol=1e-4)
    np.testing.assert_allclose(after[:, 1], before[:, 1], atol=1e-4)


def test_vectors_round_trip_through_their_record_and_bad_ones_are_refused():
    record = stain.estimate(mixed_pixels(OTHER, 20_000)).summary(regions=1)
    vectors = stain.StainVectors.from_dict(record)
    assert angle(vectors.h, OTHER.h) < 2 and record["angle_deg"] == pytest.approx(
        vectors.angle_deg, abs=1e-3
    )
    with pytest.raises(ValueError, match="positive"):
        stain.StainVectors.from_dict({"h": [1, 0, 0], "e": [0, 1, 0], "max_concentrations": [1, 0]})
    with pytest.raises(ValueError, match="finite"):
        stain.StainVectors.from_dict({"h": [0, 0, 0], "e": [0, 1, 0], "max_concentrations": [1, 1]})


# --- real slides ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stainings(tmp_path_factory):
    """CMU-1 as scanned and restained with Ruifrok's H&E (``wsi_support.restained``),
    each preprocessed and tiled."""
    folder = tmp_path_factory.mktemp("stainings")
    image = slide_pixels(CMU)
    write_single_level(folder / "original.tiff", image, 0.499)
    restained_image = restained(image, stain.estimate_rgb(image).vectors)
    write_single_level(folder / "restained.tiff", restained_image, 0.499)
    out = {}
    for name in ("original", "restained"):
        sample = folder / "wsi" / name
        summary = preprocess(sample, folder / f"{name}.tiff")["summary"]
        tile(sample, size=256, format="png")
        out[name] = (sample, summary)
    return out


def test_preprocess_records_the_stain_vectors_of_a_real_h_and_e_slide(tmp_path):
    manifest = preprocess(tmp_path / "cmu", CMU)
    record = manifest["summary"]["stain"]
    assert record == atomic.read_json(tmp_path / "cmu/preprocess/summary.json")["stain"]
    assert record["status"] == "ok" and record["reason"] is None
    assert record["regions"] == 32 and record["mpp"] == pytest.approx(0.499)
    vectors = stain.StainVectors.from_dict(record)
    # haematoxylin absorbs red more than eosin; eosin is mostly green absorption
    assert vectors.h[0] > vectors.e[0] and np.argmax(vectors.e) == 1
    assert 20 < vectors.angle_deg < 60 and min(vectors.max_concentrations) > 1.0
    # the estimate is the slide's: all its tissue pixels give vectors within a few degrees
    from PIL import Image

    image = slide_pixels(CMU)
    mask = Image.open(tmp_path / "cmu/preprocess/mask.png")
    tissue = np.asarray(mask.resize(image.shape[1::-1], Image.Resampling.NEAREST)) > 127
    whole = stain.estimate_rgb(image[tissue]).vectors
    assert angle(vectors.h, whole.h) < 4 and angle(vectors.e, whole.e) < 4
    np.testing.assert_allclose(vectors.max_concentrations, whole.max_concentrations, rtol=0.15)


def test_a_fluorescence_slide_gets_no_vectors_and_no_error(tmp_path):
    manifest = preprocess(tmp_path / "dapi", DAPI)
    assert manifest["summary"]["tissue_mode"] == "fluorescence"
    assert manifest["summary"]["status"] == "ok" and manifest["summary"]["stain"] is None
    tiled = tile(tmp_path / "dapi", size=128, stain="normalise")
    assert tiled["summary"]["stain"] == "as_scanned" and not tiled["summary"]["warnings"]


def test_a_slide_without_tissue_records_why_it_has_no_vectors(tmp_path):
    manifest = preprocess(tmp_path / "tiny", TINY / "small.svs")
    record = manifest["summary"]["stain"]
    assert record["status"] == "degenerate" and record["reason"] == "no tissue"
    assert "h" not in record and manifest["summary"]["status"] == "no_tissue"


def tiles_by_origin(sample) -> dict[tuple[int, int], np.ndarray]:
    from medprep.data.reader import decode_image

    table = read_table(sample / "tiles" / "tiles.parquet")
    out = {}
    for row in table.itertuples():
        data = (sample / "tiles" / row.file).read_bytes()[row.offset : row.offset + row.nbytes]
        out[(row.x, row.y)] = decode_image(data, row.member).astype(np.int16)
    return out


def test_normalised_tiles_of_two_stainings_are_at_least_twice_closer(two_stainings):
    (original, first), (restained, second) = two_stainings.values()
    a, b = (
        stain.StainVectors.from_dict(first["stain"]),
        stain.StainVectors.from_dict(second["stain"]),
    )
    # the stainings differ, and the estimates see it
    assert max(angle(a.h, b.h), angle(a.e, b.e)) > 10
    raw_a, raw_b = tiles_by_origin(original), tiles_by_origin(restained)
    common = sorted(set(raw_a) & set(raw_b))
    assert len(common) >= 20
    raw = np.mean([np.abs(raw_a[k] - raw_b[k]).mean() for k in common])
    normalised = np.mean(
        [
            np.abs(
                stain.normalise(raw_a[k].astype(np.uint8), a).astype(np.int16)
                - stain.normalise(raw_b[k].astype(np.uint8), b)
            ).mean()
            for k in common
        ]
    )
    assert normalised * 2 <= raw, (raw, normalised)


def test_tiles_written_normalised_are_the_normalised_tiles(two_stainings, tmp_path):
    original, summary = two_stainings["original"]
    raw = tiles_by_origin(original)
    scores = read_table(original / "tiles" / "tiles.parquet")
    try:
        tiled = tile(original, size=256, format="png", stain="normalise")
        assert tiled["summary"]["stain"] == "normalised"
        baked = tiles_by_origin(original)
        vectors = stain.StainVectors.from_dict(summary["stain"])
        assert baked.keys() == raw.keys()
        for key in list(raw)[:10]:
            expected = stain.normalise(raw[key].astype(np.uint8), vectors)
            np.testing.assert_array_equal(baked[key], expected)
        # the QC scores are those of the tiles as scanned
        again = read_table(original / "tiles" / "tiles.parquet")
        for name in ("tissue_fraction", "blur", "sharpness"):
            np.testing.assert_array_equal(again[name], scores[name])
        assert not [f for f in finished_looking(original) if f.startswith("temporary")]
    finally:
        tile(original, size=256, format="png")  # as scanned again, for the other tests
