"""preprocess_ct and tile_ct end to end on synthetic chest phantoms written as DICOM."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from ct_support import CT_3SLICE, dicom_files, edited_copy

from medprep.common.settings import config_defaults
from medprep.ct import hu, nifti, settings, steps, tile
from medprep.ct import preprocess as pp
from medprep.demo import ct_phantom as phantom
from medprep.workflow.manifest import read_step_manifest

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(rows=64, cols=64, slices=40, pixel_mm=6.0, slice_mm=8.0)
COARSE = {"spacing": [6.0, 6.0, 6.0]}


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom") / "chest"
    truth = phantom.write_chest_phantom(folder, **SMALL, seed=3)
    return folder, truth


def paths(folder):
    return sorted(str(p) for p in Path(folder).iterdir())


def run_chain(folder, out, cfg=None, *, threads=1, include_identifiers=False):
    """preprocess and tile into ``out`` as the rule scripts do; returns both manifests."""
    return steps.run_chain(
        paths(folder),
        out,
        cfg or COARSE,
        sample="s",
        include_identifiers=include_identifiers,
        threads=threads,
    )


def patient_point_hu(volume, affine_ras, point_lps, radius=1):
    """Mean HU in a (2r+1)^3 neighbourhood of the voxel nearest to a patient (LPS) point."""
    to_voxel = np.linalg.inv(nifti.LPS_TO_RAS @ affine_ras)
    x, y, z, _ = np.rint(to_voxel @ np.append(point_lps, 1.0)).astype(int)
    r = radius
    return float(volume[z - r : z + r + 1, y - r : y + r + 1, x - r : x + r + 1].mean())


def test_phantom_ground_truth_is_consistent(chest):
    folder, truth = chest
    assert len(dicom_files(folder)) == 40
    assert truth["lung_volume_ml"] == pytest.approx(truth["lung_volume_ml_analytic"], rel=0.02)
    ds = pydicom.dcmread(dicom_files(folder)[0])
    assert ds.Modality == "CT" and ds.PixelPaddingValue == -2000 and ds.RescaleIntercept == -1024


def test_lung_volume_and_hu_match_the_phantom(chest):
    folder, truth = chest
    result = pp.preprocess(paths(folder), COARSE)
    assert result.status == "ok" and result.summary["qc_flags"] == []
    assert result.summary["lung_volume_ml"] == pytest.approx(truth["lung_volume_ml"], rel=0.03)
    kept = [c for c in result.metadata["lung"]["components"] if c["kept"]]
    assert len(kept) == 2  # the two separate lungs, not only the largest
    scale = SMALL["rows"] * SMALL["pixel_mm"] / phantom.NOMINAL_FOV_MM
    points = {
        "lung": ((-80.0 * scale, -50.0 * scale, 0.0), truth["hu"]["lung"]),
        "soft_tissue": ((-20.0 * scale, 40.0 * scale, 0.0), truth["hu"]["soft_tissue"]),
        "bone": ((0.0, 85.0 * scale, 0.0), truth["hu"]["bone"]),
        "air": ((0.0, -160.0 * scale, 0.0), truth["hu"]["air"]),
    }
    for name, (point, expected) in points.items():
        assert patient_point_hu(result.hu, result.affine_ras, point) == pytest.approx(
            expected, abs=12
        ), name
    assert result.summary["spacing_in"] == [8.0, 6.0, 6.0]
    assert result.summary["spacing_out"] == [6.0, 6.0, 6.0]


def test_affine_places_voxels_at_their_dicom_positions(chest):
    folder, truth = chest
    result = pp.preprocess(paths(folder), COARSE)
    lowest = min(
        dicom_files(folder), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    ipp = np.array(pydicom.dcmread(lowest).ImagePositionPatient, float)
    expected = np.diag([-6.0, -6.0, 6.0, 1.0])
    expected[:3, 3] = [-ipp[0], -ipp[1], ipp[2]]
    np.testing.assert_allclose(result.affine_ras, expected, atol=1e-6)


def test_shuffled_files_on_disk_give_the_same_volume(chest, tmp_path):
    folder, _ = chest
    files = dicom_files(folder)
    names = [f"x{i:03d}.dcm" for i in range(len(files))]
    random.Random(5).shuffle(names)
    numbers = list(range(1, len(files) + 1))
    random.Random(6).shuffle(numbers)
    for path, name, number in zip(files, names, numbers, strict=True):
        edited_copy(path, tmp_path / name, InstanceNumber=number)
    original = pp.preprocess(paths(folder), COARSE)
    shuffled = pp.preprocess(paths(tmp_path), COARSE)
    np.testing.assert_array_equal(shuffled.hu, original.hu)
    np.testing.assert_array_equal(shuffled.mask, original.mask)


@pytest.mark.parametrize("order", [1, 3])
def test_padding_never_leaks_into_the_volume(chest, order):
    folder, truth = chest
    result = pp.preprocess(
        paths(folder), {"spacing": [4.0, 4.0, 4.0], "interpolation_order": order}
    )
    # stored -2000 would be -3024 HU: nothing below the air floor may appear
    assert result.hu.min() >= hu.HU_FLOOR
    assert result.metadata["hu"]["padding_pixels"] > 0
    # outside the field of view (the padding) is exactly air
    to_patient = nifti.LPS_TO_RAS @ result.affine_ras
    ny, nx = result.hu.shape[1:]
    columns, rows = np.meshgrid(np.arange(nx), np.arange(ny))
    ijk = np.stack([columns.ravel(), rows.ravel(), np.zeros(columns.size), np.ones(columns.size)])
    x, y = (to_patient @ ijk)[:2]
    # beyond the interpolation's reach (cubic: two input pixels) from the field of view
    reach = 2 * SMALL["pixel_mm"] + 4.0
    outside = (np.hypot(x, y) > truth["fov_radius_mm"] + reach).reshape(ny, nx)
    assert outside.any()
    assert (result.hu[:, outside] == hu.AIR_HU).all()


def test_outputs_are_byte_identical_on_one_and_two_threads(chest, tmp_path):
    folder, _ = chest
    cfg = {**COARSE, "slices_png": {"enabled": True, "every_mm": 24}, "outputs": {"npz": True}}
    one = run_chain(folder, tmp_path / "one", cfg, threads=1)
    two = run_chain(folder, tmp_path / "two", cfg, threads=2)
    names = [a["name"] for a in one[0]["artifacts"] + one[1]["artifacts"]]
    assert "preprocess/arrays.npz" in names and any(n.startswith("patches/slices/") for n in names)
    for a, b in zip(
        one[0]["artifacts"] + one[1]["artifacts"],
        two[0]["artifacts"] + two[1]["artifacts"],
        strict=True,
    ):
        assert a["name"] == b["name"]
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes(), a["name"]


def test_patches_table_and_summary(chest, tmp_path):
    folder, _ = chest
    cfg = {**COARSE, "patches": {"size_mm": 48, "stride_mm": 24, "min_lung_fraction": 0.2}}
    pre, tiled = run_chain(folder, tmp_path, cfg)
    summary = tiled["summary"]
    assert summary["status"] == "ok" and 0 < summary["patches"] < summary["candidates"]
    # default: coordinates only, no patch array
    assert not (tmp_path / "patches/patches.npy").exists() and summary["dtype"] is None
    assert "patches/patches.npy" not in {a["name"] for a in tiled["artifacts"]}
    table = pd.read_parquet(tmp_path / "patches/patches.parquet")
    hu_cfg = {**cfg, "patches": {**cfg["patches"], "materialise": "hu"}}
    run_chain(folder, tmp_path / "hu", hu_cfg)
    array = np.load(tmp_path / "hu/patches/patches.npy", mmap_mode="r")
    assert array.shape == (summary["patches"], 8, 8, 8) and array.dtype == np.int16
    assert (table["lung_fraction"] >= 0.2).all() and table["patch"].tolist() == list(
        range(len(table))
    )
    volume, affine = nifti.read_nifti(tmp_path / "preprocess/volume.nii.gz")
    expected = volume
    for row in table.itertuples():
        if not row.padded:
            np.testing.assert_array_equal(
                array[row.patch], expected[row.z0 : row.z1, row.y0 : row.y1, row.x0 : row.x1]
            )
        centre = np.array([row.center_lps_x_mm, row.center_lps_y_mm, row.center_lps_z_mm])
        to_voxel = np.linalg.inv(nifti.LPS_TO_RAS @ affine)
        x, y, z = (to_voxel @ np.append(centre, 1.0))[:3]
        np.testing.assert_allclose(
            [z, y, x],
            [(row.z0 + row.z1 - 1) / 2, (row.y0 + row.y1 - 1) / 2, (row.x0 + row.x1 - 1) / 2],
            atol=1e-3,
        )
        assert [row.center_voxel_z, row.center_voxel_y, row.center_voxel_x] == [
            (row.z0 + row.z1 - 1) / 2,
            (row.y0 + row.y1 - 1) / 2,
            (row.x0 + row.x1 - 1) / 2,
        ]
    u8_cfg = {**cfg, "patches": {**cfg["patches"], "materialise": "uint8"}}
    run_chain(folder, tmp_path / "u8", u8_cfg)
    as_u8 = np.load(tmp_path / "u8/patches/patches.npy")
    assert as_u8.dtype == np.uint8
    np.testing.assert_array_equal(as_u8, tile.window_uint8(array, [-1000, 400]))
    assert as_u8[array <= -1000].max() == 0 and as_u8.max() > 0


def test_no_lungs_gives_zero_patches_with_that_status(tmp_path):
    folder = tmp_path / "nolungs"
    phantom.write_chest_phantom(folder, **SMALL, lungs=False)
    pre, tiled = run_chain(folder, tmp_path / "out")
    assert pre["summary"]["status"] == "no_lungs" and pre["summary"]["lung_volume_ml"] == 0
    assert "no_lungs" in pre["summary"]["qc_flags"]
    assert tiled["summary"]["status"] == "no_lungs"
    assert tiled["summary"]["patches"] == 0 and tiled["summary"]["candidates"] == 0
    assert not (tmp_path / "out/patches/patches.npy").exists()
    assert len(pd.read_parquet(tmp_path / "out/patches/patches.parquet")) == 0


def test_crop_to_the_lungs_keeps_geometry(chest):
    folder, _ = chest
    full = pp.preprocess(paths(folder), COARSE)
    cropped = pp.preprocess(paths(folder), {**COARSE, "crop": {"enabled": True, "margin_mm": 12}})
    box = cropped.metadata["geometry"]["crop_box"]
    region = tuple(slice(a, b) for a, b in zip(box["start"], box["stop"], strict=True))
    np.testing.assert_array_equal(cropped.hu, full.hu[region])
    assert cropped.mask.sum() == full.mask.sum()
    moved = full.affine_ras @ np.array([box["start"][2], box["start"][1], box["start"][0], 1.0])
    np.testing.assert_allclose(cropped.affine_ras[:, 3], moved)


def test_no_identifiers_in_outputs_or_logs_unless_asked(chest, tmp_path, caplog):
    folder, truth = chest
    ds = pydicom.dcmread(dicom_files(folder)[0])
    secrets = [*truth["identifiers"].values(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    with caplog.at_level(logging.DEBUG):
        run_chain(folder, tmp_path / "plain", {**COARSE, "slices_png": {"enabled": True}})
    outputs = [p for p in (tmp_path / "plain").rglob("*") if p.is_file()]
    text = b"".join(p.read_bytes() for p in outputs if not p.name.endswith(".nii.gz"))
    text += b"".join(
        gzip.decompress(p.read_bytes())[:352] for p in outputs if p.name.endswith(".nii.gz")
    )
    for secret in secrets:
        assert secret.encode() not in text, secret
        assert secret not in caplog.text, secret
    run_chain(folder, tmp_path / "with", include_identifiers=True)
    metadata = json.loads((tmp_path / "with/preprocess/metadata.json").read_text())
    assert metadata["identifiers"]["PatientID"] == truth["identifiers"]["PatientID"]
    assert metadata["series"]["series_uid"] == str(ds.SeriesInstanceUID)


def test_shipped_config_ct_section_is_the_schema_defaults():
    config = yaml.safe_load((REPO / "config.yaml").read_text())["ct"]
    assert config == config_defaults("ct") == settings.DEFAULTS.as_dict()
    assert settings.ct_settings(config) == settings.ct_settings(None) == settings.DEFAULTS


def test_ct_settings_reject_unknown_keys_and_values_beyond_the_schema_in_one_line():
    with pytest.raises(ValueError) as error:
        settings.ct_settings({"lung": {"closing_radius": 10}})
    assert str(error.value).startswith("unknown key 'closing_radius' under ct.lung (did you")
    with pytest.raises(ValueError, match=r"^unknown key 'patch' under ct \(did you mean"):
        settings.ct_settings({"patch": {}})
    with pytest.raises(ValueError, match=r"^ct\.patches\.materialise: 'float' is not one of"):
        settings.ct_settings({"patches": {"materialise": "float"}})
    partial = settings.ct_settings({"lung": {"dilation_mm": 2}})
    assert partial.lung.dilation_mm == 2
    assert partial.lung.grid_mm == config_defaults("ct", "lung", "grid_mm")
    lung = settings.lung_settings(partial, x_towards_left=False)
    assert lung.dilation_mm == 2.0 and not lung.x_towards_left
    assert "x_towards_left" not in lung.as_dict()  # from the scan, not a config key


# ---------- the rule scripts, with a stand-in for Snakemake's `snakemake` object ----------


def smk(rule, tmp_path, *, inputs, outputs, params, threads=1):
    class Named(SimpleNamespace):
        def items(self):
            return vars(self).items()

        def get(self, key, default=None):  # as snakemake.io.Namedlist.get
            return vars(self).get(key, default)

    return SimpleNamespace(
        rule=rule,
        input=Named(**inputs),
        output=Named(**outputs),
        params=Named(**params),
        wildcards=Named(sample="S1"),
        log=[str(tmp_path / f"logs/{rule}.log")],
        threads=threads,
    )


def run_script(name, snakemake_object, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name])
    runpy.run_path(
        str(REPO / "scripts" / name),
        init_globals={"snakemake": snakemake_object},
        run_name="__main__",
    )


def test_rule_scripts_write_manifests_and_fail_in_one_line(tmp_path, monkeypatch, capsys):
    series_dir = tmp_path / "input"
    shutil.copytree(CT_3SLICE, series_dir)
    (series_dir / "DICOMDIR.txt").write_text("junk\n")
    files = [
        {"path": str(p), "key": p.name, "bytes": p.stat().st_size}
        for p in sorted(series_dir.iterdir())
    ]
    download = tmp_path / "results/ct/S1/download.json"
    download.parent.mkdir(parents=True)
    download.write_text(json.dumps({"format": 1, "sample": "S1", "files": files}))
    base = tmp_path / "results/ct/S1"
    pre_out = {
        "metadata": str(base / "preprocess/metadata.json"),
        "qc": str(base / "preprocess/qc.png"),
        "manifest": str(base / "preprocess.json"),
    }
    params = {
        # working files: params, not outputs (removed after upload; see medprep.workflow.working_files)
        "volume": str(base / "preprocess/volume.nii.gz"),
        "mask": str(base / "preprocess/lung_mask.nii.gz"),
        "settings": {**COARSE, "spacing": [1.0, 1.0, 1.0]},
        "series_uid": None,
        "include_identifiers": False,
    }
    run_script(
        "preprocess_ct.py",
        smk(
            "preprocess_ct",
            tmp_path,
            inputs={"manifest": str(download)},
            outputs=pre_out,
            params=params,
            threads=2,
        ),
        monkeypatch,
        tmp_path,
    )
    manifest = read_step_manifest(base / "preprocess.json")
    assert manifest["step"] == "preprocess" and manifest["sample"] == "S1"
    assert {a["name"] for a in manifest["artifacts"]} == {
        "preprocess/volume.nii.gz",
        "preprocess/lung_mask.nii.gz",
        "preprocess/metadata.json",
        "preprocess/qc.png",
    }
    summary = manifest["summary"]
    assert {
        "status",
        "warnings",
        "lung_volume_ml",
        "spacing_in",
        "spacing_out",
        "shape_out",
        "qc_flags",
    } <= set(summary)
    tile_out = {
        "table": str(base / "patches/patches.parquet"),
        "summary": str(base / "patches/summary.json"),
        "manifest": str(base / "tile.json"),
    }
    tile_params = {
        "patches": str(base / "patches/patches.npy"),
        "settings": {"slices_png": {"enabled": True}, "patches": {"size_mm": 16, "stride_mm": 16}},
    }
    run_script(
        "tile_ct.py",
        smk(
            "tile_ct",
            tmp_path,
            inputs={"preprocess": str(base / "preprocess.json")},
            outputs=tile_out,
            params=tile_params,
        ),
        monkeypatch,
        tmp_path,
    )
    tiled = read_step_manifest(base / "tile.json")
    assert tiled["summary"]["patches"] > 0 and {
        "patches",
        "candidates",
        "status",
        "warnings",
    } <= set(tiled["summary"])
    assert sum(a["name"].startswith("patches/slices/slice_") for a in tiled["artifacts"]) == 3

    # bad input: an MR series given as CT
    for path in dicom_files(CT_3SLICE):
        edited_copy(path, series_dir / path.name, Modality="MR")
    with pytest.raises(SystemExit) as exit_code:
        run_script(
            "preprocess_ct.py",
            smk(
                "preprocess_ct",
                tmp_path,
                inputs={"manifest": str(download)},
                outputs=pre_out,
                params=params,
            ),
            monkeypatch,
            tmp_path,
        )
    assert exit_code.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("medprep error: sample S1: file ") and "3 modality MR (not CT)" in line
    record = json.loads((tmp_path / "logs/failures/S1.preprocess.json").read_text())
    assert record["step"] == "preprocess" and "modality MR" in record["cause"]


def test_demo_sized_phantom_is_fast_to_write_and_real_dicom(tmp_path):
    truth = phantom.write_chest_phantom(
        tmp_path, rows=32, cols=32, slices=6, pixel_mm=12, slice_mm=40, bronchi=True
    )
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in dicom_files(tmp_path))).hexdigest()
    again = phantom.write_chest_phantom(
        tmp_path / "again", rows=32, cols=32, slices=6, pixel_mm=12, slice_mm=40, bronchi=True
    )
    assert (
        digest
        == hashlib.sha256(
            b"".join(p.read_bytes() for p in dicom_files(tmp_path / "again"))
        ).hexdigest()
    )
    assert truth["lung_volume_ml"] == again["lung_volume_ml"] > 0
