"""Peak memory estimates (MB) of the WSI steps, for Snakemake's ``resources.mem_mb``.

Pure functions of numbers the workflow knows before a job runs. Each estimate is the
sum over the processes of a step (the parent plus its pool workers) of a fixed base
(interpreter and libraries) and the buffers the step's algorithm holds at its peak.
The constants were measured with ``benchmarks/bench_wsi.py`` (which prints estimate and
measured peak side by side) and carry a margin.

``tile_wsi`` (``tiler.py``): each worker holds one block read, at most
``MAX_READ_SIDE`` pixels per side at the level read, as RGBA (4 bytes/pixel) plus its
grey image (1) and the encoded tiles of the block; OpenSlide keeps a tile cache per
handle. The parent holds up to ``2 x workers`` block results and the tile table.

``preprocess_wsi`` (``preprocess.py``): the low-resolution image at ``mask_mpp`` and the
mask maths on it (RGBA, RGB, score, masks, distance transforms, labels: about
``PREPROCESS_BYTES_PER_MASK_PIXEL``), plus chunk reads of at most ``MAX_READ_SIDE``
pixels per side. The mask's size follows the slide's physical size, so without the
slide's dimensions the estimate assumes a full scan of a standard 25 x 75 mm slide.
Brightfield slides then get their stain estimate (``STAIN_ESTIMATE_MB``: a fixed sample
of tissue regions, after the low-resolution image is freed).
"""

from __future__ import annotations

import math

from medprep.wsi.grid import block_side_for_read_limit
from medprep.wsi.preprocess import MAX_READ_SIDE as PREPROCESS_READ_SIDE
from medprep.wsi.tiler import MAX_READ_SIDE as TILE_READ_SIDE

MB = 1024 * 1024

# Resident size of a process after importing what it uses (measured, rounded up).
PARENT_BASE_MB = 170  # numpy, scipy, PIL, pyarrow, openslide, the step code
# numpy, PIL, openslide, imagecodecs; under "spawn" also what the rule script imports
WORKER_BASE_MB = 100
OPENSLIDE_CACHE_MB = 40  # per handle: OpenSlide's tile cache plus allocator slack

# Bytes per pixel of a block read while it is processed: RGBA buffer, grey image,
# PIL's copy when resampling.
BLOCK_BYTES_PER_PIXEL = 10
# Encoded bytes per output pixel (upper bounds: JPEG q90 of H&E ~0.5, PNG ~2.5).
ENCODED_BYTES_PER_PIXEL = {"jpeg": 1.0, "png": 3.0, None: 0.0}
TABLE_BYTES_PER_TILE = 200

PREPROCESS_BYTES_PER_MASK_PIXEL = 32  # measured ~24
# closing by distance transforms (radius above tissue.DIRECT_CLOSING_MAX_RADIUS pixels)
DISTANCE_CLOSING_BYTES_PER_MASK_PIXEL = 48
STANDARD_SLIDE_MM = (25.0, 75.0)
# the stain estimate of preprocess: 2.1 M region pixels (6 MB), one region read (at most
# 4 MB) and Macenko's float32 arrays (55 MB peak: benchmarks/results/stain.txt)
STAIN_ESTIMATE_MB = 80

# Without knowing the level ratio (level pixels per output pixel) assume the worst of a
# pyramid with 4x steps: just under 4.
WORST_LEVEL_RATIO = 4.0


def estimate_tile_mem_mb(
    workers: int,
    tile_size: int = 256,
    block_tiles: int = 8,
    *,
    image_format: str | None = "jpeg",
    level_ratio: float | None = None,
    tiles: int | None = None,
) -> int:
    """Peak MB of ``tile_wsi`` with ``workers`` processes.

    ``level_ratio``: pixels of the level read per output pixel (1 at a level's native
    resolution; None = worst case). ``tiles``: expected kept tiles (None = 250k, a full
    standard slide at 0.5 um/px).
    """
    workers = max(int(workers), 1)
    ratio = WORST_LEVEL_RATIO if level_ratio is None else max(float(level_ratio), 1.0)
    side = block_side_for_read_limit(block_tiles, tile_size, tile_size, ratio, TILE_READ_SIDE)
    read_side = min(math.ceil(side * tile_size * ratio) + 8, TILE_READ_SIDE + 8)
    block_bytes = read_side * read_side * BLOCK_BYTES_PER_PIXEL
    encoded_bytes = side * side * tile_size * tile_size * ENCODED_BYTES_PER_PIXEL[image_format]
    worker_mb = WORKER_BASE_MB + OPENSLIDE_CACHE_MB + (block_bytes + encoded_bytes) / MB
    in_flight = 2 * workers * encoded_bytes
    table = (250_000 if tiles is None else tiles) * TABLE_BYTES_PER_TILE
    parent_mb = PARENT_BASE_MB + (in_flight + table) / MB
    if workers == 1:
        # everything runs in the parent: one slide handle and one block, no result queue
        return math.ceil(
            PARENT_BASE_MB + OPENSLIDE_CACHE_MB + (block_bytes + encoded_bytes + table) / MB
        )
    return math.ceil(parent_mb + workers * worker_mb)


def mask_pixels(
    dimensions: tuple[int, int] | None, mpp: float | None, mask_mpp: float = 8.0
) -> int:
    """Pixels of the tissue mask of a slide (standard-slide bound if not known)."""
    if dimensions is not None and mpp is not None:
        width_um = dimensions[0] * mpp
        height_um = dimensions[1] * mpp
    else:
        width_um = STANDARD_SLIDE_MM[0] * 1000
        height_um = STANDARD_SLIDE_MM[1] * 1000
    return math.ceil(width_um / mask_mpp) * math.ceil(height_um / mask_mpp)


def estimate_preprocess_mem_mb(
    dimensions: tuple[int, int] | None = None,
    mpp: float | None = None,
    *,
    mask_mpp: float = 8.0,
    closing_um: float = 32.0,
    workers: int = 1,
) -> int:
    """Peak MB of ``preprocess_wsi`` for a slide of level-0 ``dimensions`` at ``mpp``.

    Without dimensions (or mpp) the bound is a full scan of a standard 25 x 75 mm slide.
    """
    from medprep.wsi.tissue import DIRECT_CLOSING_MAX_RADIUS

    workers = max(int(workers), 1)
    pixels = mask_pixels(dimensions, mpp, mask_mpp)
    per_pixel = PREPROCESS_BYTES_PER_MASK_PIXEL
    if round(closing_um / mask_mpp) > DIRECT_CLOSING_MAX_RADIUS:
        per_pixel += DISTANCE_CLOSING_BYTES_PER_MASK_PIXEL
    chunk_mb = (PREPROCESS_READ_SIDE**2 * 4) / MB  # one read at the mask's level
    parent = PARENT_BASE_MB + OPENSLIDE_CACHE_MB + pixels * per_pixel / MB + STAIN_ESTIMATE_MB
    if workers == 1:
        return math.ceil(parent + chunk_mb)
    return math.ceil(parent + workers * (WORKER_BASE_MB + OPENSLIDE_CACHE_MB + chunk_mb))
