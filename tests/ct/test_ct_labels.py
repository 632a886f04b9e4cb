"""CT region labels: patches centred on annotated nodules, grid labels, flags, bad files.

Where a nodule is comes from outside the code under test: the LIDC readers' outlines
placed through the DICOM headers read here with pydicom and mapped with nibabel's affine
of the published volume; the phantom's nodule from the phantom's documented geometry.
The published volume's HU at the patch centre must be the nodule's, which a sign error
of the world-to-voxel mapping (RAS against LPS) would not give.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from ct_support import SLAB, XML, dicom_frames, phantom_nodule

from medprep import storage
from medprep.common.errors import InputError
from medprep.ct import labels, lidc, steps
from medprep.ct.nifti import LPS_TO_RAS
from medprep.ct.series import uid_hash
from medprep.demo import ct_phantom as phantom
from medprep.workflow import manifest
from medprep.workflow.sheet import SampleSheetError, read_sample_sheet

REPO = Path(__file__).resolve().parents[2]
SAMPLES_SCHEMA = REPO / "schemas/samples.schema.yaml"


def annotation_manifest(folder: Path, source: Path, scope: str = "sample") -> Path:
    """What rule download_annotations writes for a local file."""
    files = storage.fetch(str(source), folder / "annotations")
    path = folder / f"annotations-{source.stem}.json"
    manifest.write_annotations_manifest(
        path,
        sample="s",
        modality="ct",
        source=str(source),
        files=[f.to_dict() for f in files],
        fingerprint=storage.files_fingerprint(files),
        scope=scope,
    )
    return path


def tile_with(
    pre: dict, out: Path, annotations_manifest, download=None, settings=None
) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    steps.run_tile(
        pre,
        settings=settings,
        patches_path=out / "patches.npy",
        table_path=out / "patches.parquet",
        summary_path=out / "summary.json",
        manifest_path=out / "tile.json",
        annotations_manifest=annotations_manifest,
        download_manifest=download,
    )
    return pd.read_parquet(out / "patches.parquet")


def voxel_of(image, lps: np.ndarray) -> np.ndarray:
    """(n, 3) voxel (i, j, k) = (x, y, z) of LPS points, through nibabel's RAS affine."""
    return nib.affines.apply_affine(np.linalg.inv(image.affine), lps * np.array([-1, -1, 1]))


# ---- LIDC-IDRI-0001: the XML route and a LUNA16-style CSV made from it


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lidc-labels")
    files = sorted(SLAB.glob("*.dcm"))
    pre, tiled = steps.run_chain(
        files, out, sample="lidc", annotations_manifest=annotation_manifest(out, XML)
    )
    return out, files, pre, tiled


def reader_pixels_lps(frames) -> list[np.ndarray]:
    return [
        np.concatenate(list(lidc.reading_points_lps(r, frames).values()))
        for r in lidc.parse_lidc_xml(XML).large_nodules()
    ]


def test_lidc_nodule_patch_is_centred_on_the_nodule_voxels(slab):
    out, _, pre, tiled = slab
    table = pd.read_parquet(out / "patches/patches.parquet")
    centred = table[table.centred]
    assert len(centred) == 1  # the one nodule of 3 mm or more, four readings merged
    row = centred.iloc[0]
    assert row.label == 1 and row.readers == 4 and row.annotation_id == "lidc-1"
    assert not row.outside_scan and not row.outside_lung
    assert 20.0 <= row.diameter_mm <= 28.0  # the readers' equivalent diameters
    assert tiled["summary"]["annotations"]["centred_patches"] == 1

    image = nib.load(out / "preprocess/volume.nii.gz")
    volume = np.asanyarray(image.dataobj)  # (x, y, z)
    spacing = np.asarray(image.header.get_zooms()[:3])
    readings = reader_pixels_lps(dicom_frames(SLAB))
    # the nodule's voxels in the published volume: every reader's filled outline
    voxels = np.rint(voxel_of(image, np.concatenate(readings))).astype(int)
    hu = volume[voxels[:, 0], voxels[:, 1], voxels[:, 2]]
    assert np.median(hu) > -300  # solid tissue: the outlines land on the nodule
    centroid_voxel = voxel_of(image, np.mean([p.mean(axis=0) for p in readings], axis=0))
    patch_centre = np.array([row.center_voxel_x, row.center_voxel_y, row.center_voxel_z])
    assert np.linalg.norm((patch_centre - centroid_voxel) * spacing) <= 1.0
    # the same in world coordinates, and the table's own distance
    world = np.array([row.center_lps_x_mm, row.center_lps_y_mm, row.center_lps_z_mm])
    assert np.linalg.norm(world - np.mean([p.mean(axis=0) for p in readings], axis=0)) <= 1.0
    assert row.distance_mm <= 0.5 * np.linalg.norm(spacing) + 1e-6
    # its box is the patch of the configured size around that centre
    assert row.z1 - row.z0 == tiled["summary"]["patch_shape"][0]
    middle = np.array([row.z0 + row.z1 - 1, row.y0 + row.y1 - 1, row.x0 + row.x1 - 1]) / 2
    assert np.allclose(middle, patch_centre[::-1])
    # the patch centre's HU is the nodule's
    i, j, k = np.rint(patch_centre).astype(int)
    assert volume[i, j, k] > -300


def test_grid_patches_near_the_nodule_get_its_label(slab):
    out, _, _, tiled = slab
    table = pd.read_parquet(out / "patches/patches.parquet")
    grid = table[~table.centred]
    assert set(grid.label) == {0, 1}
    assert (grid.label == 1).sum() == tiled["summary"]["annotations"]["grid_labels"]["1"]
    labelled = grid[grid.label == 1]
    assert (labelled.annotation_id == "lidc-1").all()
    size_mm = np.array(tiled["summary"]["patch_shape"]) * np.array(tiled["summary"]["spacing"])
    # the rule: the sphere meets the centre region (half the patch per axis)
    reach = np.linalg.norm(size_mm / 4) + labelled.diameter_mm / 2
    assert (labelled.distance_mm <= reach + 1e-6).all()
    assert grid[grid.label == 0].annotation_id.isna().all()


def test_lidc_and_csv_routes_agree(slab, tmp_path):
    out, files, pre, _ = slab
    parsed = lidc.parse_lidc_xml(XML)
    centre = np.mean([p.mean(axis=0) for p in reader_pixels_lps(dicom_frames(SLAB))], axis=0)
    lidc_table = pd.read_parquet(out / "patches/patches.parquet")
    lidc_row = lidc_table[lidc_table.centred].iloc[0]
    csv_path = tmp_path / "annotations.csv"
    csv_path.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        f"{parsed.series_uid},{centre[0]:.4f},{centre[1]:.4f},{centre[2]:.4f},"
        f"{lidc_row.diameter_mm}\n"
        "1.2.3.4.5,10,20,30,5\n"  # another scan's nodule: left out
    )
    table = tile_with(pre, tmp_path / "csv", annotation_manifest(tmp_path, csv_path))
    centred = table[table.centred]
    assert len(centred) == 1
    row = centred.iloc[0]
    assert row.label == 1 and row.readers == 0 and row.annotation_id == "csv-2"
    for axis in ("x", "y", "z"):
        column = f"center_lps_{axis}_mm"
        assert abs(row[column] - lidc_row[column]) <= 1.0
    assert list(table.label) == list(lidc_table.label)  # same grid labels


def test_per_sample_csv_of_another_scan_fails(slab, tmp_path):
    _, _, pre, _ = slab
    wrong = tmp_path / "other.csv"
    wrong.write_text("seriesuid,coordX,coordY,coordZ\n1.2.3.4.5,10,20,30\n")
    with pytest.raises(InputError, match="none of its 1 rows names the chosen series") as error:
        tile_with(pre, tmp_path / "t", annotation_manifest(tmp_path, wrong))
    assert str(wrong) in str(error.value) and "\n" not in str(error.value)
    # as the cohort's file, rows of other scans are normal: no annotations for this one
    table = tile_with(pre, tmp_path / "c", annotation_manifest(tmp_path, wrong, "cohort"))
    assert not table.centred.any() and (table.label == 0).all()


def test_lidc_xml_without_the_scan_fails_with_one_line(slab, tmp_path):
    _, _, pre, _ = slab
    with pytest.raises(InputError, match="LIDC XML needs the scan's DICOM files"):
        tile_with(pre, tmp_path / "t", annotation_manifest(tmp_path, XML))


def test_bad_or_foreign_lidc_xml_fails_with_one_line(slab, tmp_path):
    _, files, pre, _ = slab
    broken = tmp_path / "broken.xml"
    broken.write_text(XML.read_text()[:4000])
    other = tmp_path / "other.xml"
    uid = lidc.parse_lidc_xml(XML).series_uid
    other.write_text(XML.read_text().replace(uid, uid[:-1] + "9"))
    for path, cause in ((broken, "not readable as LIDC XML"), (other, "annotates series")):
        with pytest.raises(InputError, match=cause) as error:
            tile_with(pre, tmp_path / path.stem, annotation_manifest(tmp_path, path), files)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / path.stem / "tile.json").exists()


def test_without_annotations_the_table_has_no_label_column(slab, tmp_path):
    _, _, pre, _ = slab
    table = tile_with(pre, tmp_path / "t", None)
    assert "label" not in table.columns  # the sheet's label applies
    assert not table.centred.any() and table.annotation_id.isna().all()


# ---- a phantom whose nodule is where its geometry says


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom-labels")
    shape = {"rows": 128, "cols": 128, "slices": 60, "pixel_mm": 3.0, "slice_mm": 3.0}
    truth = phantom.write_chest_phantom(out / "dicom", **shape, noise_hu=0.0)
    pre = steps.run_preprocess(
        truth["files"],
        volume_path=out / "pre/volume.nii.gz",
        mask_path=out / "pre/lung_mask.nii.gz",
        metadata_path=out / "pre/metadata.json",
        qc_path=out / "pre/qc.png",
        manifest_path=out / "pre.json",
        sample="chest",
        settings={"spacing": [2.0, 2.0, 2.0]},
    )
    return out, truth, pre, phantom_nodule(**shape)


def test_csv_nodule_of_the_phantom(chest, tmp_path):
    out, truth, pre, (centre, diameter) = chest
    assert pre["summary"]["series_uid_hash"] == uid_hash(truth["series_uid"])
    csv_path = tmp_path / "nodules.csv"
    spine = [0.0, 85.0 * 128 * 3.0 / 360.0, 0.0]  # bone, outside the lungs
    csv_path.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm,class\n"
        f"{truth['series_uid']},{centre[0]},{centre[1]},{centre[2]},{diameter},2\n"
        f"{truth['series_uid']},{spine[0]},{spine[1]},{spine[2]},,0\n"
        f"{truth['series_uid']},0,0,1000,4,1\n"  # 1 m above the scan
    )
    table = tile_with(pre, tmp_path / "t", annotation_manifest(tmp_path, csv_path))
    centred = table[table.centred].set_index("annotation_id")
    assert list(centred.index) == ["csv-2", "csv-3", "csv-4"]  # every row kept

    nodule = centred.loc["csv-2"]
    assert nodule.label == 2 and abs(nodule.diameter_mm - diameter) < 1e-3
    world = np.array([nodule[f"center_lps_{a}_mm"] for a in "xyz"])
    assert np.linalg.norm(world - centre) <= 1.0 and nodule.distance_mm <= 1.0
    assert not nodule.outside_scan and not nodule.outside_lung
    image = nib.load(out / "pre/volume.nii.gz")
    volume = np.asanyarray(image.dataobj)
    i, j, k = np.rint([nodule.center_voxel_x, nodule.center_voxel_y, nodule.center_voxel_z])
    assert abs(int(volume[int(i), int(j), int(k)]) - phantom.HU["nodule"]) <= 40
    # a mirrored mapping (RAS taken for LPS) would land in the other lung's air
    mirrored = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine), centre)).astype(int)
    assert volume[tuple(mirrored)] < -500

    spine_row = centred.loc["csv-3"]
    assert spine_row.label == 0 and np.isnan(spine_row.diameter_mm)
    assert spine_row.outside_lung and not spine_row.outside_scan
    above = centred.loc["csv-4"]
    assert above.outside_scan and above.outside_lung and above.padded
    summary = manifest.read_step_manifest(tmp_path / "t/tile.json")["summary"]
    assert summary["annotations"]["outside_scan"] == 1
    assert summary["annotations"]["outside_lung"] == 2
    flagged = [w for w in summary["warnings"] if w.startswith("annotation ")]
    assert len(flagged) == 2 and "csv-4 lies outside the scan" in flagged[1]
    # grid patches: the nodule's class where its sphere meets the centre region, else 0
    grid = table[~table.centred]
    assert set(grid.label) <= {0, 2} and (grid.label == 2).any()


def test_world_to_voxel_is_the_inverse_of_the_published_affine(chest):
    out, _, _, _ = chest
    image = nib.load(out / "pre/volume.nii.gz")
    rng = np.random.default_rng(0)
    voxels = rng.uniform(0, 50, size=(20, 3))  # (z, y, x)
    lps = labels.voxel_to_world(image.affine, voxels)
    expected = (LPS_TO_RAS[:3, :3] @ nib.affines.apply_affine(image.affine, voxels[:, ::-1]).T).T
    assert np.allclose(lps, expected)
    assert np.allclose(labels.world_to_voxel(image.affine, lps), voxels)


# ---- the rules on plain data


def test_grid_label_rule_on_numbers():
    # patches of 8 voxels at 1 mm: centre region +-2 mm around the centre (3.5, 3.5, 3.5)
    starts = np.array([[0, 0, 0], [0, 0, 8]])
    near = labels.Annotation("a", (0.0, 0.0, 0.0), 3.0, 5)  # radius 1.5
    placed = [
        labels.PlacedAnnotation(near, np.array([3.5, 3.5, 6.5]), np.zeros(3), 0.0, False, False)
    ]
    found, which = labels.grid_labels(starts, (8, 8, 8), (1.0, 1.0, 1.0), placed)
    # x 6.5 is 3 mm from the first centre (1 mm beyond its region: met by a 1.5 mm
    # radius), 5 mm from the second (3 mm beyond: not met)
    assert found.tolist() == [5, 0] and which.tolist() == [0, -1]
    small = labels.Annotation("b", (0.0, 0.0, 0.0), 1.0, 5)  # radius 0.5: not met
    placed = [labels.PlacedAnnotation(small, placed[0].voxel_zyx, np.zeros(3), 0, False, False)]
    assert labels.grid_labels(starts, (8, 8, 8), (1.0, 1.0, 1.0), placed)[0].tolist() == [0, 0]


def test_readings_of_one_nodule_merge_and_two_nodules_do_not():
    def extent(x, diameter=6.0):
        return lidc.ReadingExtent((x, 0.0, 0.0), np.pi / 6 * diameter**3, diameter, diameter, 3)

    groups = labels.merge_readings(
        [(0, extent(0.0)), (1, extent(1.5)), (2, extent(40.0)), (1, extent(41.0)), (0, extent(2))]
    )
    # reader 0 has two readings near x=0: one nodule counts each reader once
    assert sorted(sorted(g) for g in groups) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seriesuid,coordX,coordY\n1,2,3\n", "line 1: missing column\\(s\\) coordZ"),
        ("coordX,coordY,coordZ\n1,2,abc\n", "line 2, column 'coordZ': 'abc' is not a number"),
        ("coordX,coordY,coordZ,class\n1,2,3,1.5\n", "line 2, column 'class'.*not an integer"),
        ("coordX,coordY,coordZ,diameter_mm\n1,2,3,-4\n", "diameter_mm.*negative"),
        ("coordX,coordY,coordZ\n1,2,3,4\n", "line 2: more fields"),
    ],
)
def test_malformed_csv_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as error:
        labels.read_csv(path, series_uid_hash=None, require_series=True)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_sheet_column_checks_the_kind_of_annotation_file(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(
        "sample\tmodality\turi\tannotations\n"
        "a\tct\tscans/a\tlabels/a.csv\n"
        "b\twsi\tslides/b.svs\ts3://bucket/b.geojson\n"
        "c\tct\tscans/c\t\n"
    )
    table = read_sample_sheet(sheet, SAMPLES_SCHEMA)
    assert table.loc["a", "annotations"] == "labels/a.csv"
    assert pd.isna(table.loc["c", "annotations"])
    sheet.write_text("sample\tmodality\turi\tannotations\nd\tct\tscans/d\tlabels/d.geojson\n")
    with pytest.raises(SampleSheetError) as error:
        read_sample_sheet(sheet, SAMPLES_SCHEMA)
    assert str(error.value) == (
        f"sample sheet {sheet} line 2 (sample 'd'), column 'annotations': 'labels/d.geojson' "
        "is not a known annotation file for ct (expected .csv or .xml)"
    )


def test_quoted_and_unquoted_csv_read_alike():
    plain = (
        "seriesuid,coordX,coordY,coordZ,class\n1.2.3,1.5,2,3,1\n\n1.2.4,4,5,6,0\n1.2.3,-7,8,-9,0\n"
    )
    quoted = plain.replace("1.2.3,", '"1.2.3",').replace("1.2.4,", '"1.2.4",')
    keep = labels.series_matcher(uid_hash("1.2.3"))
    read = [labels.parse_csv(t, keep_series=keep) for t in (plain, quoted)]
    assert read[0] == read[1]
    found, counts = read[0]
    assert [(a.id, a.centre_lps, a.label) for a in found] == [
        ("csv-2", (1.5, 2.0, 3.0), 1),
        ("csv-5", (-7.0, 8.0, -9.0), 0),
    ]
    assert counts == {"rows": 3, "kept": 2, "other_series": 1}
    # a volume input's series is its file name: <seriesuid>.mhd matches its seriesuid
    volume = labels.series_matcher(uid_hash("volume:1.2.4.mhd"))
    assert [a.id for a in labels.parse_csv(plain, keep_series=volume)[0]] == ["csv-4"]


def test_materialised_patches_of_annotations_beyond_the_scan_are_air(chest, tmp_path):
    from medprep.ct.hu import AIR_HU

    out, truth, pre, (centre, diameter) = chest
    csv_path = tmp_path / "far.csv"
    csv_path.write_text(
        "coordX,coordY,coordZ,diameter_mm\n"
        f"{centre[0]},{centre[1]},{centre[2]},{diameter}\n"
        "0,0,130,4\n"  # above the scan (z up to 88.5 mm), the patch wholly beyond it
        "0,0,-150,4\n"  # below it: the patch ends at a negative index (not wrapped)
        "-150.5,0,0,4\n"  # a patch that straddles the volume's side
    )
    settings = {"patches": {"materialise": "hu"}}
    table = tile_with(pre, tmp_path / "t", annotation_manifest(tmp_path, csv_path), None, settings)
    arrays = np.load(tmp_path / "t/patches.npy")
    assert len(arrays) == len(table)
    centred = table[table.centred].set_index("annotation_id")
    for far in ("csv-3", "csv-4"):
        assert centred.loc[far, "outside_scan"]
        assert (arrays[centred.loc[far, "patch"]] == AIR_HU).all()
        assert centred.loc[far, "lung_fraction"] == 0
    side = arrays[centred.loc["csv-5", "patch"]]
    assert (side == AIR_HU).any() and (side != AIR_HU).any()
    volume = np.asanyarray(nib.load(out / "pre/volume.nii.gz").dataobj).transpose(2, 1, 0)
    row = centred.loc["csv-2"]
    assert np.array_equal(
        arrays[row.patch], volume[row.z0 : row.z1, row.y0 : row.y1, row.x0 : row.x1]
    )
