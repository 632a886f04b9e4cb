"""CT volumes as input: MetaImage (.mhd + .raw, as LUNA16 ships) and NIfTI go
through the same steps as DICOM, keep their world coordinates, and must hold HU."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from ct_support import CT_3SLICE, TEST_DATA, dicom_files

from medprep import storage
from medprep.common.errors import InputError
from medprep.ct import preprocess as pp

NIFTI = TEST_DATA / "volumes" / "totalseg-example-ct-3mm.nii.gz"
# three real slices hold little lung: lower the no-lungs floor so the mask is compared
SETTINGS = {"lung": {"no_lungs_below_ml": 1}}


def dicom_as_metaimage(folder, target):
    """Write a DICOM series as LUNA16 does: .mhd header + .raw voxels, LPS geometry."""
    loaded = pp.load_series([str(p) for p in dicom_files(folder)])
    g = loaded.geometry
    image = sitk.GetImageFromArray(loaded.volume)  # (z, y, x)
    image.SetOrigin(tuple(float(v) for v in g.origin))
    image.SetSpacing((g.pixel_spacing[1], g.pixel_spacing[0], g.median_step))
    axes = np.stack([g.row_cosine, g.col_cosine, g.normal], axis=1)  # columns: x, y, z
    image.SetDirection(tuple(float(v) for v in axes.ravel()))
    sitk.WriteImage(image, str(target), useCompression=False)
    return loaded


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_metaimage_gives_the_same_outputs_as_the_dicom_series(tmp_path):
    target = tmp_path / "scan.mhd"
    dicom_as_metaimage(CT_3SLICE, target)
    assert (tmp_path / "scan.raw").is_file()
    files = storage.fetch(str(target), tmp_path / "download")
    assert sorted(f.key for f in files) == ["scan.mhd", "scan.raw"]
    from_dicom = pp.preprocess([str(p) for p in dicom_files(CT_3SLICE)], SETTINGS)
    from_mhd = pp.preprocess([f.path for f in files], SETTINGS)
    np.testing.assert_allclose(from_mhd.affine_ras, from_dicom.affine_ras, atol=1e-6)
    assert from_mhd.hu.shape == from_dicom.hu.shape
    assert np.abs(from_mhd.hu.astype(int) - from_dicom.hu).max() <= 1
    assert from_dicom.mask.any() and dice(from_mhd.mask, from_dicom.mask) >= 0.99
    assert from_mhd.metadata["series"]["input"] == "MetaImage"
    assert from_mhd.metadata["hu"]["values_taken_as_hu"] is True


def test_a_lps_world_point_lands_on_the_same_voxel_value(tmp_path):
    # a point given in LUNA16 world coordinates (LPS mm) reads the same HU in input and output
    target = tmp_path / "scan.mhd"
    dicom_as_metaimage(CT_3SLICE, target)
    image = sitk.ReadImage(str(target))
    sx, sy, sz = image.GetSpacing()
    # output grid = input grid (same spacing, nearest), so every voxel keeps its value
    settings = {**SETTINGS, "spacing": [sz, sy, sx], "interpolation_order": 0}
    result = pp.preprocess([str(target), str(tmp_path / "scan.raw")], settings)
    for index in [(100, 200, 1), (300, 250, 0), (256, 256, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = lps * [-1, -1, 1]
        ijk = np.linalg.solve(result.affine_ras, [*ras, 1.0])[:3]
        np.testing.assert_allclose(ijk, index, atol=1e-3)
        voxel = tuple(int(round(v)) for v in ijk[::-1])  # (z, y, x)
        assert int(result.hu[voxel]) == max(int(image[index]), -1024)


def test_nifti_volume_keeps_its_world_coordinates_and_finds_the_lungs():
    result = pp.preprocess([str(NIFTI)])
    source = nib.load(NIFTI)
    assert result.status == "ok" and result.summary["lung_volume_ml"] > 100
    # voxel 0 is at the same RAS point; axes point the same way, at 1 mm instead of 3 mm
    np.testing.assert_allclose(result.affine_ras[:3, 3], source.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(result.affine_ras[:3, :3], source.affine[:3, :3] / 3, atol=1e-6)
    assert result.metadata["series"]["input"] == "NIfTI"


def test_a_volume_that_is_not_in_hu_fails_clearly(tmp_path):
    source = nib.load(NIFTI)
    stored = (np.asanyarray(source.dataobj) + 1024).clip(0).astype(np.uint16)  # no rescale
    path = tmp_path / "stored.nii.gz"
    nib.save(nib.Nifti1Image(stored, source.affine), path)
    with pytest.raises(InputError, match="values do not look like HU") as error:
        pp.preprocess([str(path)])
    assert error.value.path == str(path)


def test_a_metaimage_without_its_data_file_fails_at_download(tmp_path):
    target = tmp_path / "scan.mhd"
    dicom_as_metaimage(CT_3SLICE, target)
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(InputError, match="data file scan.raw"):
        storage.fetch(str(target), tmp_path / "download")


def test_discovery_takes_each_volume_file_as_one_sample(tmp_path):
    dicom_as_metaimage(CT_3SLICE, tmp_path / "1.3.6.1.4.mhd")
    (tmp_path / "case2.nii.gz").write_bytes(NIFTI.read_bytes())
    found = storage.discover(str(tmp_path), "ct")
    assert [s["sample"] for s in found] == ["1.3.6.1.4", "case2"]


def test_the_sheet_accepts_a_uid_its_hash_or_a_series_number(tmp_path):
    from workflow_support import REPO

    from medprep.workflow.sheet import SampleSheetError, read_sample_sheet

    schema = REPO / "schemas" / "samples.schema.yaml"
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(
        "sample\tmodality\turi\tseries_uid\n"
        "a\tct\tx/\t1.2.840.1\nb\tct\tx/\t3a317eb0d04d\nc\tct\tx/\t3\n"
    )
    assert list(read_sample_sheet(sheet, schema)["series_uid"]) == [
        "1.2.840.1",
        "3a317eb0d04d",
        "3",
    ]
    sheet.write_text("sample\tmodality\turi\tseries_uid\nd\tct\tx/\tchest-bone\n")
    with pytest.raises(SampleSheetError, match="series_uid"):
        read_sample_sheet(sheet, schema)


def test_a_metaimage_sample_runs_through_the_workflow(tmp_path):
    from workflow_support import published_file, run_snakemake, write_config, write_samples

    dicom_as_metaimage(CT_3SLICE, tmp_path / "scan.mhd")
    write_samples(tmp_path, [("luna-like", "ct", str(tmp_path / "scan.mhd"))])
    write_config(tmp_path, ct=SETTINGS)
    run_snakemake(tmp_path)
    download = json.loads((tmp_path / "results/ct/luna-like/download.json").read_text())
    assert sorted(f["key"] for f in download["files"]) == ["scan.mhd", "scan.raw"]
    published = tmp_path / "published/ct/luna-like"
    metadata = json.loads(published_file(published, "preprocess/metadata.json").read_text())
    assert metadata["series"]["input"] == "MetaImage"
    assert json.loads((published / "manifest.json").read_text())["sample"] == "luna-like"
