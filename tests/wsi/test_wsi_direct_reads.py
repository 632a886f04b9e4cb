"""Direct reads of tiled TIFF-family slides (medprep.wsi.tiff_read) against OpenSlide, and
the block resampling of the tiler against PIL's per-tile resize."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from wsi_support import (
    CMU,
    DAPI,
    TCGA_NO_MPP,
    TINY,
    outputs,
    preprocess,
    small_synthetic_slide,
    tile,
)

from medprep.wsi.slide import SlideReader, read_region_array
from medprep.wsi.workers import RESAMPLE_FILTER, BlockTask, TileJob, resample_tiles

# Direct decoding uses the same decoders as OpenSlide (libjpeg-turbo, OpenJPEG, zlib) with
# the same colour-space choices; the two builds of libjpeg-turbo may round an IDCT
# differently, so the bound allowed is 1 grey level with a mean difference near 0. On
# every fixture here the difference measured is 0.
MAX_DIFF = 1
MAX_MEAN_DIFF = 0.01


@pytest.fixture(scope="module")
def synthetic_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("direct")
    return {
        # YCbCr JPEG 4:2:0 tiles with JFIF markers, levels 1 and 4, edge tiles on both sides
        "synthetic aperio": small_synthetic_slide(folder / "s.svs", 1000, 700),
        "synthetic generic": small_synthetic_slide(
            folder / "g.tiff", 900, 650, vendor="generic", mpp=0.3
        ),
    }


def _fixtures(synthetic_slides):
    return {
        "CMU (Aperio JPEG, RGB, JPEGTables, 240 px tiles)": CMU,
        "TCGA (Aperio JPEG 2000 RGB 33005, 2 levels)": TCGA_NO_MPP,
        "boxes.tiff (generic TIFF, Deflate, 4 levels)": TINY / "boxes.tiff",
        "small.svs (16 x 16 in one 64 px tile)": TINY / "small.svs",
        **synthetic_slides,
    }


def _blocks(width: int, height: int, downsample: float, level: int):
    """The whole level (or its first 1024 x 1024 pixels when large), a block over the
    bottom-right edges (outside pixels too), one over the top-left edges and an interior
    block at odd offsets; level-0 origins on whole level pixels (OpenSlide interpolates
    other origins on levels whose downsample is not a whole number)."""
    d = round(downsample) if level else 1
    if width * height <= 1_000_000:
        blocks = [(0, 0, width, height), (0, 0, width + 17, height + 9)]
    else:
        blocks = [(0, 0, 1024, 1024)]
    if abs(downsample - d) < 1e-9:
        right, bottom = max(width - 300, 0), max(height - 200, 0)
        blocks += [
            (right * d, bottom * d, 317, 209),
            (-16 * d, -8 * d, min(width, 400) + 40, min(height, 300) + 24),
            (37 * d, 19 * d, max(min(width - 30, 513), 5), max(min(height - 20, 301), 5)),
        ]
    return blocks


def test_direct_reads_equal_openslide_on_every_tiff_fixture(synthetic_slides):
    compared = []
    for name, path in _fixtures(synthetic_slides).items():
        direct = SlideReader(path, direct=True)
        reference = SlideReader(path, direct=False)
        try:
            handle = reference._handle
            assert direct.direct_levels == tuple(range(len(handle.level_dimensions))), (
                name,
                direct.direct_reason,
            )
            for level, (width, height) in enumerate(handle.level_dimensions):
                ds = handle.level_downsamples[level]
                for x, y, w, h in _blocks(width, height, ds, level):
                    ours = direct.read_rgba(level, x, y, w, h)
                    theirs = read_region_array(handle, level, x, y, w, h)
                    diff = ours.astype(np.int16) - theirs.astype(np.int16)
                    where = f"{name} level {level} block {(x, y, w, h)}"
                    assert ours.shape == theirs.shape == (h, w, 4), where
                    assert np.array_equal(ours[..., 3], theirs[..., 3]), where
                    assert np.abs(diff).max() <= MAX_DIFF, where
                    assert abs(diff.mean()) < MAX_MEAN_DIFF, where
                    compared.append(where)
            assert direct.direct_reads > 0 and direct.openslide_reads == 0
        finally:
            direct.close()
            reference.close()
    assert len(compared) >= 30


def test_other_formats_go_through_openslide():
    for path, vendor in ((DAPI, "hamamatsu"), (TINY / "boxes_0.dcm", "dicom")):
        reader = SlideReader(path, direct=True)
        try:
            assert reader.direct_levels == ()
            assert vendor in reader.direct_reason
            w, h = reader._handle.level_dimensions[0]
            rgba = reader.read_rgba(0, 0, 0, min(w, 64), min(h, 64))
            assert rgba.shape == (min(h, 64), min(w, 64), 4)
            assert reader.openslide_reads == 1 and reader.direct_reads == 0
        finally:
            reader.close()


def test_a_region_with_a_missing_tile_is_read_through_openslide():
    reader = SlideReader(CMU, direct=True)
    try:
        layouts = reader._direct.layouts
        counts = layouts[0].counts.copy()
        counts[1] = 0  # tile (row 0, column 1) has no stored bytes
        layouts[0] = dataclasses.replace(layouts[0], counts=counts)
        assert reader._direct.read_rgba(0, 200, 0, 100, 100) is None
        assert reader._direct.read_rgba(0, 0, 300, 100, 100) is not None
        rgba = reader.read_rgba(0, 200, 0, 100, 100)
        expected = read_region_array(reader._handle, 0, 200, 0, 100, 100)
        assert np.array_equal(rgba, expected)
        assert reader.openslide_reads == 1
    finally:
        reader.close()


def test_outputs_are_the_same_bytes_with_and_without_direct_reads(tmp_path, monkeypatch):
    slide = small_synthetic_slide(tmp_path / "s.svs", 1500, 1100)
    results = {}
    for direct in ("1", "0"):
        monkeypatch.setenv("MEDPREP_DIRECT_READS", direct)
        folder = tmp_path / direct / "S"
        preprocess(folder, slide, resolution={"mpp": 0.5})
        tile(folder, block_tiles=2)
        out = outputs(folder)
        summary = json.loads(out["tile_summary"].read_text())
        assert (summary["direct_reads"] == summary["read_calls"]) == (direct == "1")
        assert summary["direct_reads"] == 0 or direct == "1"
        results[direct] = {p.name: p.read_bytes() for p in sorted(out["pixels"].iterdir())}
        results[direct].update(
            {name: out[name].read_bytes() for name in ("mask", "thumbnail", "table")}
        )
    assert len(results["1"]) > 3 and results["1"] == results["0"]


def _reference_tiles(rgba, job, task):
    """The tiler's earlier path: one PIL resize per tile over its exact footprint."""
    image = Image.fromarray(rgba, "RGBA")
    ds = job.level_downsample
    height, width = rgba.shape[:2]
    tiles = []
    for x, y in zip(task.xs, task.ys, strict=True):
        left = (x - task.read_x) / ds
        top = (y - task.read_y) / ds
        box = (
            max(left, 0.0),
            max(top, 0.0),
            min(left + job.width_l0 / ds, width),
            min(top + job.height_l0 / ds, height),
        )
        resample = getattr(Image.Resampling, RESAMPLE_FILTER)
        tiles.append(np.asarray(image.resize((job.size, job.size), resample, box=box)))
    return tiles


@pytest.mark.parametrize(("scale", "downsample"), [(1.9786, 1.0), (1.002, 1.0), (4.3, 4.0)])
def test_block_resampling_is_bit_identical_to_resizing_each_tile(scale, downsample):
    rng = np.random.default_rng(1)
    size = 64
    extent = size * scale
    step = 48  # overlapping tiles, rounded origins as the grid makes them
    cols = [round(c * step * scale) + 5 for c in range(3)]
    rows = [round(r * step * scale) + 3 for r in range(2)]
    xs = tuple(x for _ in rows for x in cols)
    ys = tuple(y for y in rows for _ in cols)
    read_x, read_y = 4, 0
    width = int(np.ceil((max(cols) + extent - read_x) / downsample)) - 1  # clips the last column
    height = int(np.ceil((max(rows) + extent - read_y) / downsample)) + 2
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    job = TileJob(
        "x", 1, downsample, True, size, extent, extent, None, 90, "brightfield", 20.0, (0, 0, 0)
    )
    task = BlockTask(0, read_x, read_y, width, height, xs, ys)
    ours = resample_tiles(rgba, job, task)
    reference = _reference_tiles(rgba, job, task)
    assert len(ours) == len(reference) == 6
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == (size, size, 4) and (a[..., 3] == 255).all()
        assert np.array_equal(a[..., :3], b[..., :3])


@pytest.mark.parametrize("fraction", [0.3, 0.5, 2 / 3, 0.9, 0.999])
def test_a_cut_tiff_is_named_truncated_wherever_it_is_cut(tmp_path, fraction):
    from medprep.wsi.slide import describe_unreadable
    from medprep.wsi.tiff_read import tiff_damage

    for source in (CMU, TINY / "boxes.tiff", DAPI):
        assert tiff_damage(source) is None
        data = source.read_bytes()
        cut = tmp_path / f"cut{source.suffix}"
        cut.write_bytes(data[: int(len(data) * fraction)])
        message = describe_unreadable(cut)
        assert message.startswith("truncated or damaged TIFF: "), (source.name, message)
        assert f"{cut.stat().st_size} bytes" in message or "corrupted" in message


def test_levels_whose_pixels_differ_from_openslide_are_read_through_openslide(monkeypatch):
    from medprep.wsi import tiff_read

    decode = tiff_read.decode_tile

    def wrong_colours(data, layout):  # e.g. a colour space the direct path misreads
        return 255 - decode(data, layout)

    monkeypatch.setattr(tiff_read, "decode_tile", wrong_colours)
    reader = SlideReader(TCGA_NO_MPP, direct=True)
    try:
        assert reader.direct_levels == ()
        assert "differs from OpenSlide" in reader.direct_reason
        rgba = reader.read_rgba(0, 100, 100, 64, 64)
        assert np.array_equal(rgba, read_region_array(reader._handle, 0, 100, 100, 64, 64))
    finally:
        reader.close()
