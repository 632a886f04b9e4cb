"""Strict decoding of stored JPEG slide tiles against the lenient decoder it replaced.

    .venv/bin/python benchmarks/bench_tile_decode.py [--rounds 21]

``medprep.wsi.tiff_read.decode_tile`` decodes JPEG tiles with simplejpeg (libjpeg-turbo
with every warning an error), after checking the tile's markers and putting the level's
JPEGTables (and, for RGB tiles, an Adobe marker) in front of it. The decoder it replaced,
``imagecodecs.jpeg8_decode``, reads the tables itself and drops libjpeg's warnings. Both
decode every stored tile of level 0 of:

- CMU-1-Small-Region.svs (the real Aperio fixture: 240 px RGB tiles, 4:4:4, JPEGTables);
- a synthetic Aperio slide (benchmarks/out/, 256 px YCbCr 4:2:0 tiles with JFIF markers,
  tissue texture from CMU), the layout medprep.demo writes.

Prints the median time per tile of ``--rounds`` rounds for each (rounds alternate between
the two), their ratio, and whether the pixels are identical. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"


def tiles_of(path: Path):
    import tifffile

    from medprep.wsi import tiff_read

    data = path.read_bytes()
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        layout = tiff_read._layout(page)
        stored = [
            data[o : o + c] for o, c in zip(page.dataoffsets, page.databytecounts, strict=True) if c
        ]
    return layout, stored


def lenient(tile: bytes, layout) -> np.ndarray:
    import imagecodecs

    from medprep.wsi import tiff_read

    colorspace = (
        imagecodecs.JPEG8.CS.YCbCr
        if layout.photometric == tiff_read.PHOTOMETRIC_YCBCR
        else imagecodecs.JPEG8.CS.RGB
    )
    return imagecodecs.jpeg8_decode(
        tile,
        tables=layout.jpeg_tables,
        colorspace=colorspace,
        outcolorspace=imagecodecs.JPEG8.CS.EXT_RGBX,
    )


def strict(tile: bytes, layout) -> np.ndarray:
    from medprep.wsi import tiff_read

    return tiff_read.decode_tile(tile, layout)


def per_tile_ms(decoders, tiles, layout, rounds: int) -> list[float]:
    """Median ms per tile of each decoder; rounds alternate between them, so load from
    other processes falls on both alike."""
    times: list[list[float]] = [[] for _ in decoders]
    for _ in range(rounds):
        for k, decode in enumerate(decoders):
            started = time.perf_counter()
            for tile in tiles:
                decode(tile, layout)
            times[k].append((time.perf_counter() - started) / len(tiles) * 1000)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from wsi_support import CMU, small_synthetic_slide

    OUT.mkdir(exist_ok=True)
    synthetic = OUT / "decode-synthetic.svs"
    if not synthetic.exists():
        small_synthetic_slide(synthetic, 4096, 3072)
    print(f"{'slide':<44} {'tiles':>5} {'imagecodecs':>12} {'strict':>9} {'ratio':>6}  pixels")
    for name, path in (
        ("CMU-1-Small-Region (240 px RGB 4:4:4)", CMU),
        ("synthetic Aperio (256 px YCbCr 4:2:0)", synthetic),
    ):
        layout, tiles = tiles_of(path)
        same = all(
            np.array_equal(lenient(t, layout)[..., :3], strict(t, layout)[..., :3]) for t in tiles
        )
        old, new = per_tile_ms((lenient, strict), tiles, layout, args.rounds)
        print(
            f"{name:<44} {len(tiles):>5} {old:>9.3f} ms {new:>6.3f} ms {new / old:>6.2f}  "
            f"{'identical' if same else 'DIFFER'}"
        )


if __name__ == "__main__":
    main()
