"""Series choice (ranking, preferences, sheet selection, blank UIDs, jitter), free text kept
out of outputs, Enhanced CT frames and every transfer syntax."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from ct_support import CT_3SLICE, TEST_DATA, dicom_files

from medprep.common.errors import InputError
from medprep.ct import dicom_io, series
from medprep.ct import preprocess as pp
from medprep.ct.hu import ModalityTransform, Padding, to_hu
from medprep.ct.settings import SeriesSettings, ct_settings

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
BLANK_UIDS = TEST_DATA / "siemens-j2k-blank-uids"
SYNTAXES = TEST_DATA / "ge-chest-slice-transfer-syntaxes"
WG04 = TEST_DATA / "wg04-compressed"
DEFAULT_PREFS = ct_settings().series


def header(index, z, **kw):
    fields = dict(
        index=index,
        path=f"f{index}.dcm",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        series_uid="1.2.3",
        rows=4,
        cols=4,
        position=(0.0, 0.0, z),
        orientation=AXIAL,
        pixel_spacing=(0.7, 0.7),
        has_pixel_data=True,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    )
    fields.update(kw)
    return series.SliceHeader(**fields)


def stack(first, n, step=1.0, **kw):
    return [header(first + i, i * step, **kw) for i in range(n)]


# ---------- grouping ----------


def test_jitter_across_a_rounding_boundary_never_splits_a_series():
    # the old grouping rounded cosines to 3 and spacing to 4 decimals: these straddle both
    cosines = [(1.0, 0.0004999, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0005011, 0.0, 0.0, 1.0, 0.0)]
    spacings = [(0.70304999, 0.70304999), (0.70305001, 0.70305001)]
    headers = [
        header(i, float(i), orientation=cosines[i % 2], pixel_spacing=spacings[(i // 2) % 2])
        for i in range(8)
    ]
    (group,) = series.group_series(headers)
    assert group.unique_positions == 8


def test_different_orientations_or_spacings_stay_apart():
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9962, 0.0872)  # 5 degrees
    headers = stack(0, 3) + stack(10, 3, orientation=tilted) + stack(20, 3, pixel_spacing=(1, 1))
    assert len(series.group_series(headers)) == 3


def test_blank_uids_group_by_geometry_and_split_by_frame_of_reference():
    a = stack(0, 4, series_uid="", frame_of_reference_uid="1.9.1")
    b = stack(10, 3, series_uid="", frame_of_reference_uid="1.9.2")
    groups = series.group_series(a + b)
    assert sorted(g.unique_positions for g in groups) == [3, 4]
    assert all(g.uid_hash and not g.series_uid for g in groups)
    assert len({g.uid_hash for g in groups}) == 2


def test_real_series_with_blank_uids_loads_and_is_named_by_its_hash():
    paths = sorted(str(p) for p in BLANK_UIDS.iterdir())
    loaded = pp.load_series(paths)
    chosen = loaded.info["chosen"]
    assert loaded.volume.shape == (4, 512, 512) and chosen["series_uid_empty"]
    assert chosen["kernel"] == "Br38f\\3"
    again = pp.load_series(paths, series_uid=chosen["series_uid_hash"])
    assert "matched by UID hash" in again.info["chosen"]["reason"]


# ---------- ranking ----------


def test_sheet_series_uid_may_be_the_uid_its_hash_or_the_series_number():
    one = stack(0, 5, series_uid="1.2.3.4", series_number=2)
    two = stack(10, 3, series_uid="1.2.3.5", series_number=7)
    groups = series.group_series(one + two)
    for wanted, how in (("1.2.3.5", "UID"), (series.uid_hash("1.2.3.5"), "UID hash"),
                        ("7", "SeriesNumber")):  # fmt: skip
        selection = series.select_series(groups, wanted)
        assert selection.group.series_uid == "1.2.3.5"
        assert selection.reason == f"series_uid from the sample sheet (matched by {how})"
        assert selection.ranking[1]["reason"].startswith("not chosen: not the series named")
    with pytest.raises(InputError, match="UID hash or the SeriesNumber"):
        series.select_series(groups, "8")


def test_standard_kernel_beats_bone_of_equal_size_with_a_near_tie_warning():
    bone = stack(0, 140, series_uid="1.5.1", kernel="BONE", series_number=3)
    std = stack(200, 140, series_uid="1.5.2", kernel="STANDARD", series_number=2)
    groups = series.group_series(bone + std)
    selection = series.select_series(groups, preferences=DEFAULT_PREFS)
    assert selection.group.kernel == "STANDARD"
    assert [r["kernel"] for r in selection.ranking] == ["STANDARD", "BONE"]
    assert selection.ranking[1]["reason"] == (
        "not chosen: kernel BONE matches ct.series.avoid_kernels"
    )
    (warning,) = selection.warnings
    assert warning.startswith("near-tie between series")
    assert "SeriesNumber 3" in warning and series.uid_hash("1.5.1") in warning
    # without preferences the same pair is an exact tie: still chosen stably, and said so
    no_patterns = SeriesSettings(
        prefer_kernels=(), avoid_kernels=(), prefer_descriptions=(), avoid_descriptions=()
    )
    neutral = series.select_series(groups, preferences=no_patterns)
    assert "order by UID hash" in neutral.warnings[0]
    reversed_order = series.select_series(list(reversed(groups)), preferences=no_patterns)
    assert neutral.group is reversed_order.group


def test_thinnest_slices_win_then_most_slices_and_derived_reformats_go_last():
    thick = stack(0, 60, step=5.0, series_uid="1.6.1", slice_thickness=5.0)
    thin = stack(100, 240, step=1.25, series_uid="1.6.2", slice_thickness=1.25)
    mip = stack(400, 300, step=1.0, series_uid="1.6.3", slice_thickness=1.0,
                image_type=("DERIVED", "SECONDARY", "AXIAL"))  # fmt: skip
    selection = series.select_series(series.group_series(thick + thin + mip), None, DEFAULT_PREFS)
    assert selection.group.series_uid == "1.6.2"
    reasons = {r["series_uid_hash"]: r["reason"] for r in selection.ranking}
    assert reasons[series.uid_hash("1.6.1")] == (
        "not chosen: thicker slices (5 mm against 1.25 mm)"
    )
    assert reasons[series.uid_hash("1.6.3")].startswith("not chosen: derived image")
    thickest = SeriesSettings(slice_thickness="thickest")
    pick = series.select_series(series.group_series(thick + thin), None, thickest)
    assert pick.group.series_uid == "1.6.1"


def test_a_folder_of_single_slice_series_says_so():
    headers = [header(i, 0.0, series_uid=f"1.7.{i}") for i in range(10)]
    with pytest.raises(InputError, match="^10 series of one slice each: a single slice"):
        series.select_series(series.group_series(headers))


def two_kernel_folder(tmp_path):
    """The real 3-slice series twice: a BONE copy (SeriesNumber 3), a STANDARD one (2)."""
    folder = tmp_path / "study"
    folder.mkdir()
    for kernel, number in (("BONE", 3), ("STANDARD", 2)):
        for path in dicom_files(CT_3SLICE):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{number}"
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{number}"
            ds.SeriesNumber = number
            ds.ConvolutionKernel = kernel
            ds.SeriesDescription = "Doe^John chest " + kernel
            ds.save_as(folder / f"{kernel}-{path.name}")
    return folder


def test_ranking_is_recorded_and_free_text_is_published_only_with_identifiers(tmp_path):
    paths = sorted(str(p) for p in two_kernel_folder(tmp_path).iterdir())
    result = pp.preprocess(paths)
    metadata = result.metadata
    assert metadata["series"]["kernel"] == "STANDARD"
    ranking = metadata["series_ranking"]
    assert [(r["rank"], r["kernel"], r["chosen"]) for r in ranking] == [
        (1, "STANDARD", True),
        (2, "BONE", False),
    ]
    for entry in ranking:
        assert {"slices", "slice_thickness_mm", "kernel", "image_type", "reason"} <= set(entry)
    assert any(w.startswith("near-tie") for w in metadata["warnings"])
    published = json.dumps([metadata, result.summary])
    assert "Doe^John" not in published and "description" not in published
    assert metadata["series"]["series_number"] == 2
    by_number = pp.load_series(paths, series_uid="3")
    assert by_number.info["chosen"]["kernel"] == "BONE"
    with_ids = pp.load_series(paths, include_identifiers=True)
    assert with_ids.info["chosen"]["description"] == "Doe^John chest STANDARD"


# ---------- Enhanced CT and transfer syntaxes ----------


def decoded_hu(path) -> np.ndarray:
    h = dicom_io.read_header(0, str(path))
    transform = ModalityTransform.from_tags(h.rescale_slope, h.rescale_intercept, h.modality_lut)
    return to_hu(dicom_io.read_pixels(h), transform, Padding(h.padding_value)).hu


def test_enhanced_ct_is_read_frame_by_frame_from_its_functional_groups():
    path = WG04 / "eCT_Supplemental.dcm"
    loaded = pp.load_series([str(path)])
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    groups = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0]
    points = np.array([[float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]
                       for g in groups])  # fmt: skip
    positions = points @ loaded.geometry.normal  # along the slice normal (here -z)
    assert loaded.info["chosen"]["enhanced_ct_frames"] == 2
    np.testing.assert_allclose(loaded.geometry.positions, np.sort(positions))
    transform = shared.PixelValueTransformationSequence[0]
    order = np.argsort(positions)
    expected = frames[order] * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(loaded.volume, np.clip(expected, -1024, None))
    assert loaded.geometry.pixel_spacing == (0.388672, 0.388672)


def test_fragmented_multi_frame_jpeg_without_offset_table_loads():
    (path,) = SYNTAXES.glob("CT0012*")
    loaded = pp.load_series([str(path)], lossy_compression="accept")
    assert loaded.volume.shape == (2, 512, 512)
    assert any("lossy compression" in w for w in loaded.warnings)


UNDECODABLE = {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"}  # retired JPEG processes


@pytest.mark.parametrize(
    "path", sorted(SYNTAXES.glob("CTImage.dcm_*")), ids=lambda p: p.name.split("_")[-1]
)
def test_every_transfer_syntax_gives_the_reference_hu_or_one_clear_line(path):
    reference = decoded_hu(SYNTAXES / "CTImage.dcm").astype(int)
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if syntax in UNDECODABLE:
        with pytest.raises(InputError) as error:
            decoded_hu(path)
        line = str(error.value)
        assert "cannot decode transfer syntax" in line and syntax in line
        assert "dcmdjpeg" in line and "\n" not in line
        return
    header = dicom_io.read_header(0, str(path))
    difference = np.abs(decoded_hu(path).astype(int) - reference)
    if header.lossy:
        # lossy JPEG (8 and 12 bit with a rescale slope of 32 and 2, JPEG 2000, near-lossless
        # JPEG-LS): close to the reference, and flagged as lossy in the metadata
        assert np.percentile(difference, 99) <= 64 and difference.mean() < 20
    else:
        assert difference.max() == 0


@pytest.mark.parametrize("kind", ["J2KR", "JLSL", "JPLL", "RLE", "J2KI", "JLSN"])
def test_wg04_lossless_syntaxes_give_the_reference_bit_for_bit(kind):
    reference = decoded_hu(WG04 / "CT2_UNC")
    decoded = decoded_hu(WG04 / f"CT2_{kind}")
    if kind in ("J2KI", "JLSN"):  # lossy: flagged, not exact
        assert dicom_io.read_header(0, str(WG04 / f"CT2_{kind}")).lossy
        assert np.abs(decoded.astype(int) - reference).mean() < 20
    else:
        np.testing.assert_array_equal(decoded, reference)


def test_lossy_compression_is_refused_by_default_and_accepted_when_configured(tmp_path):
    # lossy CT cannot give the HU of the uncompressed file: one line, unless accepted
    (path,) = SYNTAXES.glob("CT0012*")
    with pytest.raises(InputError, match="lossy compression .*JPEG Extended") as error:
        pp.preprocess([str(path)], {})
    assert "ct.lossy_compression: accept" in str(error.value)
    assert "\n" not in str(error.value)
    accepted = pp.preprocess([str(path)], {"lossy_compression": "accept"})
    assert any("lossy compression" in w for w in accepted.summary["warnings"])
