"""Numbers that enter CT geometry or HU are checked: a bad value fails the sample
with one line naming the file, the tag and the value; metadata is strict JSON."""

from __future__ import annotations

import json
import math

import pydicom
import pytest
from ct_support import CT_3SLICE, copy_folder, dicom_files

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.ct import preprocess as pp


def edited_series(tmp_path, keyword, value, which=("02.dcm",)):
    """The real 3-slice series with ``keyword`` set to ``value`` (raw DS text) in ``which``."""
    folder = copy_folder(CT_3SLICE, tmp_path / "series")
    for path in dicom_files(folder):
        if path.name in which:
            ds = pydicom.dcmread(path)
            # raw text, as a damaged or hostile file holds it (pydicom would refuse inf/nan)
            ds[keyword].value = value
            with pydicom.config.disable_value_validation():
                ds.save_as(path)
    return folder


CASES = [
    ("RescaleSlope", "NaN", "invalid RescaleSlope nan"),
    ("RescaleSlope", "0", "invalid RescaleSlope 0"),
    ("RescaleSlope", "1e300", "invalid RescaleSlope 1e+300"),
    ("ImagePositionPatient", ["1e300", "0", "0"], "invalid ImagePositionPatient [1e+300, 0, 0]"),
    ("RescaleIntercept", "inf", "invalid RescaleIntercept inf"),
    ("PixelSpacing", ["inf", "0.8"], "invalid PixelSpacing [inf, 0.8]"),
    ("PixelSpacing", ["0", "0.8"], "invalid PixelSpacing [0, 0.8]"),
    ("PixelSpacing", ["-0.8", "-0.8"], "invalid PixelSpacing [-0.8, -0.8]"),
    ("PixelSpacing", ["nan", "0.8"], "invalid PixelSpacing [nan, 0.8]"),
    ("ImageOrientationPatient", ["0"] * 6, "invalid ImageOrientationPatient [0, 0, 0, 0, 0, 0]"),
    (
        "ImageOrientationPatient",
        ["1", "0", "0", "0", "inf", "0"],
        "invalid ImageOrientationPatient [1, 0, 0, 0, inf, 0]",
    ),
    (
        "ImageOrientationPatient",
        ["nan", "0", "0", "0", "1", "0"],
        "invalid ImageOrientationPatient [nan, 0, 0, 0, 1, 0]",
    ),
    (
        "ImageOrientationPatient",
        ["1", "0", "0", "0.5", "1", "0"],
        "invalid ImageOrientationPatient [1, 0, 0, 0.5, 1, 0]",
    ),
    ("ImagePositionPatient", ["-165", "nan", "-100"], "invalid ImagePositionPatient [-165, nan"),
    ("SliceThickness", "-1.25", "invalid SliceThickness -1.25"),
]


@pytest.mark.parametrize("keyword, value, message", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_a_bad_number_in_one_file_fails_naming_file_tag_and_value(
    tmp_path, keyword, value, message
):
    folder = edited_series(tmp_path, keyword, value)
    with pytest.raises(InputError) as error:
        pp.load_series([str(p) for p in dicom_files(folder)])
    assert error.value.path == str(folder / "02.dcm")
    line = str(error.value)
    assert message in line and "\n" not in line
    assert "single slice" not in line


def test_a_bad_number_in_every_file_fails_the_same_way(tmp_path):
    names = [p.name for p in dicom_files(CT_3SLICE)]
    folder = edited_series(tmp_path, "PixelSpacing", ["nan", "nan"], which=names)
    with pytest.raises(InputError, match=r"invalid PixelSpacing \[nan, nan\]: not finite") as e:
        pp.load_series([str(p) for p in dicom_files(folder)])
    assert e.value.path in {str(folder / n) for n in names}


def test_orientation_jitter_is_tolerated_not_refused(tmp_path):
    # writers round cosines: a unit vector stored with 5 digits is still orthonormal enough
    folder = edited_series(
        tmp_path, "ImageOrientationPatient", ["0.99999", "0.00001", "0", "-0.00001", "1", "0"]
    )
    loaded = pp.load_series([str(p) for p in dicom_files(folder)])
    assert len(loaded.geometry.slices) == 3


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_writer_refuses_nan_and_infinity(tmp_path):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            atomic.write_json(tmp_path / "x.json", {"value": bad})
        assert not (tmp_path / "x.json").exists()
    atomic.write_json(tmp_path / "x.json", {"value": None})
    assert _strict((tmp_path / "x.json").read_text()) == {"value": None}


def test_metadata_of_a_real_series_is_strict_json(tmp_path):
    result = pp.preprocess([str(p) for p in dicom_files(CT_3SLICE)])
    atomic.write_json(tmp_path / "metadata.json", result.metadata)
    _strict((tmp_path / "metadata.json").read_text())
