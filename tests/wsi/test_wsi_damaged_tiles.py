"""Stored slide tiles whose data is damaged: read errors of that tile, named by level and
position, as strict as OpenSlide, whether read directly or through OpenSlide.

The damaged slide is a copy of the real CMU SVS (Aperio, JPEG tiles with JPEGTables) in
which 64 bytes inside one tile's entropy-coded segment are zeroed: its markers (SOI, SOF,
SOS, EOI) and every other tile are intact. libjpeg-turbo reports "Corrupt JPEG data:
premature end of data segment", which OpenSlide turns into an error of the tile while
``imagecodecs.jpeg8_decode`` drops it and returns the damaged pixels.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from PIL import Image
from wsi_support import CMU, DAPI, TCGA_NO_MPP, outputs, preprocess, tile

from medprep.common.errors import InputError
from medprep.wsi import tiff_read
from medprep.wsi.slide import RegionReadError, SlideReader, read_region_array

COLUMN, ROW = 5, 4  # a tile with tissue, away from the slide's edges
TILE = 240


def tile_index(path, column: int, row: int) -> tuple[int, int, int]:
    page = tifffile.TiffFile(path).pages[0]
    across = -(-page.imagewidth // page.tilewidth)
    index = row * across + column
    return index, int(page.dataoffsets[index]), int(page.databytecounts[index])


def damaged_copy(path, column: int = COLUMN, row: int = ROW):
    """CMU with 64 bytes in the middle of one tile's scan data zeroed, headers intact."""
    data = bytearray(CMU.read_bytes())
    _, offset, count = tile_index(CMU, column, row)
    stored = bytes(data[offset : offset + count])
    sos = stored.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(stored[sos + 2 : sos + 4], "big")
    middle = offset + (scan_start + count - 2) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    damaged = data[offset : offset + count]
    assert damaged[:scan_start] == stored[:scan_start] and damaged[-2:] == b"\xff\xd9"
    assert damaged != stored
    return path


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return damaged_copy(tmp_path_factory.mktemp("damaged") / "CMU-damaged.svs")


def test_openslide_refuses_the_tile_and_imagecodecs_alone_would_not(damaged):
    import imagecodecs

    slide = openslide.OpenSlide(str(damaged))
    with pytest.raises(openslide.OpenSlideError, match="Corrupt JPEG data"):
        slide.read_region((COLUMN * TILE, ROW * TILE), 0, (TILE, TILE))
    slide.close()
    # the reason for strict decoding: libjpeg-turbo's warning is dropped by imagecodecs
    page = tifffile.TiffFile(damaged).pages[0]
    _, offset, count = tile_index(damaged, COLUMN, ROW)
    data = damaged.read_bytes()[offset : offset + count]
    pixels = imagecodecs.jpeg8_decode(
        data, tables=bytes(page.jpegtables), colorspace=imagecodecs.JPEG8.CS.RGB
    )
    assert pixels.shape == (TILE, TILE, 3)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "openslide"])
def test_a_region_read_names_the_damaged_tile_and_keeps_the_rest(damaged, direct):
    reader = SlideReader(damaged, direct=direct)
    clean = openslide.OpenSlide(str(CMU))
    try:
        assert reader.direct_levels == ((0,) if direct else ())
        # 3 x 3 tiles around the damaged one, not aligned to the tile grid
        x, y, size = (COLUMN - 1) * TILE + 17, (ROW - 1) * TILE + 5, 2 * TILE + 100
        pixels, found = reader.read_region(0, x, y, size, size)
        assert [(t.level, t.column, t.row) for t in found] == [(0, COLUMN, ROW)]
        assert "Corrupt JPEG data: premature end of data segment" in found[0].cause
        assert (
            found[0]
            .describe()
            .startswith(
                f"level 0 tile at column {COLUMN}, row {ROW} (level-0 x=1200, y=960; 240 x 240 pixels)"
            )
        )
        # the damaged tile is transparent, every other pixel is the clean slide's
        expected = read_region_array(clean, 0, x, y, size, size)
        inside = np.zeros((size, size), dtype=bool)
        inside[
            ROW * TILE - y : (ROW + 1) * TILE - y, COLUMN * TILE - x : (COLUMN + 1) * TILE - x
        ] = 1
        assert (pixels[inside] == 0).all()
        assert np.array_equal(pixels[~inside], expected[~inside])
        with pytest.raises(RegionReadError, match=f"level 0 tile at column {COLUMN}, row {ROW}"):
            reader.read_rgba(0, x, y, size, size)
        # a region without the damaged tile reads as before
        assert np.array_equal(
            reader.read_rgba(0, 0, 0, 300, 300), read_region_array(clean, 0, 0, 0, 300, 300)
        )
    finally:
        reader.close()
        clean.close()


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "openslide"])
def test_the_sample_fails_by_default_naming_the_tile_and_tolerates_it_when_allowed(
    tmp_path, damaged, monkeypatch, direct
):
    monkeypatch.setenv("MEDPREP_DIRECT_READS", direct)
    folder = tmp_path / "S"
    with pytest.raises(InputError) as caught:
        preprocess(folder, damaged)
    message = str(caught.value)
    assert "\n" not in message and str(damaged) in message
    assert f"level 0 tile at column {COLUMN}, row {ROW} (level-0 x=1200, y=960" in message
    assert "Corrupt JPEG data" in message and "wsi.tile.max_read_errors = 0" in message
    assert not outputs(folder)["preprocess_manifest"].exists()

    manifest = preprocess(folder, damaged, max_read_errors=1)
    assert manifest["summary"]["status"] == "ok"
    # named once for the mask and thumbnail, once for the stain regions it spoils
    warning, stain_warning = manifest["summary"]["warnings"]
    assert f"column {COLUMN}, row {ROW}" in warning
    assert stain_warning.startswith("stain estimate: skipped ")
    assert f"column {COLUMN}, row {ROW}" in stain_warning
    # the mask has no tissue where the tile is (its pixels are unknown), the clean one has
    reference = tmp_path / "clean"
    preprocess(reference, CMU)
    mask = np.asarray(Image.open(outputs(folder)["mask"])) > 0
    clean_mask = np.asarray(Image.open(outputs(reference)["mask"])) > 0
    assert mask.sum() < clean_mask.sum()

    # tiling with the clean slide's mask meets the damaged tile: the tiles over it are
    # skipped and counted, the others are the clean slide's tiles
    outputs(folder)["mask"].write_bytes(outputs(reference)["mask"].read_bytes())
    with pytest.raises(InputError, match=f"level 0 tile at column {COLUMN}, row {ROW}"):
        tile(folder)
    tiled = tile(folder, max_read_errors=1, container="folder", format="png")["summary"]
    clean = tile(reference, container="folder", format="png")["summary"]
    assert tiled["rejected"]["read_error"] > 0
    assert tiled["tiles"] + tiled["rejected"]["read_error"] == clean["tiles"]
    [warning] = tiled["warnings"]
    assert f"level 0 tile at column {COLUMN}, row {ROW}" in warning
    ours = pd.read_parquet(outputs(folder)["table"]).set_index(["x", "y"])
    theirs = pd.read_parquet(outputs(reference)["table"]).set_index(["x", "y"])
    assert set(ours.index) < set(theirs.index)
    for (x, y), row in ours.iterrows():
        lost = theirs.loc[(x, y)]
        assert (folder / "tiles" / row["file"]).read_bytes() == (
            reference / "tiles" / lost["file"]
        ).read_bytes()
        size = row["width_l0"]
        assert not (
            x < (COLUMN + 1) * TILE
            and x + size > COLUMN * TILE
            and y < (ROW + 1) * TILE
            and y + size > ROW * TILE
        )


# ---- claims of a stored tile checked before its decoder allocates anything


def _layout(compression: int, **options) -> tiff_read.LevelLayout:
    values = dict(
        width=1000,
        height=1000,
        tile_width=256,
        tile_height=256,
        offsets=np.zeros(16, np.int64),
        counts=np.zeros(16, np.int64),
        compression=compression,
        photometric=tiff_read.PHOTOMETRIC_RGB,
        predictor=1,
        jpeg_tables=None,
    )
    values.update(options)
    return tiff_read.LevelLayout(**values)


def test_a_jpeg_tile_claiming_another_size_is_damaged_before_decoding():
    import simplejpeg

    stored = simplejpeg.encode_jpeg(np.zeros((256, 256, 3), np.uint8), colorspace="RGB")
    layout = _layout(tiff_read.JPEG, photometric=tiff_read.PHOTOMETRIC_YCBCR)  # JFIF YCbCr
    assert tiff_read.decode_tile(stored, layout).shape == (256, 256, 4)
    sof = stored.index(b"\xff\xc0")
    bomb = bytearray(stored)
    bomb[sof + 5 : sof + 9] = struct.pack(">HH", 65535, 65535)
    with pytest.raises(tiff_read.TileDecodeError, match="claims 65535 x 65535 pixels"):
        tiff_read.decode_tile(bytes(bomb), layout)
    # cut short: libjpeg's "Premature end of JPEG file" is an error too
    with pytest.raises(tiff_read.TileDecodeError, match="Premature end"):
        tiff_read.decode_tile(stored[: len(stored) // 2], layout)


def test_jpeg2000_and_deflate_tiles_are_bounded_by_the_tile_size():
    stored = TCGA_NO_MPP.read_bytes()
    page = tifffile.TiffFile(TCGA_NO_MPP).pages[0]
    offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
    codestream = bytearray(stored[offset : offset + count])
    layout = _layout(tiff_read.APERIO_J2K_RGB)
    assert tiff_read.decode_tile(bytes(codestream), layout).shape == (256, 256, 3)
    codestream[8:16] = struct.pack(">II", 60000, 60000)  # SIZ: Xsiz, Ysiz
    with pytest.raises(tiff_read.TileDecodeError, match="claims 60000 x 60000 pixels"):
        tiff_read.decode_tile(bytes(codestream), layout)
    # a deflate stream of 64 MB of zeros (1032:1) is decoded only as far as one tile
    bomb = zlib.compress(bytes(64_000_000), 9)
    tile_bytes = tiff_read.decode_tile(bomb, _layout(tiff_read.DEFLATE[0]))
    assert tile_bytes.shape == (256, 256, 3)
    with pytest.raises(tiff_read.TileDecodeError, match="expected 196608"):
        tiff_read.decode_tile(zlib.compress(bytes(1000)), _layout(tiff_read.DEFLATE[0]))


def test_a_format_read_through_openslide_names_its_damaged_tile(tmp_path):
    """NDPI (read through OpenSlide only): a level's tiles are strips of restart
    intervals; the damaged one is found by reading the failed region tile by tile."""
    page = tifffile.TiffFile(DAPI).pages[0]
    offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
    data = bytearray(DAPI.read_bytes())
    middle = offset + count // 2
    data[middle : middle + 64] = bytes(64)
    damaged = tmp_path / "damaged.ndpi"
    damaged.write_bytes(bytes(data))
    reader = SlideReader(damaged)
    try:
        assert reader.direct_levels == ()
        width, height = reader._handle.level_dimensions[0]
        found = {}
        for y in range(0, height, 1024):
            for x in range(0, width, 1024):
                _, tiles = reader.read_region(0, x, y, 1024, 1024)
                found.update({t.key: t for t in tiles})
    finally:
        reader.close()
    [tile] = found.values()
    assert (tile.kind, tile.width, tile.height) == ("tile", width, 8)
    assert tile.describe().startswith(f"level 0 tile at column 0, row {tile.row} (level-0 x=0")
    assert "Corrupt JPEG data" in tile.cause
