"""NIfTI affines from DICOM geometry, and reproducible ``.nii.gz`` writing.

DICOM patient coordinates are LPS; NIfTI world coordinates are RAS, so x and y flip. Arrays
here are (z, y, x) in C order, which is NIfTI's (i, j, k) = (x, y, z) in Fortran order: the
buffer is written as is, without a copy.

The gzip stream has no file name and mtime 0, so the same volume always gives the same
bytes. It is compressed in fixed 8 MB blocks (``threads`` at a time, pigz-style: each block
ends on a byte boundary with a sync flush and primes the next with the last 32 KB), one
ordinary gzip member whose bytes do not depend on the thread count.

Deflate is ISA-L's (the ``isal`` package, pinned), level 2: on a real chest CT (LIDC-IDRI-
0001 at 1 mm, 82 MB of int16) 4-5x faster than zlib level 1 for a file 1.6% larger
(``benchmarks/bench_ct.py`` prints the comparison). The bytes depend on the ISA-L version
only, never on the thread count or the run. Reading our own files inflates with ISA-L too
straight into the array; other NIfTI files go through nibabel.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from medprep.common import atomic
from medprep.common.parallel import thread_map

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
BLOCK_BYTES = 8 << 20
WINDOW_BYTES = 32 << 10
COMPRESS_LEVEL = 2  # ISA-L levels are 0-3
HEADER_BYTES = 352


def affine_lps(
    origin: Sequence[float],
    row_cosine: Sequence[float],
    col_cosine: Sequence[float],
    normal: Sequence[float],
    spacing_zyx: Sequence[float],
) -> np.ndarray:
    """4x4 mapping voxel (x, y, z) indices to LPS mm."""
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(row_cosine, float) * spacing_zyx[2]
    affine[:3, 1] = np.asarray(col_cosine, float) * spacing_zyx[1]
    affine[:3, 2] = np.asarray(normal, float) * spacing_zyx[0]
    affine[:3, 3] = origin
    return affine


def affine_ras(*args, **kwargs) -> np.ndarray:
    return LPS_TO_RAS @ affine_lps(*args, **kwargs)


def nifti_header_bytes(shape_zyx: Sequence[int], dtype, affine_ras_: np.ndarray) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(tuple(int(n) for n in shape_zyx[::-1]))
    spacing = np.linalg.norm(affine_ras_[:3, :3], axis=0)
    header.set_zooms(tuple(float(s) for s in spacing))
    header.set_qform(affine_ras_, code=1)
    header.set_sform(affine_ras_, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = b"medprep"
    header.set_data_offset(352)
    return header.binaryblock + b"\x00" * 4  # no extensions


def _deflate_block(args: tuple[memoryview, bytes, bool]) -> bytes:
    from isal import isal_zlib

    data, dictionary, last = args
    # the first block has no dictionary (isal_zlib refuses zdict=None)
    compressor = (
        isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -15, 8, zdict=dictionary)
        if dictionary
        else isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -15, 8)
    )
    body = compressor.compress(data)
    return body + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)


def gzip_bytes_to(path: str | os.PathLike, chunks: Sequence[bytes | memoryview], threads: int = 1):
    """Write ``chunks`` (concatenated) to ``path`` as one reproducible gzip member."""
    views = [memoryview(c).cast("B") for c in chunks]
    blocks: list[memoryview] = []
    for view in views:
        for start in range(0, len(view), BLOCK_BYTES):
            blocks.append(view[start : start + BLOCK_BYTES])
    blocks = [b for b in blocks if len(b)] or [memoryview(b"")]
    tasks = []
    previous = b""
    for i, block in enumerate(blocks):
        tasks.append((block, previous, i == len(blocks) - 1))
        previous = (previous + bytes(block[-WINDOW_BYTES:]))[-WINDOW_BYTES:]
    crc = 0
    size = 0
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        # magic, deflate, no flags, mtime 0, extra flags 0, OS unknown (255)
        f.write(b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x00\xff")
        for block, compressed in zip(
            blocks, thread_map(_deflate_block, tasks, max(1, threads)), strict=True
        ):
            crc = zlib.crc32(block, crc)
            size += len(block)
            f.write(compressed)
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def write_nifti(
    path: str | os.PathLike, volume_zyx: np.ndarray, affine_ras_: np.ndarray, threads: int = 1
) -> None:
    """Write a (z, y, x) array as ``.nii.gz`` with the given RAS affine, reproducibly."""
    volume = np.ascontiguousarray(volume_zyx)
    header = nifti_header_bytes(volume.shape, volume.dtype, affine_ras_)
    gzip_bytes_to(path, [header, volume.reshape(-1).view(np.uint8).data], threads)


NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2"}


def _own_header(block: bytes):
    """(shape x, y, z; dtype; RAS affine) of a little-endian single-file NIfTI-1 header
    as ``write_nifti`` writes it (3D, sform set, no scaling, data at 352), else None."""
    if len(block) < HEADER_BYTES or block[344:348] != b"n+1\x00":
        return None
    if struct.unpack_from("<i", block, 0)[0] != 348:
        return None
    dim = struct.unpack_from("<8h", block, 40)
    datatype = struct.unpack_from("<h", block, 70)[0]
    vox_offset, slope, inter = struct.unpack_from("<3f", block, 108)
    sform_code = struct.unpack_from("<h", block, 254)[0]
    if dim[0] != 3 or datatype not in NIFTI_DTYPES or int(vox_offset) != HEADER_BYTES:
        return None
    if sform_code <= 0 or slope not in (0.0, 1.0) or inter != 0.0:
        return None
    affine = np.eye(4)
    affine[:3] = np.frombuffer(block, dtype="<f4", count=12, offset=280).reshape(3, 4)
    return tuple(int(n) for n in dim[1:4]), np.dtype("<" + NIFTI_DTYPES[datatype]), affine


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(array (z, y, x), RAS affine) of a NIfTI file written by ``write_nifti`` or others.

    Our own ``.nii.gz`` (3D, no scaling, no extensions) is inflated with ISA-L straight
    into the array, its header read here (no nibabel import); anything else goes through
    nibabel."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        from isal import igzip

        with igzip.open(path, "rb") as f:
            own = _own_header(f.read(HEADER_BYTES))
            if own is not None:
                shape, dtype, affine = own
                data = np.empty(shape[::-1], dtype=dtype)
                view = data.data.cast("B")
                read = 0
                while read < data.nbytes:  # in blocks: readinto copies through a buffer
                    got = f.readinto(view[read : read + BLOCK_BYTES])
                    if not got:
                        break
                    read += got
                if read == data.nbytes and not f.read(1):
                    return data, affine
    import nibabel as nib

    image: Any = nib.load(path)  # nibabel types it FileBasedImage (no dataobj, no affine)
    data = np.asanyarray(image.dataobj)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine
