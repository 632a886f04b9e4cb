"""Loading real DICOM: encodings, preambles, series selection and the bad-input matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from ct_support import (
    COMPRESSED_SYNTAXES,
    CT_3SLICE,
    CT_DUPLICATES,
    CT_SINGLE,
    CT_TILT,
    compressed_copy,
    copy_folder,
    dicom_files,
    edited_copy,
    mixed_series_folder,
    truncated_copy,
    without_preamble,
)

from medprep.common.errors import InputError
from medprep.ct import dicom_io, lung
from medprep.ct import preprocess as pp
from medprep.ct.hu import ModalityTransform, Padding, to_hu


def files(folder):
    return [str(p) for p in dicom_files(folder)]


def reference_hu(folder):
    """HU straight from pydicom (pixel_array, slope, intercept), sorted by z, no padding."""
    slices = [pydicom.dcmread(p) for p in dicom_files(folder)]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices]
    )


@pytest.fixture(scope="module")
def three_slice():
    return pp.load_series(files(CT_3SLICE))


def test_short_real_series_loads_in_position_order_with_hu(three_slice):
    expected = reference_hu(CT_3SLICE)
    padding = expected < -1024  # the stored -2000 of this series
    np.testing.assert_array_equal(three_slice.volume[~padding], expected[~padding])
    assert (three_slice.volume[padding] == -1000).all()
    # SliceThickness says 1.25 mm; the positions are 1.0 mm apart
    np.testing.assert_allclose(three_slice.geometry.steps, 1.0, atol=1e-6)
    assert three_slice.info["chosen"]["slices"] == 3


@pytest.mark.parametrize("syntax", sorted(COMPRESSED_SYNTAXES))
def test_compressed_copies_give_the_same_hu_volume(tmp_path, three_slice, syntax):
    folder = compressed_copy(CT_3SLICE, tmp_path / syntax, syntax)
    loaded = pp.load_series(files(folder), threads=2)
    assert loaded.info["chosen"]["transfer_syntaxes"] == [COMPRESSED_SYNTAXES[syntax]]
    np.testing.assert_array_equal(loaded.volume, three_slice.volume)


@pytest.mark.parametrize("keep_file_meta", [True, False])
def test_files_without_preamble_are_read(tmp_path, three_slice, keep_file_meta):
    for path in dicom_files(CT_3SLICE):
        without_preamble(path, tmp_path / path.name, keep_file_meta=keep_file_meta)
    loaded = pp.load_series(files(tmp_path))
    np.testing.assert_array_equal(loaded.volume, three_slice.volume)
    assert loaded.info["chosen"]["files_without_preamble"] == 3


@pytest.mark.parametrize("folder", [CT_3SLICE, CT_TILT, CT_DUPLICATES, CT_SINGLE])
def test_direct_native_reading_equals_pydicom_decoding(folder):
    for path in dicom_files(folder):
        header = dicom_io.read_header(0, str(path))
        assert header.pixel_data_offset is not None
        np.testing.assert_array_equal(
            dicom_io.read_pixels(header), pydicom.dcmread(path).pixel_array
        )


def test_duplicates_are_removed_and_gaps_warned():
    loaded = pp.load_series(files(CT_DUPLICATES))
    assert len(loaded.geometry.slices) == 3
    assert [d["instance_number"] for d in loaded.info["duplicates"]] == [21]
    np.testing.assert_allclose(loaded.geometry.steps, [32.5, 47.5])
    assert any("duplicate" in w for w in loaded.warnings)
    assert any("uneven slice spacing" in w for w in loaded.warnings)
    # PixelPaddingValue stored as 63536 with signed pixels is -2000
    assert loaded.geometry.slices[0].padding_value == -2000
    # stored -1024 outside the field of view (-2048 HU) is undeclared: raised to -1024
    assert loaded.volume.min() == -1024
    assert any("below -1024 HU" in w for w in loaded.warnings)


@pytest.mark.parametrize("change", ["spacing", "matrix"])
def test_a_slice_left_out_for_another_geometry_is_named_beside_the_gap(tmp_path, change):
    from ct_support import SLAB

    folder = copy_folder(SLAB, tmp_path / "slab")
    victim = sorted(folder.iterdir())[4]
    ds = pydicom.dcmread(victim)
    if change == "spacing":
        ds.PixelSpacing = [0.8, 0.8]
        why = "pixel spacing [0.8, 0.8] mm, not [0.703125, 0.703125]"
    else:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::2, ::2]).tobytes()
        ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2
        why = "256 x 256 pixels, not 512 x 512"
    ds.save_as(victim, enforce_file_format=True)
    loaded = pp.load_series(files(folder))
    assert victim not in {Path(h.path) for h in loaded.geometry.slices}
    assert any("wider than 1.5x the median step" in w for w in loaded.warnings)
    assert f"1 file(s) of the chosen series left out of the volume ({why}): {victim.name}" in (
        loaded.warnings
    )


def test_real_gantry_tilt_is_detected_and_corrected_in_patient_space(tmp_path):
    loaded = pp.load_series(files(CT_TILT))
    geometry = loaded.geometry
    tag = {h.gantry_tilt_deg for h in geometry.slices}
    assert tag == {18.5}
    assert geometry.tilt_deg == pytest.approx(18.5, abs=0.1)  # from positions, not the tag
    np.testing.assert_allclose(geometry.steps, [12.0, 16.0, 1.08, 7.0], atol=0.02)
    with pytest.raises(InputError, match=r"gantry tilt \(18.5 degrees\)"):
        pp.load_series(files(CT_TILT), gantry_tilt="fail")

    result = pp.preprocess(files(CT_TILT), {"spacing": [1.0, 0.976, 0.976]})
    from medprep.ct.nifti import LPS_TO_RAS

    to_voxel = np.linalg.inv(LPS_TO_RAS @ result.affine_ras)
    rng = np.random.default_rng(0)
    checked = 0
    for path in dicom_files(CT_TILT):
        ds = pydicom.dcmread(path)
        image = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row = np.array(ds.ImageOrientationPatient[:3], float)
        col = np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in rng.integers(40, 470, size=(400, 2)):
            patch = image[r - 2 : r + 3, c - 2 : c + 3]
            if patch.std() > 8 or patch.mean() < -500:
                continue  # homogeneous tissue only: interpolation cannot move its value
            point = np.array(ds.ImagePositionPatient, float) + c * dc * row + r * dr * col
            x, y, z, _ = np.rint(to_voxel @ np.append(point, 1.0)).astype(int)
            assert abs(int(result.hu[z, y, x]) - image[r, c]) < 40
            checked += 1
    assert checked > 200


def test_head_ct_has_the_no_lungs_status():
    result = pp.preprocess(files(CT_TILT), {"spacing": [2.0, 2.0, 2.0]})
    assert result.status == "no_lungs"
    assert result.summary["lung_volume_ml"] == 0 and not result.mask.any()
    assert result.metadata["lung"]["components"][0]["volume_ml"] > 0  # sinus air was found
    assert any("no lungs found" in w for w in result.summary["warnings"])


def test_real_chest_slices_give_two_lungs():
    for path in dicom_files(CT_SINGLE):
        header = dicom_io.read_header(0, str(path))
        transform = ModalityTransform.from_tags(header.rescale_slope, header.rescale_intercept)
        hu = to_hu(dicom_io.read_pixels(header), transform, Padding(header.padding_value)).hu
        spacing = (2.5, *header.pixel_spacing)
        result = lung.lung_mask(hu[None], spacing, lung.LungSettings(no_lungs_below_ml=1))
        kept = [c for c in result.components if c["kept"]]
        assert result.status == "ok" and len(kept) == 2
        mask = result.mask[0].astype(bool)
        # the Toshiba slice is mostly consolidated (COVID-19): less aerated lung
        area_cm2 = [c["volume_ml"] / 0.25 for c in kept]
        assert all(a > 10 for a in area_cm2), area_cm2
        assert hu[mask].mean() < -450  # aerated or ground-glass lung, not soft tissue
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


# ---------- the bad-input matrix: one clear InputError line, or a documented outcome ----------


def test_mr_series_is_rejected(tmp_path):
    for path in dicom_files(CT_3SLICE):
        edited_copy(
            path, tmp_path / path.name, Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4"
        )
    with pytest.raises(InputError) as error:
        pp.load_series(files(tmp_path))
    line = str(error.value)
    assert "no usable CT series among 3 file(s): 3 modality MR (not CT)" in line
    assert str(tmp_path) in line and "\n" not in line


def test_slice_without_pixel_data_fails_naming_the_file(tmp_path):
    folder = copy_folder(CT_3SLICE, tmp_path / "s")
    broken = folder / "02.dcm"
    edited_copy(broken, broken, PixelData=None)
    with pytest.raises(InputError, match="no pixel data") as error:
        pp.load_series(files(folder))
    assert error.value.path == str(broken)


@pytest.mark.parametrize("keep_bytes", [300_000, 2_000, 1_400])
def test_truncated_file_fails_naming_the_file(tmp_path, keep_bytes):
    folder = copy_folder(CT_3SLICE, tmp_path / "s")
    broken = folder / "03.dcm"
    truncated_copy(CT_3SLICE / "03.dcm", broken, keep_bytes)
    with pytest.raises(InputError) as error:
        pp.preprocess(files(folder))
    assert error.value.path == str(broken)
    cause = {
        300_000: "truncated file: pixel data shorter",  # cut in the pixel data
        2_000: "no pixel data",  # cut just before it
        1_400: "missing ImagePositionPatient",  # cut in the header, after the series UID
    }[keep_bytes]
    assert cause in error.value.cause


def test_file_cut_before_its_series_uid_is_skipped_with_a_warning(tmp_path):
    # documented fallback: a file that cannot be attributed to a series is listed as not
    # used; the rest of the series loads (here the cut file held the last slice)
    folder = copy_folder(CT_3SLICE, tmp_path / "s")
    truncated_copy(CT_3SLICE / "03.dcm", folder / "03.dcm", 1_000)
    loaded = pp.load_series(files(folder))
    assert len(loaded.geometry.slices) == 2
    assert loaded.info["rejected_files"][0]["reason"].startswith("missing SeriesInstanceUID")
    assert any("1 file(s) not used" in w for w in loaded.warnings)


def test_mixed_folder_picks_the_largest_series_and_records_the_rest(tmp_path):
    folder, other_uid = mixed_series_folder(tmp_path / "mixed")
    paths = files(folder) + [str(folder / "README.txt")]
    loaded = pp.load_series(paths)
    assert loaded.info["chosen"]["slices"] == 3
    assert "largest axial CT series (3 slices of 2 axial series)" in loaded.info["chosen"]["reason"]
    assert [o["slices"] for o in loaded.info["other_series"]] == [2]
    reasons = sorted(r["reason"] for r in loaded.info["rejected_files"])
    assert reasons == ["localizer", "not DICOM", "not DICOM"]
    chosen = pp.load_series(paths, series_uid=other_uid)
    assert chosen.info["chosen"]["slices"] == 2
    assert chosen.info["chosen"]["reason"] == "series_uid from the sample sheet (matched by UID)"


def test_single_slice_series_fail_clearly():
    with pytest.raises(InputError, match="2 series of one slice each: a single slice") as error:
        pp.load_series(files(CT_SINGLE))
    assert error.value.path == str(CT_SINGLE)


def test_no_files_fail_clearly():
    with pytest.raises(InputError, match="no input files"):
        pp.load_series([])
