"""Region labels of slide tiles from GeoJSON annotations (medprep.wsi.labels), on the real
CMU slide: the tiles' class shares are checked against an independent point-sampling
reference (numpy even-odd ray casting, not shapely), through run_tile, the rule script
and the dataset index."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wsi_support
from wsi_support import CMU, outputs, preprocess, write_download

from medprep.common import atomic
from medprep.common.errors import InputError
from medprep.data import index as dataset
from medprep.workflow import manifest as manifest_module
from medprep.wsi import labels, steps, writers

REPO = Path(__file__).resolve().parents[2]

# CMU-1-Small-Region is 2220 x 2967 level-0 pixels at 0.499 um/px: at 0.5 um/px tiles of
# 256 output pixels are 256 x 256 level-0 pixels, an 8 x 11 grid (min_tissue 0: all).
TUMOUR = [[100, 150], [1500, 80], [1900, 900], [1100, 1700], [200, 1300], [100, 150]]
HOLE = [[520, 520], [1300, 520], [1300, 1100], [520, 1100], [520, 520]]
NECROSIS = [[250, 250], [515, 250], [515, 515], [250, 515], [250, 250]]  # inside TUMOUR
STROMA = [
    [[300, 1900], [1000, 1900], [650, 2600], [300, 1900]],
    [[1300, 2000], [2150, 2100], [2050, 2800], [1350, 2700], [1300, 2000]],
]
RED = [200, 0, 0]


def feature(geometry: dict, **properties) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def qupath_class(name: str, colour: list[int] | None = None) -> dict:
    return {"classification": {"name": name, **({"color": colour} if colour else {})}}


def collection(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def two_classes() -> dict:
    """Tumour (QuPath class with colour, a hole), necrosis on top of it (drawn before it in
    the file: the smaller is on top whatever the order), stroma (properties.name only, a
    MultiPolygon of two parts)."""
    return collection(
        feature({"type": "Polygon", "coordinates": [NECROSIS]}, **qupath_class("Necrosis")),
        feature({"type": "Polygon", "coordinates": [TUMOUR, HOLE]}, **qupath_class("Tumor", RED)),
        feature({"type": "MultiPolygon", "coordinates": [[p] for p in STROMA]}, name="Stroma"),
    )


def inside(points: np.ndarray, ring: list[list[float]]) -> np.ndarray:
    """Even-odd ray casting: which points are inside the closed ring."""
    ring = np.asarray(ring, dtype=np.float64)
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0, x1, y1 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return ((crosses & (x < at)).sum(axis=1) % 2).astype(bool)


# Reference shares from an n x n grid of sample points per tile (cell centres). Each
# polygon edge crossing a tile misclassifies at most half a cell per column (or row) of
# cells it crosses, so an edge errs by at most 0.5 / n of the tile area: with n = 128 and
# at most 3 edges through one tile of these polygons, 3 * 0.5 / 128 = 1.2%; TOLERANCE is
# 0.015. (The engine's areas are exact; this bounds the reference's error.)
SAMPLES = 128
TOLERANCE = 0.015


def reference_shares(x: float, y: float, side: float) -> dict[str, float]:
    offsets = (np.arange(SAMPLES) + 0.5) * side / SAMPLES
    gx, gy = np.meshgrid(x + offsets, y + offsets)
    points = np.column_stack([gx.ravel(), gy.ravel()])
    necrosis = inside(points, NECROSIS)
    tumour = inside(points, TUMOUR) & ~inside(points, HOLE) & ~necrosis
    stroma = (inside(points, STROMA[0]) | inside(points, STROMA[1])) & ~necrosis & ~tumour
    shares = {"Necrosis": necrosis.mean(), "Tumor": tumour.mean(), "Stroma": stroma.mean()}
    shares["background"] = 1.0 - sum(shares.values())
    return shares


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labels") / "CMU"
    preprocess(folder, CMU)
    return folder


def write_annotations(folder: Path, document, name: str = "regions.geojson") -> Path:
    """The annotation file and the download-style manifest that lists it."""
    path = folder / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(document, str | bytes):
        path.write_bytes(document.encode() if isinstance(document, str) else document)
    else:
        atomic.write_json(path, document)
    manifest = folder / "annotations.json"
    atomic.write_json(
        manifest,
        {
            "format": 1,
            "sample": folder.name,
            "step": "download",
            "files": [{"path": str(path), "key": path.name, "bytes": path.stat().st_size}],
            "artifacts": [],
            "summary": {},
        },
    )
    return manifest


def run_tile(folder: Path, annotations: Path | None, **tile) -> tuple[pd.DataFrame, dict]:
    out = outputs(folder)
    tile.setdefault("min_tissue", 0.0)
    tile.setdefault("container", "coords")
    wsi_support.tile(folder, annotations_manifest=annotations, **tile)
    return writers.read_table(out["table"]), atomic.read_json(out["tile_summary"])


def copy_sample(preprocessed: Path, tmp_path: Path, name: str = "CMU") -> Path:
    folder = tmp_path / name
    shutil.copytree(preprocessed, folder)
    return folder


def test_tile_labels_match_the_polygons(preprocessed, tmp_path):
    folder = copy_sample(preprocessed, tmp_path)
    manifest = write_annotations(folder, two_classes())
    table, summary = run_tile(folder, manifest, labels={"class_fractions": True})
    assert len(table) == 88  # the whole 8 x 11 grid
    assert summary["labels"]["classes"] == ["Necrosis", "Tumor", "Stroma"]

    full, straddling = {}, 0
    for row in table.itertuples():
        assert row.width_l0 == 256
        expected = reference_shares(row.x, row.y, row.width_l0)
        for name, share in expected.items():
            assert getattr(row, f"label_fraction_{name}") == pytest.approx(share, abs=TOLERANCE)
        ranked = sorted(expected.values(), reverse=True)
        if ranked[0] - ranked[1] > 2 * TOLERANCE:
            assert row.label == max(expected, key=expected.get)
        assert row.label_fraction == getattr(row, f"label_fraction_{row.label}")
        for name, share in expected.items():
            if share == 1.0:  # every sample point inside: the tile lies wholly in it
                full.setdefault(name, []).append((row.x, row.y))
                assert row.label == name
                assert row.label_fraction == pytest.approx(1.0, abs=1e-9)
        straddling += any(0.05 < share < 0.95 for share in expected.values())
    # what the polygons were drawn for: tiles wholly in each class, one in the tumour's hole
    # (background), one in each part of the MultiPolygon, and many across borders
    assert {"Necrosis", "Tumor", "Stroma", "background"} <= set(full)
    assert (256, 256) in full["Necrosis"]  # necrosis is on top of the tumour
    assert (768, 768) in full["background"]  # the hole
    assert (512, 2048) in full["Stroma"] and (1536, 2304) in full["Stroma"]
    assert straddling >= 15


def test_overlap_rule_and_multipolygon_parts():
    """Smaller on top whatever the order; equal areas: the later feature on top."""
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    small = [[25, 25], [75, 25], [75, 75], [25, 75], [25, 25]]
    big = {"type": "Polygon", "coordinates": [square]}
    inner = {"type": "Polygon", "coordinates": [small]}
    for features in (
        [feature(big, name="A"), feature(inner, name="B")],
        [feature(inner, name="B"), feature(big, name="A")],
    ):
        regions, _ = labels.parse_features(collection(*features))
        shares = labels.box_fractions(labels.build(regions), [0], [0], 100, 100)
        got = dict(zip(labels.build(regions).classes, shares[:, 0], strict=True))
        assert got == pytest.approx({"A": 0.75, "B": 0.25})
    regions, _ = labels.parse_features(collection(feature(big, name="A"), feature(big, name="C")))
    annotations = labels.build(regions)
    assert labels.box_fractions(annotations, [0], [0], 100, 100)[:, 0].tolist() == [0.0, 1.0]


def test_background_label_and_annotated_only(preprocessed, tmp_path):
    folder = copy_sample(preprocessed, tmp_path)
    manifest = write_annotations(folder, two_classes())
    everything, _ = run_tile(folder, manifest, labels={"background": "other"})
    assert "label_fraction_Tumor" not in everything  # class_fractions off by default
    annotated = everything[everything.label != "other"]
    assert 0 < len(annotated) < len(everything)
    assert (everything[everything.label == "other"].label_fraction >= 0.5 - 1e-9).all()

    kept, summary = run_tile(folder, manifest, annotated_only=True)
    assert set(kept.label) == {"Necrosis", "Tumor", "Stroma"}
    assert sorted(zip(kept.x, kept.y, strict=True)) == sorted(
        zip(annotated.x, annotated.y, strict=True)
    )
    assert (
        kept.set_index(["x", "y"]).label.to_dict()
        == annotated.set_index(["x", "y"]).label.to_dict()
    )
    assert summary["labels"]["unannotated_dropped"] == len(everything) - len(annotated)
    assert summary["candidates"] == len(annotated)  # the dropped ones were never read
    assert summary["labels"]["tiles"] == kept.label.value_counts().to_dict()


def test_without_annotations_no_label_columns(preprocessed, tmp_path):
    folder = copy_sample(preprocessed, tmp_path)
    table, summary = run_tile(folder, None, annotated_only=True)
    assert len(table) == 88
    assert not [c for c in table if c.startswith("label")]
    assert "labels" not in summary


def test_overlay_draws_annotations_in_class_colours(preprocessed, tmp_path):
    folder = copy_sample(preprocessed, tmp_path)
    before = steps.read_png(outputs(folder)["thumbnail"])
    run_tile(folder, write_annotations(folder, two_classes()))
    overlay = steps.read_png(outputs(folder)["overlay"])[..., :3]
    annotations = labels.read_annotations(folder / "annotations" / "regions.geojson")
    assert annotations.colours["Tumor"] == tuple(RED)  # QuPath's colour
    assert annotations.colours["Stroma"] in labels.PALETTE  # none given: the palette
    for colour in annotations.colours.values():
        drawn = (overlay == np.array(colour, dtype=np.uint8)).all(axis=-1).sum()
        present = (before[..., :3] == np.array(colour, dtype=np.uint8)).all(axis=-1).sum()
        assert drawn > 100 * (present + 1), colour


BOWTIE = [[0, 0], [1000, 1000], [1000, 0], [0, 1000], [0, 0]]  # a figure eight
SPIKE = [[0, 0], [1000, 0], [1000, 1000], [500, 1000], [500, 1400], [500, 1000], [0, 1000], [0, 0]]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ('{"type": "FeatureCollection", "features": [', "not valid JSON (line 1"),
        (b"\xff\xfe\x00binary", "not a GeoJSON file (not UTF-8 text)"),
        ({"type": "Topology"}, "not a GeoJSON FeatureCollection"),
        (collection(), "no Polygon or MultiPolygon annotation"),
        (
            collection(
                feature({"type": "Polygon", "coordinates": [NECROSIS]}, name="A"),
                feature({"type": "Polygon", "coordinates": [NECROSIS]}, classification={}),
            ),
            "feature 1: has no class",
        ),
        (
            collection(feature({"type": "Polygon", "coordinates": [BOWTIE]}, name="A")),
            "feature 0: invalid polygon (Self-intersection",
        ),
        (
            collection(feature({"type": "Polygon", "coordinates": [[[0, 0], [1, "a"]]]}, name="A")),
            "feature 0: coordinates are not a list of [x, y] numbers",
        ),
        (
            collection(
                feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [0, 0]]]}, name="A")
            ),
            "feature 0: a ring needs at least 3 distinct points",
        ),
        (
            collection(
                feature(
                    {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [10, 0], [0, 0]]]},
                    name="A",
                )
            ),
            "feature 0: invalid polygon with no area",
        ),
        (
            collection(feature({"type": "Circle", "coordinates": [0, 0]}, name="A")),
            "feature 0: geometry type 'Circle' is not supported",
        ),
    ],
    ids=[
        "json",
        "binary",
        "not-collection",
        "empty",
        "no-class",
        "figure-eight",
        "coordinates",
        "ring",
        "no-area",
        "type",
    ],
)
def test_bad_annotation_files_fail_with_one_line(tmp_path, document, expected):
    manifest = write_annotations(tmp_path, document)
    path = Path(manifest_module.annotation_file(manifest))
    with pytest.raises(InputError) as caught:
        labels.read_annotations(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"file {path}: ")
    assert expected in message


def test_repairable_polygon_is_repaired_and_points_are_skipped():
    # a zero-width spike (invalid: the ring touches itself) is cut off; a point counts nothing
    regions, warnings = labels.parse_features(
        collection(
            feature({"type": "Polygon", "coordinates": [SPIKE]}, name="A"),
            feature({"type": "Point", "coordinates": [5, 5]}, name="A"),
        )
    )
    assert len(regions) == 1 and regions[0].geometry.is_valid
    assert regions[0].geometry.area == pytest.approx(1000 * 1000)
    assert warnings == ["annotations: 1 point or line feature(s) cover no area, skipped"]


def test_annotations_off_the_slide_fail_the_sample(preprocessed, tmp_path):
    folder = copy_sample(preprocessed, tmp_path)
    microns = [[[x * 10 + 30000, y * 10] for x, y in NECROSIS]]  # not level-0 pixels
    manifest = write_annotations(
        folder, collection(feature({"type": "Polygon", "coordinates": microns}, name="A"))
    )
    with pytest.raises(InputError, match="no annotation lies on the slide"):
        run_tile(folder, manifest)
    assert not outputs(folder)["tile_manifest"].exists()


def test_dataset_index_takes_the_tile_labels(preprocessed, tmp_path):
    annotated = copy_sample(preprocessed, tmp_path, "A1")
    plain = copy_sample(preprocessed, tmp_path, "P1")
    table, _ = run_tile(annotated, write_annotations(annotated, two_classes()))
    run_tile(plain, None)
    entries = [
        dataset.SampleEntry(
            folder.name,
            "wsi",
            str(folder / "tile.json"),
            str(folder / "preprocess.json"),
            label="slide-label",
            patient=folder.name,
        )
        for folder in (annotated, plain)
    ]
    dataset.build(entries, tmp_path / "index")
    index = pd.read_parquet(tmp_path / "index" / "tiles.parquet")
    a1 = index[index["sample"] == "A1"].sort_values(["y", "x"])
    assert a1.label.tolist() == table.sort_values(["y", "x"]).label.tolist()
    assert set(a1.label) == {"Necrosis", "Tumor", "Stroma", "background"}
    expected = table.sort_values(["y", "x"]).label_fraction.to_numpy()
    np.testing.assert_allclose(a1.label_fraction.to_numpy(), expected)
    p1 = index[index["sample"] == "P1"]
    assert set(p1.label) == {"slide-label"}
    assert p1.label_fraction.isna().all()  # not annotated: no share to give


SNAKEFILE = """
rule tile_wsi:
    input:
        unpack(lambda w: {{"download": f"results/wsi/{{w.sample}}/download.json",
                          "preprocess": f"results/wsi/{{w.sample}}/preprocess.json",
                          **({{"annotations": f"results/wsi/{{w.sample}}/annotations.json"}}
                             if w.sample == "A1" else {{}})}})
    output:
        table="results/wsi/{{sample}}/tiles/tiles.parquet",
        overlay="results/wsi/{{sample}}/tiles/overlay.png",
        summary="results/wsi/{{sample}}/tiles/summary.json",
        patches="results/wsi/{{sample}}/tiles/{{sample}}_patches.h5",
        manifest="results/wsi/{{sample}}/tile.json",
    params:
        tile={{"min_tissue": 0.0, "container": "coords"}},
    threads: 1
    log: "logs/tile_wsi/{{sample}}.log"
    script: "{scripts}/tile_wsi.py"
"""


def test_rule_script_passes_the_annotations(preprocessed, tmp_path):
    """scripts/tile_wsi.py with and without an `annotations` input, run by Snakemake."""
    for name in ("A1", "P1"):
        folder = tmp_path / "results" / "wsi" / name
        shutil.copytree(preprocessed, folder)
        write_download(folder, CMU)
        # the preprocess manifest's artifact paths point at the fixture's folder: fine
    write_annotations(tmp_path / "results" / "wsi" / "A1", two_classes())
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(scripts=REPO / "scripts"))
    snakemake = str(Path(sys.executable).parent / "snakemake")
    targets = [f"results/wsi/{s}/tile.json" for s in ("A1", "P1")]
    done = subprocess.run(
        [snakemake, "--cores", "2", "--nolock", *targets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a1 = writers.read_table(tmp_path / "results/wsi/A1/tiles/tiles.parquet")
    p1 = writers.read_table(tmp_path / "results/wsi/P1/tiles/tiles.parquet")
    assert {"Tumor", "Stroma", "Necrosis"} <= set(a1.label)
    assert "label" not in p1
    assert json.loads((tmp_path / "results/wsi/A1/tiles/summary.json").read_text())["labels"]


def test_readme_example_is_read():
    page = (REPO / "docs" / "region-labels.md").read_text()
    section = page.split("## Slides: labels per tile", 1)[1].split("\n## ", 1)[0]
    example = section.split("```json", 1)[1].split("```", 1)[0]
    regions, warnings = labels.parse_features(json.loads(example), "region-labels.md")
    assert [r.label for r in regions] == ["Tumor"] and not warnings
    assert labels.build(regions).colours["Tumor"] == (200, 0, 0)


@pytest.mark.slow
@pytest.mark.skipif(
    "annotations" not in (REPO / "rules" / "tile.smk").read_text(),
    reason="the sheet column `annotations` is not wired into rule tile_wsi yet",
)
def test_workflow_labels_tiles_from_the_sheet_column(tmp_path):
    """End to end: sheet column `annotations` -> tile_wsi -> published table -> dataset."""
    from workflow_support import published_file, run_snakemake, write_config

    slide = tmp_path / "data" / "CMU.svs"
    slide.parent.mkdir()
    shutil.copy(CMU, slide)
    geojson = tmp_path / "data" / "CMU.geojson"
    atomic.write_json(geojson, two_classes())
    (tmp_path / "samples.tsv").write_text(
        "sample\tmodality\turi\tannotations\tlabel\n"
        f"A1\twsi\t{slide}\t{geojson}\tslide-label\n"
        f"P1\twsi\t{slide}\t\tslide-label\n"
    )
    write_config(tmp_path, wsi={"resolution": {"mpp": 1.0}, "tile": {"min_tissue": 0.0}})
    run_snakemake(tmp_path)
    published = tmp_path / "published"
    a1 = writers.read_table(published_file(published / "wsi" / "A1", "tiles/tiles.parquet"))
    assert {"Necrosis", "Tumor", "Stroma"} <= set(a1.label)
    index = pd.read_parquet(published_file(published / "dataset" / "samples", "tiles.parquet"))
    assert set(index[index["sample"] == "P1"].label) == {"slide-label"}
    assert sorted(index[index["sample"] == "A1"].label) == sorted(a1.label)
