"""Shared fixtures: a tiny dataset built by the demo builder (real DICOM and real slides)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from workflow_support import write_config, write_samples

# The demo dataset, small: a 96 x 96 x 40 chest phantom at 4 mm / 5 mm, a 1536 px
# synthetic slide, plus the real CT series and the real slide from tests/data.
TINY_SAMPLES = [
    ("phantom-chest-01", "ct", "data/ct/phantom-chest-01"),
    ("real-dcmqi-3slice", "ct", "data/ct/real-dcmqi-3slice"),
    ("synthetic-01", "wsi", "data/wsi/synthetic-01.tiff"),
    ("CMU-1-Small-Region", "wsi", "data/wsi/CMU-1-Small-Region.svs"),
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from medprep import demo

    folder = tmp_path_factory.mktemp("tiny") / "data"
    demo.build(folder, phantom_shape=(96, 96, 40), phantom_spacing_mm=(4.0, 5.0), slide_size=1536)
    return folder


@pytest.fixture
def workdir(tmp_path, tiny_data) -> Path:
    """A fresh working directory with the tiny dataset, its sample sheet and a fast config."""
    shutil.copytree(tiny_data, tmp_path / "data")
    write_samples(tmp_path, TINY_SAMPLES)
    write_config(tmp_path)
    return tmp_path
