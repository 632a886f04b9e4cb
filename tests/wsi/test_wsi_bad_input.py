"""Bad slide inputs: each fails with one clear line naming the file and the cause, and
leaves nothing behind that looks like a result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wsi_support import (
    TCGA_NO_MPP,
    enormous_dimensions,
    finished_looking,
    png_renamed,
    preprocess,
    random_bytes,
    truncated_slide,
    zero_bytes,
)

from medprep.common.errors import InputError
from medprep.demo.synthetic_slide import write_pyramidal_tiff


def plain_tiff(folder: Path) -> Path:
    import tifffile

    path = folder / "plain.tif"
    tifffile.imwrite(path, np.zeros((300, 400, 3), np.uint8), photometric="rgb")
    return path


def enormous_physical_size(folder: Path) -> Path:
    """A plausible pixel count at 49 um/px: a 'slide' of 73 x 73 cm, whose tissue mask at
    8 um/px would need 8e9 pixels."""
    path = folder / "huge-pixels.svs"

    def render(d, x, y, w, h):
        return np.full((h, w, 3), 240, np.uint8)

    write_pyramidal_tiff(
        path, 15000, 15000, render, mpp=49.0, downsamples=(1,), tile_cache=lambda *_: "glass"
    )
    return path


def no_resolution(folder: Path) -> Path:
    return TCGA_NO_MPP


CASES = {
    "zero-byte file": (zero_bytes, "empty file (0 bytes)"),
    "truncated slide": (truncated_slide, "truncated"),
    "random bytes named .svs": (random_bytes, "not a whole-slide image format"),
    "PNG renamed to .svs": (png_renamed, "a PNG image, not a whole-slide image"),
    "plain TIFF": (plain_tiff, "not tiled"),
    "decompression bomb": (enormous_dimensions, "refusing to read it"),
    "no resolution metadata": (no_resolution, "sample sheet"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_slide_fails_with_one_clear_line_and_no_results(tmp_path, case):
    make, cause = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    slide = make(inputs)
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError) as caught:
        preprocess(folder, slide)
    message = str(caught.value)
    assert "\n" not in message
    assert f"file {slide}" in message and cause in message
    assert finished_looking(folder) == []


def test_enormous_physical_size_is_refused_before_building_a_mask(tmp_path):
    slide = enormous_physical_size(tmp_path)
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError, match="too large for a tissue mask") as caught:
        preprocess(folder, slide)
    assert str(slide) in str(caught.value)
    assert finished_looking(folder) == []


def test_a_folder_without_any_slide_fails_clearly(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = [random_bytes(inputs), png_renamed(inputs)]
    folder = tmp_path / "results" / "S"
    with pytest.raises(InputError, match="none of the sample's 2 files"):
        preprocess(folder, files)
    assert finished_looking(folder) == []
