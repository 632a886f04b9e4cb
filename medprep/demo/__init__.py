"""The built-in demo dataset: runs offline, needs nothing but this checkout.

- ``ct/phantom-chest-01``: a synthetic chest CT written as real DICOM slices
- ``ct/real-dcmqi-3slice``: a short real CT series (from ``tests/fixtures/ct``)
- ``wsi/synthetic-01.tiff``: a synthetic pyramidal slide with real H&E texture
- ``wsi/CMU-1-Small-Region.svs``: a small real Aperio slide (from ``tests/fixtures/wsi``)

Usage: ``python -m medprep.demo [FOLDER]`` (default ``demo``); does nothing if the
folder already holds a complete demo (its ``samples.tsv`` is written last).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from medprep.common import atomic

TEST_DATA = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
REAL_CT_SERIES = TEST_DATA / "ct" / "dcmqi-ct-3slice"
REAL_SLIDE = TEST_DATA / "wsi" / "CMU-1-Small-Region.svs"

SAMPLES_HEADER = "sample\tmodality\turi\tlabel\tpatient\n"
# labels and patient pseudonyms of the demo samples (the CT phantom and the synthetic
# slide share a patient, so the dataset keeps them in one split)
DEMO_GROUPS = {
    "phantom-chest-01": ("1", "demo-patient-3"),
    "real-dcmqi-3slice": ("0", "demo-patient-2"),
    "synthetic-01": ("1", "demo-patient-3"),
    "CMU-1-Small-Region": ("0", "demo-patient-4"),
}

README = """\
# medprep demo dataset

Built by `python -m medprep.demo` (or by the workflow on its first run). Delete this
folder to rebuild it.

| sample | what | licence |
|---|---|---|
| phantom-chest-01 | synthetic chest CT phantom (body, lungs, vessels, trachea, spine, table, padded field of view) written as DICOM by `medprep.demo.ct_phantom` | generated, no patient data |
| real-dcmqi-3slice | 3 real CT slices (GE), from QIICR dcmqi `data/segmentations/ct-3slice` | BSD-3-Clause |
| synthetic-01 | synthetic pyramidal TIFF slide, H&E texture cut from CMU-1-Small-Region, written by `medprep.demo.synthetic_slide` | derived from CC0 data |
| CMU-1-Small-Region | real Aperio SVS slide, OpenSlide test data (Carnegie Mellon) | CC0 |

See `tests/fixtures/*/README.md` in the medprep checkout for full provenance.
"""


def build(
    folder: str | Path,
    *,
    phantom_shape: tuple[int, int, int] = (256, 256, 96),
    phantom_spacing_mm: tuple[float, float] = (1.4, 2.5),
    slide_size: int = 8192,
) -> Path:
    """Build the demo dataset into ``folder`` unless it is already complete.

    ``phantom_shape`` is (rows, columns, slices) and ``phantom_spacing_mm`` (pixel, slice)
    of the synthetic CT; ``slide_size`` the edge of the synthetic slide in pixels. Tests
    build a smaller dataset with the same code.
    """
    from medprep.demo.ct_phantom import write_chest_phantom
    from medprep.demo.synthetic_slide import write_synthetic_slide

    folder = Path(folder)
    if (folder / "samples.tsv").exists():
        return folder
    for required in (REAL_CT_SERIES, REAL_SLIDE):
        if not required.exists():
            raise FileNotFoundError(f"demo source data missing: {required} (incomplete checkout?)")
    with atomic.staged_dir(folder) as tmp:
        rows, cols, slices = phantom_shape
        write_chest_phantom(
            tmp / "ct" / "phantom-chest-01",
            rows=rows,
            cols=cols,
            slices=slices,
            pixel_mm=phantom_spacing_mm[0],
            slice_mm=phantom_spacing_mm[1],
            seed=1,
        )
        shutil.copytree(REAL_CT_SERIES, tmp / "ct" / "real-dcmqi-3slice")
        (tmp / "wsi").mkdir()
        write_synthetic_slide(
            tmp / "wsi" / "synthetic-01.tiff",
            slide_size,
            slide_size,
            texture_slide=REAL_SLIDE,
            mpp=0.5,
            seed=1,
        )
        shutil.copyfile(REAL_SLIDE, tmp / "wsi" / REAL_SLIDE.name)
        (tmp / "README.md").write_text(README)
        rows_tsv = [
            ("phantom-chest-01", "ct", f"{folder}/ct/phantom-chest-01"),
            ("real-dcmqi-3slice", "ct", f"{folder}/ct/real-dcmqi-3slice"),
            ("synthetic-01", "wsi", f"{folder}/wsi/synthetic-01.tiff"),
            ("CMU-1-Small-Region", "wsi", f"{folder}/wsi/{REAL_SLIDE.name}"),
        ]
        (tmp / "samples.tsv").write_text(
            SAMPLES_HEADER + "".join("\t".join((*r, *DEMO_GROUPS[r[0]])) + "\n" for r in rows_tsv)
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the medprep demo dataset.")
    parser.add_argument("folder", nargs="?", default="demo")
    args = parser.parse_args(argv)
    built = build(args.folder)
    print(f"demo dataset ready in {built}/ (sample sheet: {built}/samples.tsv)")
    return 0
