"""The dataset index: patient-level splits, the tables of a real run, the readers
(local and a real S3 server), the WebDataset view of the shards, and the example of docs/training-data.md."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SAMPLES
from dataset_support import write_cohort
from workflow_support import REPO, published_file, run_snakemake, write_config

from medprep.ct import nifti
from medprep.data import DatasetNotReady, open_dataset, splits
from medprep.data import index as dataset

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


# --- splits -----------------------------------------------------------------------------


def test_adding_patients_moves_nobody_and_the_seed_reshuffles():
    first = splits.assign([f"P{i}" for i in range(2000)], FRACTIONS, seed=3)
    more = splits.assign([f"Q{i}" for i in range(500)] + list(first), FRACTIONS, seed=3)
    assert {p: more[p] for p in first} == first
    other_seed = splits.assign(list(first), FRACTIONS, seed=4)
    assert sum(other_seed[p] != first[p] for p in first) > 500


def test_split_shares_per_label_stay_within_the_stated_tolerance():
    rng = np.random.default_rng(0)
    labels = rng.choice(["0", "1", "LUAD"], size=6000, p=[0.6, 0.3, 0.1])
    patients = [f"patient-{i}" for i in range(6000)]
    assigned = splits.assign(patients, FRACTIONS, seed=0)
    balance = splits.balance(
        ((p, lab, assigned[p]) for p, lab in zip(patients, labels, strict=True)), FRACTIONS
    )
    assert set(balance) == {"0", "1", "LUAD"}
    for label, entry in balance.items():
        for name, fraction in FRACTIONS.items():
            deviation = abs(entry["share"][name] - fraction)
            assert deviation <= entry["tolerance_p999"][name], (label, name, entry)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        splits.check_fractions({"train": 0.8, "test": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        splits.check_fractions({"train": 1.2, "test": -0.2})


def test_index_keeps_each_patient_in_one_split_and_adding_samples_moves_nobody(tmp_path):
    # 300 patients with 1 to 4 samples each, both modalities
    rows = []
    for p in range(300):
        for k in range(1 + p % 4):
            modality = "wsi" if (p + k) % 2 else "ct"
            rows.append((f"S{p}-{k}", modality, f"pat-{p}", str(p % 2)))
    entries = write_cohort(tmp_path / "results", rows, tiles=20, patches=10)
    manifest = dataset.build(entries[:500], tmp_path / "one", fractions=FRACTIONS, seed=0)
    samples = pd.read_parquet(tmp_path / "one/samples.parquet")
    tiles = pd.read_parquet(tmp_path / "one/tiles.parquet")
    patches = pd.read_parquet(tmp_path / "one/patches.parquet")
    for table in (samples, tiles, patches):
        assert (table.groupby("patient")["split"].nunique() == 1).all()
    per_sample = pd.concat([tiles[["sample", "split"]], patches[["sample", "split"]]])
    assert (per_sample.groupby("sample")["split"].nunique() == 1).all()
    assert manifest["counts"]["tiles"] == len(tiles) == 20 * (samples["modality"] == "wsi").sum()
    assert set(tiles["meta_site"]) == {"A", "B"} and tiles["label"].notna().all()
    assert tiles["file"].str.match(r"^wsi/S\d+-\d/tiles/pixels/shard-\d{6}\.tar$").all()
    assert patches["volume"].str.match(r"^ct/S\d+-\d/preprocess/volume\.nii\.gz$").all()
    # every sample, then again with the rest of the cohort added: nobody moves
    dataset.build(entries, tmp_path / "all", fractions=FRACTIONS, seed=0)
    bigger = pd.read_parquet(tmp_path / "all/samples.parquet").set_index("sample")["split"]
    before = samples.set_index("sample")["split"]
    assert bigger.loc[before.index].equals(before)
    assert len(bigger) == len(entries) > len(before)


def test_a_sample_without_patient_is_its_own_group(tmp_path):
    entries = write_cohort(tmp_path, [("A", "wsi", None, None), ("B", "wsi", None, "1")])
    dataset.build(entries, tmp_path / "out")
    samples = pd.read_parquet(tmp_path / "out/samples.parquet")
    assert samples["patient"].tolist() == ["A", "B"]
    assert samples["label"].isna().tolist() == [True, False] and samples["label"][1] == "1"


# --- a real run ---------------------------------------------------------------------------

GROUPS = {  # label, patient (P1: a CT scan and a slide of one patient)
    "phantom-chest-01": ("1", "P1"),
    "real-dcmqi-3slice": ("0", "P3"),
    "synthetic-01": ("1", "P1"),
    "CMU-1-Small-Region": ("0", "P2"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    workdir = tmp_path_factory.mktemp("dataset-run")
    shutil.copytree(tiny_data, workdir / "data")
    lines = ["sample\tmodality\turi\tlabel\tpatient\tmeta_site"]
    for sample, modality, uri in TINY_SAMPLES:
        lines.append("\t".join((sample, modality, uri, *GROUPS[sample], "leeds")))
    (workdir / "samples.tsv").write_text("\n".join(lines) + "\n")
    write_config(workdir)
    run_snakemake(workdir)
    return workdir


def test_the_run_publishes_the_index_with_labels_and_patient_splits(run):
    folder = run / "published" / "dataset" / "samples"  # the run of samples.tsv
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == set(dataset.FILES)
    samples = pd.read_parquet(published_file(folder, "samples.parquet")).set_index("sample")
    assert samples["label"].to_dict() == {s: g[0] for s, g in GROUPS.items()}
    assert samples.loc["phantom-chest-01", "split"] == samples.loc["synthetic-01", "split"]
    tiles = pd.read_parquet(published_file(folder, "tiles.parquet"))
    patches = pd.read_parquet(published_file(folder, "patches.parquet"))
    for modality, table, column in (("wsi", tiles, "tiles"), ("ct", patches, "patches")):
        for sample in samples.index[samples["modality"] == modality]:
            own = json.loads((run / "published" / modality / sample / "manifest.json").read_text())
            assert (table["sample"] == sample).sum() == own["steps"]["tile"][column]
            assert samples.loc[sample, column] == own["steps"]["tile"][column]
    assert (tiles["meta_site"] == "leeds").all() and set(tiles["patient"]) == {"P1", "P2"}
    # every column of the per-sample tables, QC scores and artifact flags included
    published_tiles = pd.read_parquet(
        published_file(run / "published" / "wsi" / tiles["sample"].iloc[0], "tiles/tiles.parquet")
    )
    assert set(published_tiles.columns) - {"sample"} <= set(tiles.columns)
    assert {"sharpness", "pen_fraction", "fold_fraction", "gap_fraction"} <= set(tiles.columns)
    for name in set(tiles["file"]) | set(patches["volume"]):
        assert (run / "published" / name).is_file(), name
    # the index points at each sample's version folder, as its manifest.json does
    for sample, row in samples.iterrows():
        own = json.loads(
            (run / "published" / row["modality"] / sample / "manifest.json").read_text()
        )
        assert row["publication"] == f"{row['modality']}/{sample}/{own['version']}"
    cohort = pd.read_csv(run / "results/cohort/samples/cohort.csv", dtype=str).set_index("sample")
    assert cohort["patient"].to_dict() == {s: g[1] for s, g in GROUPS.items()}
    assert (cohort["meta_site"] == "leeds").all()
    # no patient value in any log
    for log in (run / "logs").rglob("*.log"):
        text = log.read_text()
        assert not re.search(r"\bP[123]\b", text), log


def test_tile_pixels_agree_with_the_shard_and_webdataset(run):
    wds = pytest.importorskip("webdataset")
    ds = open_dataset(run / "published")
    tiles = ds.tiles.table
    shard = tiles["file"].iloc[0]
    rows = tiles.index[tiles["file"] == shard]
    with tarfile.open(run / "published" / shard) as tar:
        for i in rows[:5]:
            array, row = ds.tiles[i]
            member = tar.getmember(row["member"])
            assert member.offset_data == row["offset"] and member.size == row["nbytes"]
            assert array.shape == (128, 128, 3) and array.dtype == np.uint8
    from PIL import Image

    seen = 0
    by_key = {Path(m).stem: i for m, i in zip(tiles["member"], tiles.index, strict=True)}
    dataset_wds = wds.WebDataset(str(run / "published" / shard), shardshuffle=False)
    for sample in dataset_wds:
        array, row = ds.tiles[by_key[sample["__key__"]]]
        decoded = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        np.testing.assert_array_equal(decoded, array)
        seen += 1
    assert seen == len(rows)


def test_ct_patches_are_cut_from_the_volume_and_outputs_are_compact(run):
    ds = open_dataset(run / "published")
    volume, affine = nifti.read_nifti(
        published_file(run / "published/ct/phantom-chest-01", "preprocess/volume.nii.gz")
    )
    table = ds.patches.table
    assert len(table) and table["array"].isna().all()
    for i in table.index[(table["sample"] == "phantom-chest-01") & ~table["padded"]][:5]:
        patch, row = ds.patches[i]
        box = volume[row["z0"] : row["z1"], row["y0"] : row["y1"], row["x0"] : row["x1"]]
        np.testing.assert_array_equal(patch, box)
        assert patch.dtype == np.int16
        world = nifti.LPS_TO_RAS @ affine @ [
            row["center_voxel_x"], row["center_voxel_y"], row["center_voxel_z"], 1.0
        ]  # fmt: skip
        np.testing.assert_allclose(
            world[:3],
            [row["center_lps_x_mm"], row["center_lps_y_mm"], row["center_lps_z_mm"]],
            atol=1e-3,
        )
    # the default outputs of a scan: at most 1.5x its gzipped int16 volume
    import gzip

    published = run / "published/ct/phantom-chest-01"
    total = sum(p.stat().st_size for p in published.rglob("*") if p.is_file())
    gzipped = len(gzip.compress(np.ascontiguousarray(volume, np.int16).tobytes(), 6))
    assert total <= 1.5 * gzipped, (total, gzipped)
    assert not list(published.rglob("*.npy"))


def test_split_filter_and_a_missing_dataset(run, tmp_path):
    train = open_dataset(run / "published", split="train")
    every = open_dataset(run / "published")
    assert set(train.tiles.table["split"]) <= {"train"}
    assert len(train.tiles) + len(open_dataset(run / "published", split="val").tiles) + len(
        open_dataset(run / "published", split="test").tiles
    ) == len(every.tiles)
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset(run / "published", split="holdout")
    with pytest.raises(DatasetNotReady):
        open_dataset(tmp_path)


def test_a_rerun_does_nothing_and_a_new_label_rebuilds_only_the_index(run):
    again = run_snakemake(run)
    assert not again.ran() and "rule dataset" not in again.stderr
    sheet = run / "samples.tsv"
    original = sheet.read_text()
    try:
        sheet.write_text(original.replace("\t1\tP1\t", "\t2\tP1\t", 1))
        relabel = run_snakemake(run)
        assert "rule dataset" in relabel.stderr and not relabel.ran()
        samples = pd.read_parquet(
            published_file(run / "published/dataset/samples", "samples.parquet")
        )
        assert "2" in set(samples["label"])
    finally:
        sheet.write_text(original)
        run_snakemake(run)


# --- S3 -------------------------------------------------------------------------------------


@pytest.fixture
def s3(moto_server, tmp_path, monkeypatch):
    """Storage settings for a fresh bucket: (settings, bucket, credentials)."""
    from s3_support import create_bucket, use_test_credentials

    from medprep import storage

    credentials = use_test_credentials(tmp_path, monkeypatch)
    bucket = create_bucket(moto_server, credentials)
    yield {"endpoint_url": moto_server.url, "region": "us-east-1"}, bucket, credentials
    storage.clear_caches()


def test_the_index_publishes_to_s3_and_reads_back_like_the_local_one(run, s3):
    from s3_support import raw_client

    s3, bucket, credentials = s3
    local = run / "published"
    client = raw_client(s3["endpoint_url"], credentials)
    for path in sorted(local.rglob("*")):  # the samples as upload published them
        if path.is_file() and "dataset" not in path.parts:
            client.upload_file(str(path), bucket, f"out/{path.relative_to(local).as_posix()}")
    files = {n: str(published_file(local / "dataset" / "samples", n)) for n in dataset.FILES}
    manifest = json.loads((local / "dataset/samples/manifest.json").read_text())
    dataset.publish(files, f"s3://{bucket}/out/dataset/samples", manifest, settings=s3)
    remote = open_dataset(f"s3://{bucket}/out", settings=s3)
    here = open_dataset(local)
    assert len(remote.tiles) == len(here.tiles) and len(remote.patches) == len(here.patches)
    for i in (0, len(here.tiles) // 2, len(here.tiles) - 1):
        np.testing.assert_array_equal(remote.tiles[i][0], here.tiles[i][0])
    for i in (0, len(here.patches) - 1):
        np.testing.assert_array_equal(remote.patches[i][0], here.patches[i][0])


def test_materialised_patches_are_read_by_range_on_s3(tmp_path, s3):
    from medprep import storage
    from medprep.data import Dataset, Patches

    s3, bucket, _ = s3
    array = np.arange(3 * 4 * 5 * 6, dtype=np.int16).reshape(3, 4, 5, 6)
    np.save(tmp_path / "patches.npy", array)
    receipt = storage.publish(
        [{"name": "patches.npy", "path": str(tmp_path / "patches.npy")}],
        f"s3://{bucket}/npy",
        manifest={},
        settings=s3,
    )
    remote = f"npy/{receipt['files'][0]['path']}"
    ds = Dataset.__new__(Dataset)  # only the storage side: no tables
    ds.destination, ds.settings = f"s3://{bucket}", s3
    patches = Patches(ds, pd.DataFrame(), 1)
    np.testing.assert_array_equal(patches._materialised(remote, 2), array[2])
    local = Dataset.__new__(Dataset)
    local.destination, local.settings = str(tmp_path), {}
    (tmp_path / "npy").mkdir()
    shutil.copy(tmp_path / "patches.npy", tmp_path / "npy" / "patches.npy")
    np.testing.assert_array_equal(
        Patches(local, pd.DataFrame(), 1)._materialised("npy/patches.npy", 1), array[1]
    )


# --- torch and the example of docs/training-data.md --------------------------------------------------------


def test_torch_datasets(run):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    from medprep.data.torch import IterableDataset, MapDataset

    ds = open_dataset(run / "published")
    images, labels = next(iter(torch.utils.data.DataLoader(MapDataset(ds.tiles), batch_size=4)))
    assert images.shape == (4, 3, 128, 128) and len(labels) == 4
    streamed = list(
        torch.utils.data.DataLoader(IterableDataset(ds.patches), batch_size=None, num_workers=2)
    )
    assert len(streamed) == len(ds.patches)


def readme_example() -> str:
    section = (REPO / "docs" / "training-data.md").read_text()
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_runs(run, monkeypatch):
    code = readme_example()
    assert 'open_dataset("results/published"' in code
    monkeypatch.chdir(run)
    (run / "results").mkdir(exist_ok=True)
    if not (run / "results/published").exists():
        (run / "results/published").symlink_to(run / "published")
    namespace: dict = {}
    exec(compile(code, "docs/training-data.md", "exec"), namespace)
    assert len(namespace["batch"]) > 0


# --- interop and stain: the datalist, the patch coordinates and the docs' examples -------


def docs_examples(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / page).read_text(), re.S)


def run_in(run, monkeypatch, code: str, name: str) -> dict:
    monkeypatch.chdir(run)
    (run / "results").mkdir(exist_ok=True)
    if not (run / "results/published").exists():
        (run / "results/published").symlink_to(run / "published")
    namespace: dict = {}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_the_datalist_follows_the_index_splits_and_every_path_exists(run):
    datalist = published_file(run / "published" / "dataset" / "samples", "datalist.json")
    folder = datalist.parent  # the index's version folder: the items are relative to it
    lists = json.loads(datalist.read_text())
    samples = pd.read_parquet(folder / "samples.parquet").set_index("sample")
    names = {"train": "training", "val": "validation", "test": "test"}
    ct = samples[samples["modality"] == "ct"]
    assert {s: names[split] for s, split in ct["split"].items()} == {
        item["sample"]: key for key, items in lists.items() for item in items
    }
    for items in lists.values():
        for item in items:
            assert item["label"] == GROUPS[item["sample"]][0]
            for key in ("image", "lung_mask"):
                assert (folder / item[key]).resolve().is_file(), item[key]
            volume, _ = nifti.read_nifti(folder / item["image"])
            mask, _ = nifti.read_nifti(folder / item["lung_mask"])
            assert volume.shape == mask.shape


def test_the_monai_example_loads_the_datalist(run, monkeypatch):
    pytest.importorskip("monai", reason="MONAI is not installed (optional; it pulls torch)")
    (code,) = [c for c in docs_examples("interop.md") if "monai" in c]
    namespace = run_in(run, monkeypatch, code, "docs/interop.md")
    item = namespace["item"]
    assert tuple(item["image"].shape) == tuple(item["lung_mask"].shape)
    assert item["label"] == "1"


def test_the_patch_coordinates_example_reads_the_published_file(run, monkeypatch):
    (code,) = [c for c in docs_examples("interop.md") if "h5py" in c]
    namespace = run_in(run, monkeypatch, code, "docs/interop.md")
    sample = run / "published/wsi/CMU-1-Small-Region"
    tiles = pd.read_parquet(published_file(sample, "tiles/tiles.parquet"))
    np.testing.assert_array_equal(namespace["coords"], tiles[["x", "y"]].to_numpy())
    assert abs(namespace["box"] - tiles["width_l0"].iloc[0]) <= 0.01 * tiles["width_l0"].iloc[0]


def test_the_stain_example_runs_and_normalises(run, monkeypatch):
    (code,) = docs_examples("stain.md")
    namespace = run_in(run, monkeypatch, code, "docs/stain.md")
    tile, row = namespace["normalised"].tiles[0]
    assert row["stain"] == "normalised" and tile.shape == (128, 128, 3)
    samples = namespace["normalised"].samples.set_index("sample")
    assert (samples.loc[["synthetic-01", "CMU-1-Small-Region"], "stain_status"] == "ok").all()
    assert namespace["augmented"].tiles.epoch == 1
