"""CT engine maths on plain data: series sorting, HU, resampling, lung mask, patches, NIfTI."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from medprep.common.errors import InputError
from medprep.ct import hu, lung, memory, nifti, patches, resample, series
from medprep.ct.settings import CtSettings

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def header(index, z, *, orientation=AXIAL, x=0.0, y=0.0, instance=None, **kw):
    fields = dict(
        index=index,
        path=f"f{index}.dcm",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        series_uid=kw.pop("series_uid", "1.2.3"),
        rows=kw.pop("rows", 4),
        cols=kw.pop("cols", 4),
        position=(x, y, z),
        orientation=orientation,
        pixel_spacing=(0.5, 0.5),
        instance_number=instance,
        has_pixel_data=True,
    )
    fields.update(kw)
    return series.SliceHeader(**fields)


def group_of(headers):
    (group,) = series.group_series(headers)
    return group


# ---------- series: sorting, duplicates, spacing, tilt, selection ----------


def test_slices_sort_by_position_on_the_normal_not_instance_number_or_integer_z():
    # 0.4 mm slices: integer z would tie them; instance numbers run backwards and shuffled
    zs = [10.0, 10.4, 10.8, 11.2, 11.6]
    instances = [3, 5, 1, 4, 2]
    order = [4, 0, 3, 1, 2]
    headers = [header(i, zs[k], instance=instances[k]) for i, k in enumerate(order)]
    geometry = series.stack_geometry(group_of(headers))
    assert [h.position[2] for h in geometry.slices] == zs
    np.testing.assert_allclose(geometry.steps, 0.4)
    assert geometry.warnings == ()
    assert not geometry.sheared


def test_oblique_series_sorts_along_its_normal():
    # rows along x, columns tilted 30 degrees in y-z: normal = (0, -sin30, cos30)
    a = math.radians(30)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))
    normal = np.array([0.0, -math.sin(a), math.cos(a)])
    distances = [0.0, 2.0, 4.0, 6.0]
    headers = [
        series.SliceHeader(
            index=i,
            path=f"{i}",
            modality="CT",
            series_uid="9",
            rows=4,
            cols=4,
            position=tuple(normal * d),
            orientation=orientation,
            pixel_spacing=(1.0, 1.0),
            has_pixel_data=True,
        )
        for i, d in zip([2, 0, 3, 1], distances, strict=True)
    ]
    geometry = series.stack_geometry(group_of(headers))
    np.testing.assert_allclose(geometry.positions - geometry.positions[0], distances, atol=1e-9)
    assert not geometry.sheared


def test_duplicates_are_dropped_and_recorded():
    headers = [header(0, 0.0, instance=1), header(1, 2.5, instance=2), header(2, 2.5, instance=7)]
    geometry = series.stack_geometry(group_of(headers))
    assert [h.index for h in geometry.slices] == [0, 1]
    assert [h.index for h in geometry.duplicates] == [2]
    assert any("duplicate" in w for w in geometry.warnings)


def test_uneven_spacing_and_gaps_are_warned():
    zs = [0.0, 1.0, 2.0, 5.0, 6.0]
    geometry = series.stack_geometry(group_of([header(i, z) for i, z in enumerate(zs)]))
    np.testing.assert_allclose(geometry.steps, [1, 1, 3, 1])
    text = " ".join(geometry.warnings)
    assert "uneven slice spacing 1.00-3.00 mm" in text
    assert "1 step(s) wider" in text and "3.00 mm after slice 3 of 5" in text


def test_gantry_tilt_is_measured_from_the_shear():
    # tilted slices (normal 20 degrees from z) stacked along z by table movement
    tilt = math.radians(20)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    headers = [
        series.SliceHeader(
            index=i,
            path=str(i),
            modality="CT",
            series_uid="t",
            rows=4,
            cols=4,
            position=(0.0, 0.0, 5.0 * i),
            orientation=orientation,
            pixel_spacing=(0.5, 0.5),
            has_pixel_data=True,
        )
        for i in range(6)
    ]
    geometry = series.stack_geometry(group_of(headers))
    assert geometry.sheared
    assert geometry.tilt_deg == pytest.approx(20.0, abs=1e-6)
    np.testing.assert_allclose(geometry.steps, 5.0 * math.cos(tilt))
    # the shear is along the column direction only
    np.testing.assert_allclose(geometry.offsets[:, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.abs(geometry.offsets[-1, 1]), 25.0 * math.sin(tilt))


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"modality": "MR"}, "modality MR (not CT)"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "secondary capture"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.67", "modality": "SR"}, "dose report"),
        ({"sop_class_uid": "1.2.840.10008.1.3.10"}, "DICOMDIR"),
        ({"frames": 40}, "multi-frame"),
        ({"orientation": None}, "missing ImageOrientationPatient"),
        ({"samples_per_pixel": 3}, "not a greyscale image"),
    ],
)
def test_files_that_cannot_be_ct_slices_are_rejected_with_a_reason(changes, reason):
    assert series.rejection_reason(header(0, 0.0)) is None
    assert reason in series.rejection_reason(header(0, 0.0, **changes))


def test_selection_prefers_the_series_uid_else_the_largest_axial_series():
    big = [header(i, float(i), series_uid="big") for i in range(5)]
    small = [header(10 + i, float(i), series_uid="small") for i in range(3)]
    coronal = [
        header(20 + i, 0.0, y=float(i), series_uid="cor", orientation=(1, 0, 0, 0, 0, -1))
        for i in range(9)
    ]
    groups = series.group_series(big + small + coronal)
    chosen = series.select_series(groups)
    assert chosen.group.series_uid == "big" and "largest axial" in chosen.reason
    assert {g.series_uid for g in chosen.others} == {"small", "cor"}
    assert series.select_series(groups, "small").group.series_uid == "small"
    assert series.select_series(groups, "cor").group.series_uid == "cor"
    with pytest.raises(InputError, match="not among the CT series"):
        series.select_series(groups, "absent")
    with pytest.raises(InputError, match="no axial CT series"):
        series.select_series(series.group_series(coronal))


# ---------- HU ----------


def test_rescale_matches_pydicom_modality_lut():
    ds = Dataset()
    ds.RescaleSlope = 0.5
    ds.RescaleIntercept = -1024
    stored = np.array([[0, 1, 2047, 4095]], dtype=np.uint16)
    transform = hu.ModalityTransform.from_tags(0.5, -1024)
    np.testing.assert_allclose(transform.apply(stored), apply_modality_lut(stored, ds))
    result = hu.to_hu(stored, transform, hu.Padding())
    np.testing.assert_array_equal(result.hu, np.rint(apply_modality_lut(stored, ds)).clip(-1024))


def test_modality_lut_sequence_matches_pydicom():
    ds = Dataset()
    item = Dataset()
    item.LUTDescriptor = [4, 10, 16]
    item.LUTData = [100, 200, 300, 400]
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = [item]
    ds.PixelRepresentation = 0
    ds.BitsStored = 16
    stored = np.array([[0, 10, 11, 12, 13, 50]], dtype=np.uint16)
    transform = hu.ModalityTransform.from_tags(None, None, ((100, 200, 300, 400), 10))
    assert transform.source == "lut"
    np.testing.assert_allclose(transform.apply(stored), apply_modality_lut(stored, ds))


def test_missing_rescale_tags_mean_identity():
    transform = hu.ModalityTransform.from_tags(None, None)
    assert transform.source == "identity"
    stored = np.array([[-1000, 0, 40]], dtype=np.int16)
    np.testing.assert_array_equal(hu.to_hu(stored, transform, hu.Padding()).hu, stored)


def test_padding_becomes_air_before_rescale():
    stored = np.array([[-2000, 0, 1064, 30000, 30005]], dtype=np.int16)
    transform = hu.ModalityTransform.from_tags(1, -1024)
    declared = hu.to_hu(stored, transform, hu.Padding(-2000))
    np.testing.assert_array_equal(declared.hu, [[-1000, -1024, 40, 28976, 28981]])
    assert declared.padding == 1
    ranged = hu.to_hu(stored, transform, hu.Padding(30005, 30000))
    np.testing.assert_array_equal(ranged.hu[0, 3:], [-1000, -1000])
    # no declared padding: -2000 is padding only because it maps below -1024 HU
    legacy = hu.to_hu(stored, transform, hu.Padding())
    assert legacy.hu[0, 0] == -1000 and legacy.padding == 1
    with_zero_intercept = hu.to_hu(
        np.array([[-2000, 5]], np.int16), hu.ModalityTransform(), hu.Padding()
    )
    assert with_zero_intercept.hu[0, 0] == -1000
    # a declared padding value other than -2000 leaves -2000 alone (clamped, counted)
    other = hu.to_hu(stored, transform, hu.Padding(30000))
    assert other.hu[0, 0] == -1024 and other.clamped_low == 1


def test_normalisation_maps_the_reference_window():
    values = np.array([-2000, -1000, -300, 400, 1000], dtype=np.int16)
    reference = {"min_hu": -1000, "max_hu": 400, "mean": 0.25}  # the schema's defaults
    assert CtSettings().normalise.as_dict() == reference
    np.testing.assert_allclose(
        hu.normalise(values, **reference), [-0.25, -0.25, 0.25, 0.75, 0.75], atol=1e-6
    )
    np.testing.assert_allclose(hu.normalise(values, -1200, 600, 0.0)[1], 200 / 1800, atol=1e-6)


# ---------- resampling ----------


def test_linear_resampling_follows_uneven_positions_exactly():
    positions = np.array([0.0, 1.0, 3.5, 4.0, 10.0])
    volume = np.repeat((positions * 20)[:, None, None], 3, 1).repeat(3, 2).astype(np.int16)
    out, grid = resample.resample_stack(
        volume, positions, np.zeros((5, 2)), (1.0, 1.0), (0.5, 1.0, 1.0)
    )
    assert grid.shape == (21, 3, 3)
    np.testing.assert_array_equal(out[:, 1, 1], np.arange(21) * 0.5 * 20)


def test_in_plane_resampling_of_a_ramp_and_true_output_spacing():
    ramp = (np.arange(10) * 30).astype(np.int16)  # 0.7 mm pixels
    volume = np.broadcast_to(ramp, (2, 10, 10)).copy()
    out, grid = resample.resample_stack(
        volume, [0.0, 1.0], np.zeros((2, 2)), (0.7, 0.7), (1.0, 1.0, 1.0)
    )
    assert grid.shape == (2, 7, 7) and grid.spacing == (1.0, 1.0, 1.0)  # 6.3 mm of extent
    np.testing.assert_array_equal(out[0, 0], np.rint(np.arange(7) / 0.7 * 30))


def test_shear_is_removed_by_shifting_each_slice():
    # a rod along the normal, imaged by a stack whose slices shift by 2 pixels each
    volume = np.zeros((4, 12, 20), dtype=np.int16)
    offsets = np.array([[2.0 * k, 0.0] for k in range(4)])  # mm along rows (x)
    for k in range(4):
        volume[k, :, 10 - 2 * k] = 100  # same patient x = 10 mm in every slice
    out, grid = resample.resample_stack(
        volume, np.arange(4.0), offsets, (1.0, 1.0), (1.0, 1.0, 1.0), order=0
    )
    assert grid.start == (0.0, 0.0, 0.0) and grid.shape == (4, 12, 26)
    for k in range(4):
        assert np.flatnonzero(out[k, 5] == 100).tolist() == [10]
        # outside this slice's extent (x < 2k or x > 2k + 19 mm): fill (air)
        assert (out[k, 5, : 2 * k] == -1000).all() and (out[k, 5, 20 + 2 * k :] == -1000).all()
        assert (out[k, 5, 2 * k : 20 + 2 * k] != -1000).all()


@pytest.mark.parametrize("order", [0, 3])
def test_nearest_keeps_input_values_and_cubic_stays_in_range(order):
    rng = np.random.default_rng(1)
    volume = rng.choice(np.array([-1000, 0, 700], np.int16), size=(6, 9, 9))
    out, _ = resample.resample_stack(
        volume, np.arange(6) * 2.0, np.zeros((6, 2)), (1.5, 1.5), (1.0, 1.0, 1.0), order=order
    )
    if order == 0:
        assert set(np.unique(out)) <= {-1000, 0, 700}
    else:
        assert out.min() >= -1000 and out.max() <= 700


def test_keys_weights_sum_to_one_and_interpolate():
    # away from the ends, cubic convolution reproduces a linear ramp exactly
    index, weight, valid = resample.axis_taps(np.array([1.0, 1.25, 1.5, 2.0, 4.6]), 5, 3)
    np.testing.assert_allclose(weight.sum(axis=0), 1.0, atol=1e-6)
    samples = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    interpolated = (samples[index] * weight).sum(axis=0)
    np.testing.assert_allclose(interpolated[:4], [10, 12.5, 15, 20], atol=1e-4)
    assert valid[:4].all() and not valid[4]  # 4.6 is beyond half a sample past the end


# ---------- lung mask ----------


CHEST_MM = (5.0, 5.0, 5.0)  # voxel size: the chest is 200 x 320 x 320 mm


def chest(shape=(40, 64, 64), *, lungs=True, joined=False, top_cut=False):
    """HU volume: air, an elliptic body, two lung ellipsoids with a vessel each."""
    z, y, x = np.indices(shape, dtype=float)
    nz, ny, nx = shape
    vol = np.full(shape, -1000, dtype=np.int16)
    body = ((y - ny / 2) / (ny * 0.42)) ** 2 + ((x - nx / 2) / (nx * 0.46)) ** 2 <= 1
    vol[body] = 40
    truth = np.zeros(shape, dtype=bool)
    if lungs:
        zc = 0 if top_cut else nz / 2
        for cx in (nx * 0.3, nx * 0.7):
            inside = ((z - zc) / (nz * 0.4)) ** 2 + ((y - ny / 2) / (ny * 0.3)) ** 2 + (
                (x - cx) / (nx * 0.14)
            ) ** 2 <= 1
            truth |= inside
            vol[inside] = -850
            vessel = inside & ((y - ny / 2) ** 2 + (x - cx) ** 2 <= 2)
            vol[vessel] = 40
        if joined:
            vol[int(nz / 2), ny // 2 - 1 : ny // 2 + 1, int(nx * 0.3) : int(nx * 0.7)] = -900
    return vol, truth


def test_both_separate_lungs_are_kept_and_vessels_filled():
    vol, truth = chest()
    result = lung.lung_mask(vol, CHEST_MM)
    mask = result.mask.astype(bool)
    assert result.status == "ok"
    assert [c["kept"] for c in result.components[:2]] == [True, True]
    np.testing.assert_array_equal(mask, truth)  # vessels inside, nothing outside
    assert result.volume_ml == pytest.approx(truth.sum() * 0.125)


def _inner_air_by_one_3d_labelling(hu_: np.ndarray, threshold: float) -> np.ndarray:
    from scipy import ndimage

    air = hu_ < threshold
    labels, _ = ndimage.label(air)
    faces = np.concatenate(
        [f.ravel() for f in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1])]
    )
    return air & ~np.isin(labels, faces[faces > 0])


def test_inner_air_in_two_passes_equals_one_3d_labelling():
    # outside air reaching the side faces only through slices above or below (tunnels,
    # pockets closed in-plane) is found by the second pass
    from scipy import ndimage

    rng = np.random.default_rng(7)
    second_pass_used = 0
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 24, size=3))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(0.6, 1.5))
        vol = np.where(noise > np.quantile(noise, rng.uniform(0.3, 0.7)), 40, -1000)
        vol = vol.astype(np.int16)
        expected = _inner_air_by_one_3d_labelling(vol, -320)
        np.testing.assert_array_equal(lung.inner_air(vol, -320), expected)
        per_slice = np.zeros(shape, dtype=bool)
        for z in range(shape[0]):
            per_slice[z] = _inner_air_by_one_3d_labelling(vol[z : z + 1], -320)[0]
        second_pass_used += int(not np.array_equal(per_slice, expected))
    assert second_pass_used > 10


def test_hu_in_int16_or_int32_gives_the_same_values():
    transform = hu.ModalityTransform.from_tags(1, -1024)
    for stored in (
        np.array([[0, 1024, 4095]], dtype=np.uint16),  # fits int16
        np.array([[0, 1024, 40000]], dtype=np.uint16),  # above int16: int32 path
        np.array([[-2000, 0, 32767]], dtype=np.int16),  # 32767 - 1024 fits
    ):
        expected = np.clip(stored.astype(np.int64) - 1024, hu.HU_FLOOR, hu.HU_CEILING)
        expected[stored == -2000] = hu.AIR_HU
        np.testing.assert_array_equal(hu.to_hu(stored, transform, hu.Padding()).hu, expected)
    low = hu.to_hu(np.array([[-32768, 5]], np.int16), hu.ModalityTransform(1, -1024), hu.Padding())
    np.testing.assert_array_equal(low.hu, [[hu.HU_FLOOR, -1019]])  # -33792 does not wrap


def test_lungs_touching_the_top_face_are_not_outside_air():
    vol, truth = chest(top_cut=True)
    result = lung.lung_mask(vol, CHEST_MM)
    assert result.status == "ok"
    np.testing.assert_array_equal(result.mask.astype(bool), truth)
    assert "lungs_touch_scan_end" in result.qc_flags


def test_small_air_pockets_are_dropped_and_an_empty_body_has_no_lungs():
    vol, _ = chest(lungs=False)
    vol[20, 30:33, 30:33] = -1000  # a small gas pocket
    result = lung.lung_mask(vol, CHEST_MM)
    assert result.status == "no_lungs" and not result.mask.any()
    assert result.components[0]["volume_ml"] == pytest.approx(9 * 0.125, abs=0.05)


def test_volume_flags_and_dilation():
    vol, truth = chest()
    small = lung.lung_mask(vol, CHEST_MM, lung.LungSettings(min_volume_ml=5000))
    assert "lung_volume_low" in small.qc_flags
    dilated = lung.lung_mask(vol, CHEST_MM, lung.LungSettings(dilation_mm=6.0))
    assert dilated.mask.sum() > truth.sum()
    assert dilated.mask.astype(bool)[truth].all()


def pocket_chest():
    """Two lungs (1.5 mm voxels); against the low-x one's outer wall a 24 mm tissue nodule
    half inside the lung (juxta-pleural); between the lungs a 90 mm 'heart' denting both;
    along the other one's outer wall a long 18 mm groove (a dent far longer than a
    nodule: not a pocket to fill)."""
    shape = (60, 120, 160)
    z, y, x = np.indices(shape, dtype=float)
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :4, :] = vol[:, -4:, :] = vol[:, :, :4] = vol[:, :, -4:] = -1000  # outside air
    lungs = []
    for cx in (50.0, 110.0):
        inside = ((z - 30) / 35) ** 2 + ((y - 60) / 40) ** 2 + ((x - cx) / 25) ** 2 <= 1
        vol[inside] = -850
        lungs.append(inside)
    nodule = (z - 30) ** 2 + (y - 60) ** 2 + (x - 27) ** 2 <= 8**2
    heart = (z - 30) ** 2 + (y - 60) ** 2 + (x - 80) ** 2 <= 30**2
    groove = (y - 60) ** 2 + (x - 130) ** 2 <= 6**2
    vol[nodule | heart | groove] = 40
    return vol, lungs, nodule, heart, groove


def test_pockets_keep_a_juxta_pleural_nodule_and_leave_the_heart_out():
    vol, lungs, nodule, heart, groove = pocket_chest()
    spacing = (1.5, 1.5, 1.5)
    within = (lungs[0] | lungs[1]) & nodule  # the nodule's part the lung would surround
    plain = lung.lung_mask(vol, spacing, lung.LungSettings(closing_radius_mm=0))
    assert plain.mask.astype(bool)[within].mean() < 0.05  # carved out by the threshold
    result = lung.lung_mask(vol, spacing)
    mask = result.mask.astype(bool)
    # a broad-based nodule on a flat wall: all but a cap about 2 mm deep at its base
    assert mask[within].mean() > 0.8
    assert mask[heart].mean() < 0.02  # the 90 mm dent is not filled
    assert mask[groove & lungs[1]].mean() < 0.1  # nor the long groove
    built = result.construction
    assert built["lungs_separated"] and built["pockets_filled"] >= 1
    assert built["pockets_too_large"] >= 1 and built["largest_pocket_unfilled_mm"] > 40
    voxel_ml = 1.5**3 / 1000
    # the lung at low x is the patient's right when x grows to the left (LPS)
    assert result.right_volume_ml == pytest.approx(mask[:, :, :80].sum() * voxel_ml, abs=0.1)
    assert result.left_volume_ml == pytest.approx(mask[:, :, 80:].sum() * voxel_ml, abs=0.1)
    assert result.left_volume_ml + result.right_volume_ml == pytest.approx(
        result.volume_ml, abs=0.1
    )
    assert (
        result.volume_ml == pytest.approx((mask.sum()) * voxel_ml, abs=0.1)
        and result.volume_ml - plain.volume_ml < 1.2 * nodule.sum() * voxel_ml
    )
    mirrored = lung.lung_mask(vol, spacing, lung.LungSettings(x_towards_left=False))
    assert mirrored.left_volume_ml == result.right_volume_ml


def test_pocket_radius_is_in_millimetres_on_anisotropic_voxels():
    vol, lungs, nodule, heart, _ = pocket_chest()
    coarse_z = vol[::2]  # 3 mm slices, 1.5 mm pixels: the same anatomy
    within = ((lungs[0] | lungs[1]) & nodule)[::2]
    result = lung.lung_mask(coarse_z, (3.0, 1.5, 1.5))
    assert result.construction["grid_spacing_mm"] == [3.0, 3.0, 3.0]
    assert result.mask.astype(bool)[within].mean() > 0.8
    assert result.mask.astype(bool)[heart[::2]].mean() < 0.02


# ---------- patches ----------


def test_patch_grid_covers_the_box_and_stays_inside():
    size, stride = patches.patch_voxels(64, 32, (1.0, 2.0, 2.0))
    assert size == (64, 32, 32) and stride == (32, 16, 16)
    box = (slice(10, 150), slice(20, 60), slice(0, 30))
    starts = patches.candidate_starts(box, (200, 100, 40), size, stride)
    for axis in range(3):
        lo = starts[:, axis].min()
        hi = starts[:, axis].max() + size[axis]
        assert lo <= box[axis].start and hi >= box[axis].stop
        assert lo >= 0 and hi <= (200, 100, 40)[axis]


def test_patch_extraction_pads_with_fill_and_counts_lung():
    volume = np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4)
    out = np.empty((3, 3, 3), dtype=np.int16)
    patches.extract(volume, np.array([-1, 2, 0]), (3, 3, 3), -1000, out)
    assert (out[0] == -1000).all() and (out[:, :, :][1:, 2:] == -1000).all()
    np.testing.assert_array_equal(out[1:, :2], volume[:2, 2:4, :3])
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[:2] = 1
    np.testing.assert_allclose(
        patches.lung_fractions(mask, np.array([[-1, 0, 0], [2, 0, 0]]), (2, 2, 2)), [0.5, 0.0]
    )


# ---------- NIfTI and memory ----------


def test_nifti_affine_and_reproducible_multiblock_gzip(tmp_path, monkeypatch):
    import nibabel as nib

    monkeypatch.setattr(nifti, "BLOCK_BYTES", 1000)  # many blocks
    volume = np.random.default_rng(0).integers(-1000, 1000, (7, 11, 13)).astype(np.int16)
    affine = nifti.affine_ras([10.0, 20.0, 30.0], [1, 0, 0], [0, 1, 0], [0, 0, 1], (2.0, 0.5, 0.25))
    nifti.write_nifti(tmp_path / "a.nii.gz", volume, affine, threads=1)
    nifti.write_nifti(tmp_path / "b.nii.gz", volume, affine, threads=2)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    assert raw[352:] == volume.tobytes()
    image = nib.load(tmp_path / "a.nii.gz")
    assert image.shape == (13, 11, 7)
    # LPS (10, 20, 30) is RAS (-10, -20, 30); x index steps 0.25 mm towards patient left (-R)
    np.testing.assert_allclose(image.affine[:, 3], [-10, -20, 30, 1])
    np.testing.assert_allclose(np.diag(image.affine)[:3], [-0.25, -0.5, 2.0])
    back, _ = nifti.read_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(back, volume)


def test_memory_estimates_grow_with_inputs():
    one = memory.preprocess_ct_mb(150 * 2**20)
    assert one > memory.preprocess_ct_mb(15 * 2**20)
    assert memory.preprocess_ct_mb(150 * 2**20, threads=2) > one
    fine = memory.preprocess_ct_mb(150 * 2**20, spacing_out=(0.5, 0.5, 0.5))
    assert fine > 4 * (one - memory.BASE_MB * memory.SAFETY)
    manifest = {"summary": {"shape_out": [374, 358, 358]}}
    assert memory.tile_ct_mb(manifest) > 374 * 358 * 358 * 3 / 2**20
