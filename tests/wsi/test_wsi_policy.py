"""Resolution policy for real scanners and refusal of decompression bombs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wsi_support import (
    CMU,
    CPTAC_DICOM,
    DATA,
    finished_looking,
    hollow_slide,
    outputs,
    preprocess,
    small_synthetic_slide,
    tile,
)

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.wsi import guard, resolution
from medprep.wsi.settings import ResolutionSettings
from medprep.wsi.writers import read_table

# --- resolution policy ------------------------------------------------------------------

DEFAULT_TOLERANCE = ResolutionSettings().tolerance


@pytest.mark.parametrize(
    ("mpp", "target", "native_level"),
    [
        (0.2527, 0.25, 0),  # Aperio 40x: 1.1% off, read as it is
        (0.2527, 0.5, 1),  # its 2x level is 0.5054: 1.1% off
        (0.5027, 0.5, 0),  # Aperio 20x, 0.5% off (finer than the target: no upsampling)
        (0.499, 0.5, 0),  # the CMU slide
        (0.2500, 0.5, 1),  # exact
    ],
)
def test_scanner_resolutions_within_the_default_tolerance_are_read_natively(
    mpp, target, native_level
):
    plan = resolution.plan_read(
        (1, 2, 4, 8), resolution.Mpp(mpp, mpp, "metadata"), target, DEFAULT_TOLERANCE
    )
    assert (plan.level, plan.resample) == (native_level, False)
    achieved = plan.scale_x * mpp
    assert achieved == pytest.approx(mpp * (1, 2, 4, 8)[native_level])
    assert abs(achieved - target) / target <= DEFAULT_TOLERANCE


@pytest.mark.parametrize("mpp", [0.2425, 0.2270, 0.4540])
def test_scanner_resolutions_outside_the_tolerance_are_resampled_to_the_target(mpp):
    plan = resolution.plan_read(
        (1, 2, 4, 8), resolution.Mpp(mpp, mpp, "metadata"), 0.5, DEFAULT_TOLERANCE
    )
    assert plan.resample and plan.scale_x * mpp == pytest.approx(0.5)
    assert plan.scale_x >= 1  # downsampling from a finer level, never upsampling


def test_a_whole_averaging_of_a_level_within_the_tolerance_is_used_as_a_level():
    # Aperio 40x with levels 1, 4, 16: no level near 0.5 um/px, but 2 x 2 level-0 pixels
    # are 0.5054 um (1.1% off), as a scanner's own 20x level would be
    mpp = resolution.Mpp(0.2527, 0.2527, "metadata")
    plan = resolution.plan_read((1, 4, 16), mpp, 0.5, DEFAULT_TOLERANCE)
    assert plan.resample and (plan.level, plan.scale_x, plan.scale_y) == (0, 2.0, 2.0)
    # no tolerance: resampled to the target exactly
    exact = resolution.plan_read((1, 4, 16), mpp, 0.5, 0.0)
    assert exact.scale_x * 0.2527 == pytest.approx(0.5)
    # 0.2425 um/px: 2 x 2 pixels are 3% off, outside the tolerance
    off = resolution.plan_read((1, 4, 16), resolution.Mpp(0.2425, 0.2425, "x"), 0.5, 0.025)
    assert off.scale_x * 0.2425 == pytest.approx(0.5)


def test_upsampling_beyond_the_limit_is_refused_with_the_options():
    mpp = resolution.Mpp(16.78, 16.78, "metadata")
    plan = resolution.plan_read((1,), mpp, 0.5, DEFAULT_TOLERANCE)
    with pytest.raises(InputError) as caught:
        resolution.check_upsampling(plan, mpp, 0.5, max_upsample=1.0)
    message = str(caught.value)
    for part in (
        "0.5 um/px",
        "16.78 um/px",
        "33.6x",
        "wsi.resolution.mpp >= 16.78",
        "sample sheet's `mpp`",
        "raise wsi.resolution.max_upsample",
    ):
        assert part in message
    # allowed up to the limit
    near = resolution.Mpp(0.8, 0.8, "metadata")
    plan = resolution.plan_read((1,), near, 0.5, DEFAULT_TOLERANCE)
    resolution.check_upsampling(plan, near, 0.5, max_upsample=1.6)
    with pytest.raises(InputError, match="1.6x"):
        resolution.check_upsampling(plan, near, 0.5, max_upsample=1.5)


def test_real_dicom_wsi_coarser_than_the_target_fails_and_leaves_nothing(tmp_path):
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError) as caught:
        preprocess(folder, CPTAC_DICOM)
    message = str(caught.value)
    assert "\n" not in message and f"file {CPTAC_DICOM}" in message
    assert "15.82 um/px" in message and "target 0.5 um/px" in message
    assert finished_looking(folder) == []
    # a coarser target (the first option of the message) works, natively
    manifest = preprocess(tmp_path / "results" / "T", CPTAC_DICOM, resolution={"mpp": 16.0})
    assert manifest["summary"]["achieved_mpp"] == pytest.approx(15.821, abs=1e-3)


def test_synthetic_slide_at_coarse_mpp_is_refused_unless_the_limit_is_raised(tmp_path):
    slide = small_synthetic_slide(tmp_path / "coarse.svs", 1024, 768, mpp=2.0)
    with pytest.raises(InputError, match=r"upsampled 4x.*max_upsample = 1"):
        preprocess(tmp_path / "results" / "S", slide)
    assert finished_looking(tmp_path / "results" / "S") == []
    manifest = preprocess(tmp_path / "results" / "U", slide, resolution={"max_upsample": 4})
    assert manifest["summary"]["status"] == "ok"
    assert any("upsampled 4x" in w for w in manifest["summary"]["warnings"])


def test_native_level_and_real_mpp_recorded_per_slide_and_per_tile(tmp_path):
    folder = tmp_path / "results" / "CMU"
    manifest = preprocess(folder, CMU)  # 0.499 um/px, target 0.5
    summary = atomic.read_json(outputs(folder)["preprocess_summary"])
    assert summary["resample"] is False and summary["level"] == 0
    assert manifest["summary"]["achieved_mpp"] == pytest.approx(0.499, abs=1e-4)
    assert summary["target_mpp"] == 0.5
    tile(folder, container="coords")
    table = read_table(outputs(folder)["table"])
    assert len(table) > 10
    assert np.allclose(table["mpp"], 0.499, atol=1e-4) and np.all(table["target_mpp"] == 0.5)
    assert np.allclose(table["width_l0"], 256)  # 256 native pixels, not 256.5
    # tolerance 0 keeps the old behaviour: exact target, resampled
    exact = tmp_path / "results" / "EXACT"
    preprocess(exact, CMU, resolution={"tolerance": 0.0})
    assert atomic.read_json(outputs(exact)["preprocess_summary"])["resample"] is True


# --- decompression bombs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile_bytes", "cause"),
    [
        (b"", "holds no image data (its 38416 byte counts or offsets are all 0)"),
        (b"\xff\xd8", "(compression 1.57e+06:1, above wsi.limits.max_compression_ratio = 5000)"),
    ],
)
def test_slide_claiming_pixels_it_does_not_store_fails_in_seconds(tmp_path, tile_bytes, cause):
    slide = hollow_slide(tmp_path, tile_bytes)
    assert slide.stat().st_size < 500_000
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError) as caught:
        preprocess(folder, slide)
    message = str(caught.value)
    assert "\n" not in message and f"file {slide}" in message and cause in message
    assert "200000 x 200000" in message and "decompression bomb" in message
    assert finished_looking(folder) == []


def test_pixel_budget_is_configurable(tmp_path):
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError, match=r"2220 x 2967 pixels.*wsi.limits.max_pixels = 1e\+06"):
        preprocess(folder, CMU, limits={"max_pixels": 1e6})
    assert finished_looking(folder) == []


@pytest.mark.parametrize(
    "name",
    [
        "CMU-1-Small-Region.svs",
        "TCGA-CR-7395-01A-01-TS1-crop.svs",
        "test3-DAPI-2-387.ndpi",
        "openslide-tiny/boxes.tiff",
    ],
)
def test_real_slides_pass_the_bomb_checks(name):
    guard.check_tiff(DATA / name, guard.Limits())


# --- vendor cases -----------------------------------------------------------------------


def qpi_description(image_type: str, name: str | None) -> str:
    fields = f"<Name>{name}</Name>" if name else ""
    return (
        '<?xml version="1.0" encoding="utf-16"?>\n<PerkinElmer-QPI-ImageDescription>\n'
        f"<DescriptionVersion>2</DescriptionVersion><ImageType>{image_type}</ImageType>"
        f"<SlideID>PATIENT-NAME-HERE</SlideID>{fields}</PerkinElmer-QPI-ImageDescription>"
    )


def write_qptiff(path: Path) -> Path:
    """A small Vectra-style QPTIFF: 3 greyscale channel pages, then an RGB thumbnail."""
    import tifffile

    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tif:
        for name in ("DAPI", "FITC", "Cy3"):
            tif.write(
                rng.integers(0, 255, (480, 640), dtype=np.uint8),
                description=qpi_description("FullResolution", name),
                metadata=None,
            )
        tif.write(
            np.zeros((120, 160, 3), np.uint8),
            photometric="rgb",
            description=qpi_description("Thumbnail", None),
            metadata=None,
        )
    return path


def dicom_without_image_type(path: Path) -> Path:
    import pydicom

    dataset = pydicom.dcmread(DATA / "openslide-tiny" / "boxes_0.dcm")
    del dataset.ImageType
    dataset.save_as(path)
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            write_qptiff,
            "a multiplex immunofluorescence QPTIFF (Akoya/PerkinElmer Vectra) with 3 greyscale "
            "channel(s) (DAPI, FITC, Cy3) of 640 x 480 pixels",
        ),
        (
            dicom_without_image_type,
            "a DICOM whole-slide image of 16 x 16 pixels that has no ImageType",
        ),
    ],
)
def test_vendor_files_openslide_cannot_tile_are_named_with_what_to_do(tmp_path, make, expected):
    slide = make(tmp_path / ("slide.qptiff" if make is write_qptiff else "slide.dcm"))
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError) as caught:
        preprocess(folder, slide)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"file {slide}: {expected}")
    assert ("give that file instead" in message) or ("set ImageType" in message)
    assert "PATIENT" not in message
    assert finished_looking(folder) == []


def test_new_settings_defaults_match_the_schema_and_the_shipped_config():
    import yaml

    from medprep.common.settings import config_defaults

    wsi = config_defaults("wsi")
    assert guard.Limits.from_config(None) == guard.Limits.from_config(wsi["limits"])
    assert wsi["resolution"]["tolerance"] == DEFAULT_TOLERANCE == 0.025
    assert wsi["resolution"]["max_upsample"] == ResolutionSettings().max_upsample == 1.0
    shipped = yaml.safe_load((Path(__file__).parents[2] / "config.yaml").read_text())["wsi"]
    assert guard.Limits.from_config(shipped["limits"]) == guard.Limits()
    assert ResolutionSettings.from_config(shipped["resolution"]) == ResolutionSettings()
    with pytest.raises(ValueError, match="unknown key"):
        guard.Limits.from_config({"max_pixel": 1})
