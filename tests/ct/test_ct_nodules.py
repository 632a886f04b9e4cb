"""Nodules stay inside the lung mask: LIDC-IDRI-0001 and its readers' outlines (069.xml).

The readers' outlines are mapped to the published mask through the DICOM geometry (read
here with pydicom, independently of the code under test) and the NIfTI affine of the
written ``lung_mask.nii.gz``. The shipped slab holds the 9 slices the large nodule spans;
the full 133-slice scan (for the volume check against the reference method) is used only
where the shared data folder sits beside the repository.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ct_support import SLAB, XML, dicom_frames

from medprep.common.errors import InputError
from medprep.ct import lidc, steps
from medprep.ct.nifti import LPS_TO_RAS

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / ".." / "shared" / "data" / "ct" / "lidc-idri-0001"


def outline_coverage(mask_path: Path, annotations, frames) -> list[dict]:
    """Per reading of each nodule of 3 mm or more: the share of its filled outline inside
    the mask, and whether its centre is inside."""
    image = nib.load(mask_path)
    mask = np.asanyarray(image.dataobj)  # (x, y, z) = NIfTI (i, j, k)
    to_voxel = np.linalg.inv(image.affine) @ LPS_TO_RAS
    rows = []
    for reading in annotations.large_nodules():
        points = np.concatenate(list(lidc.reading_points_lps(reading, frames).values()))
        homogeneous = np.c_[points, np.ones(len(points))].T

        def voxels(h, to_voxel=to_voxel):
            ijk = np.rint(to_voxel @ h)[:3].astype(int)
            inside = np.all((ijk >= 0) & (ijk < np.array(mask.shape)[:, None]), axis=0)
            values = np.zeros(ijk.shape[1], dtype=bool)
            values[inside] = mask[ijk[0, inside], ijk[1, inside], ijk[2, inside]] > 0
            return values

        centre = points.mean(axis=0)
        rows.append(
            {
                "reader": reading.reader,
                "nodule": reading.nodule_id,
                "inside": float(voxels(homogeneous).mean()),
                "centre_inside": bool(voxels(np.append(centre, 1.0)[:, None])[0]),
                "pixels": len(points),
            }
        )
    return rows


@pytest.fixture(scope="module")
def slab_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lidc-slab")
    files = sorted(SLAB.glob("*.dcm"))
    pre, _ = steps.run_chain(files, out, sample="lidc-0001-slab")
    return out, pre


def test_lidc_xml_reader_gives_every_reading():
    annotations = lidc.parse_lidc_xml(XML)
    assert annotations.readers == 4
    assert annotations.series_uid.endswith(".179049373636438705059720603192")
    large = annotations.large_nodules()
    # the one large nodule of LIDC-IDRI-0001, outlined by all four radiologists
    assert sorted(r.reader for r in large) == [0, 1, 2, 3]
    assert [len(r.outlines) for r in large] == [8, 7, 8, 9]
    assert all(r.characteristics["malignancy"] >= 1 for r in large)
    small = [r for r in annotations.nodules if r.is_small]
    assert len(small) == 9 and all(len(r.outlines) == 1 for r in small)
    assert len(annotations.non_nodules) > 0
    first = large[0].outlines[0]
    assert first.inclusion and first.z_position == -125.0 and first.points.shape == (76, 2)
    assert tuple(first.points[0]) == (312, 355)  # x (column), y (row)


def test_reading_extent_in_millimetres():
    annotations = lidc.parse_lidc_xml(XML)
    frames = dicom_frames(SLAB)
    extents = [lidc.reading_extent(r, frames, 2.5) for r in annotations.large_nodules()]
    for extent in extents:
        assert 30.0 <= extent.max_diameter_mm <= 36.0
        assert 20.0 <= extent.equivalent_diameter_mm <= 28.0
    centroids = np.array([e.centroid_lps for e in extents])
    # the four readers agree on where the nodule is within a few mm
    assert np.linalg.norm(centroids - centroids.mean(axis=0), axis=1).max() < 3.0
    assert centroids[:, 2].min() >= -125.0 and centroids[:, 2].max() <= -105.0


def test_exclusions_are_subtracted_from_the_filled_outline():
    square = np.array([[2, 2], [12, 2], [12, 12], [2, 12]])
    hole = np.array([[5, 5], [8, 5], [8, 8], [5, 8]])
    reading = lidc.NoduleReading(
        0,
        "n",
        (
            lidc.Outline("uid", 0.0, True, square),
            lidc.Outline("uid", 0.0, False, hole),
        ),
        {"malignancy": 3},
    )
    area = lidc.filled_outlines(reading, (16, 16))["uid"]
    assert area[2, 2] and area[12, 12] and area[3, 10]  # outline pixels and interior
    assert not area[6, 6] and not area[7, 7]  # the hole
    assert not area[0, 0] and not area[14, 14]
    assert np.count_nonzero(area) == 11 * 11 - 2 * 2


def test_malformed_lidc_xml_is_one_clear_line(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text(XML.read_text()[:5000])
    with pytest.raises(InputError, match="not readable as LIDC XML") as error:
        lidc.parse_lidc_xml(broken)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)
    other = tmp_path / "other.xml"
    other.write_text("<annotations><nodule/></annotations>")
    with pytest.raises(InputError, match="not an LIDC annotation file"):
        lidc.parse_lidc_xml(other)
    bad_point = XML.read_text().replace("<xCoord>312</xCoord>", "<xCoord>a</xCoord>", 1)
    with pytest.raises(InputError, match="reading 1, nodule 'Nodule 001'.*integer"):
        lidc.parse_lidc_xml(bad_point.encode())


def test_every_reading_of_the_nodule_is_inside_the_published_mask(slab_run):
    out, pre = slab_run
    assert pre["summary"]["status"] == "ok"
    coverage = outline_coverage(
        out / "preprocess/lung_mask.nii.gz", lidc.parse_lidc_xml(XML), dicom_frames(SLAB)
    )
    assert len(coverage) == 4
    for row in coverage:
        assert row["centre_inside"], row
        assert row["inside"] >= 0.90, row


def test_radii_in_millimetres_hold_on_anisotropic_voxels(tmp_path):
    """The same check on the scan's own anisotropic grid (2.5 mm slices, 0.7 mm pixels):
    the closing runs on a grid of about 3 mm per axis, its radius in mm."""
    pre, _ = steps.run_chain(
        sorted(SLAB.glob("*.dcm")), tmp_path, {"spacing": [2.5, 0.703125, 0.703125]}
    )

    built = json.loads((tmp_path / "preprocess/metadata.json").read_text())["lung"]["construction"]
    assert built["grid_spacing_mm"] == [2.5, 2.8125, 2.8125]
    coverage = outline_coverage(
        tmp_path / "preprocess/lung_mask.nii.gz", lidc.parse_lidc_xml(XML), dicom_frames(SLAB)
    )
    assert len(coverage) == 4
    assert all(row["centre_inside"] and row["inside"] >= 0.90 for row in coverage), coverage


def test_the_threshold_mask_alone_cuts_the_nodule(tmp_path):
    """Without pocket filling (the reference method's boundary) the same check fails:
    the juxta-pleural nodule is carved out of the mask."""
    files = sorted(SLAB.glob("*.dcm"))
    steps.run_preprocess(
        files,
        volume_path=tmp_path / "volume.nii.gz",
        mask_path=tmp_path / "lung_mask.nii.gz",
        metadata_path=tmp_path / "metadata.json",
        qc_path=tmp_path / "qc.png",
        manifest_path=tmp_path / "preprocess.json",
        sample="s",
        settings={"lung": {"closing_radius_mm": 0}},
    )
    coverage = outline_coverage(
        tmp_path / "lung_mask.nii.gz", lidc.parse_lidc_xml(XML), dicom_frames(SLAB)
    )
    assert all(row["inside"] < 0.7 and not row["centre_inside"] for row in coverage)


def test_metadata_records_how_the_mask_was_built(slab_run):

    out, _ = slab_run
    lung = json.loads((out / "preprocess/metadata.json").read_text())["lung"]
    built = lung["construction"]
    assert built["closing_radius_mm"] == 15 and built["pocket_max_mm"] == 40
    assert built["grid_spacing_mm"] == [3.0, 3.0, 3.0]
    assert built["lungs_separated"] is True
    assert built["pockets_filled"] >= 1 and built["added_ml"] > 1.0  # the nodule's pocket
    assert built["pockets_too_large"] >= 1  # the hilum is not swallowed
    assert lung["left_volume_ml"] + lung["right_volume_ml"] == pytest.approx(
        lung["volume_ml"], abs=0.2
    )
    # the large nodule is in the left lung; the right lung is the larger one here
    assert lung["right_volume_ml"] > lung["left_volume_ml"] > 100


@pytest.mark.skipif(not FULL.is_dir(), reason="needs ../shared/data beside the repository")
def test_full_scan_lung_volume_matches_the_reference_method(tmp_path):
    """On the full LIDC-IDRI-0001 scan: the reference steps' lung mask
    (benchmarks/ct_reference.py) on the same 1 mm volume, against medprep's mask."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ct_reference

    from medprep.ct import preprocess

    files = sorted(FULL.glob("*.dcm"))
    assert len(files) == 133
    result = preprocess.preprocess(files, {})
    reference = ct_reference.segment_lung_mask(result.hu.copy(), True)
    voxel_ml = float(np.prod(result.spacing_out)) / 1000.0
    reference_ml = float(np.count_nonzero(reference)) * voxel_ml
    ours_ml = result.metadata["lung"]["volume_ml"]
    assert ours_ml == pytest.approx(reference_ml, rel=0.03)
    overlap = np.count_nonzero(reference.astype(bool) & result.mask.astype(bool))
    assert overlap >= 0.99 * np.count_nonzero(reference)  # the reference's lungs all kept
    lung = result.metadata["lung"]
    assert lung["construction"]["added_ml"] < 0.02 * reference_ml
    assert lung["left_volume_ml"] > 1000 and lung["right_volume_ml"] > 1000
