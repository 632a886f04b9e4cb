"""Peak memory of preprocess_ct and tile_ct, in MB, from what the workflow knows beforehand.

preprocess_ct holds, at its peak (resampling), the input stack (int16), one float32 plane per
input slice at the output in-plane spacing, and the output (int16); while masking the lungs,
the output, a label image (int32) and a few boolean volumes. So:

    peak = BASE_MB + (2 * voxels_in + 4 * planes + 2 * voxels_out) bytes, or
           BASE_MB + LUNG_BYTES_PER_VOXEL * voxels_out bytes, whichever is larger

with ``voxels_in`` from the DICOM bytes (2 bytes per stored voxel; compressed series hold
more: pass ``voxels_in``) and ``voxels_out`` from the voxel volumes in and out. The input
voxel size is not known from bytes alone: without ``input_voxel_mm3`` 0.7 x 0.7 x 2.5 mm is
assumed, which overestimates thin-slice series (1.25 mm: about 2x the output voxels) and
underestimates 5 mm series, whose volumes are small enough for BASE_MB and SAFETY to cover.
Checked against the peak RSS measured by benchmarks/bench_ct.py (see its output).

tile_ct reads the volume (int16) and the mask (uint8) of ``shape_out`` (nibabel holds each
twice while decompressing), and normalises one patch at a time into a memory-mapped array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MB = 1024 * 1024
BASE_MB = 150.0  # interpreter, numpy/scipy/pydicom/nibabel/PIL/pandas (measured 142 MB)
ASSUMED_INPUT_SLICE_MM = 2.5
ASSUMED_INPUT_VOXEL_MM3 = 0.7 * 0.7 * ASSUMED_INPUT_SLICE_MM
LUNG_BYTES_PER_VOXEL = 8.5  # int16 volume, int32 labels, two boolean volumes, a lookup
PER_THREAD_MB = 24.0  # a slice in flight per decoding thread, gzip blocks
SAFETY = 1.2
# int16 volume and uint8 mask, each held twice while nibabel decompresses them (measured 7.9)
TILE_BYTES_PER_VOXEL = 8.5


def preprocess_ct_mb(
    total_bytes: int,
    *,
    threads: int = 1,
    spacing_out: Sequence[float] = (1.0, 1.0, 1.0),
    voxels_in: int | None = None,
    input_voxel_mm3: float | None = None,
    input_slice_mm: float | None = None,
) -> float:
    """Estimated peak MB of preprocess_ct for a sample of ``total_bytes`` of DICOM files."""
    input_voxels = float(voxels_in) if voxels_in is not None else total_bytes / 2.0
    voxel_in = input_voxel_mm3 or ASSUMED_INPUT_VOXEL_MM3
    slice_in = input_slice_mm or ASSUMED_INPUT_SLICE_MM
    z_out, y_out, x_out = (float(s) for s in spacing_out)
    voxels_out = input_voxels * voxel_in / (z_out * y_out * x_out)
    # in-plane resampled slices: output voxels scaled back to the input slice count
    planes = voxels_out * z_out / slice_in
    resampling = 2 * input_voxels + 4 * planes + 2 * voxels_out
    masking = LUNG_BYTES_PER_VOXEL * voxels_out
    return SAFETY * (BASE_MB + PER_THREAD_MB * threads + max(resampling, masking) / MB)


def tile_ct_mb(preprocess_manifest: dict[str, Any], *, threads: int = 1) -> float:
    """Estimated peak MB of tile_ct from the preprocess step manifest (its ``shape_out``)."""
    shape = preprocess_manifest.get("summary", {}).get("shape_out") or [0, 0, 0]
    voxels = math.prod(int(n) for n in shape)
    return SAFETY * (BASE_MB + PER_THREAD_MB * threads + TILE_BYTES_PER_VOXEL * voxels / MB)
