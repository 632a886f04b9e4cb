"""Helpers for the CT tests: variants of real DICOM files, made with pydicom.

Compressed copies: RLE Lossless and JPEG 2000 Lossless through pydicom's encoders (native RLE,
pylibjpeg-openjpeg); JPEG-LS Lossless and JPEG Lossless SV1 through imagecodecs' CharLS and
lossless-JPEG encoders (pydicom 3 has no encoder for these here), encapsulated with pydicom.
All of them decode through pydicom's pylibjpeg plugins in the code under test.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import encapsulate

from medprep.ct import lidc
from medprep.demo import ct_phantom as phantom

TEST_DATA = Path(__file__).parent / "fixtures" / "ct"
# LIDC-IDRI-0001: the 9 slices its large nodule spans, and one reader's XML (069.xml)
SLAB = TEST_DATA / "lidc-idri-0001-slab"
XML = SLAB / "069.xml"
CT_3SLICE = TEST_DATA / "dcmqi-ct-3slice"
CT_TILT = TEST_DATA / "ge-hispeed-gantry-tilt"
CT_DUPLICATES = TEST_DATA / "kits-duplicate-positions"
CT_SINGLE = TEST_DATA / "covid19-ny-sbu-single-slices"

COMPRESSED_SYNTAXES = {
    "rle": uid.RLELossless,
    "jpeg2000": uid.JPEG2000Lossless,
    "jpegls": uid.JPEGLSLossless,
    "jpeg-lossless": uid.JPEGLosslessSV1,
}


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix == ".dcm")


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def compress_file(src: Path, dst: Path, syntax: str) -> None:
    """Re-encode one file losslessly with ``syntax`` (a key of COMPRESSED_SYNTAXES)."""
    ds = pydicom.dcmread(src)
    target = COMPRESSED_SYNTAXES[syntax]
    if syntax in ("rle", "jpeg2000"):
        ds.compress(target, encoding_plugin="pydicom" if syntax == "rle" else "")
    else:
        import imagecodecs

        stored = ds.pixel_array
        # JPEG-LS and lossless JPEG code unsigned samples: signed values go in as their
        # two's complement bit pattern (PixelRepresentation tells the reader).
        samples = stored.view(np.uint16) if stored.dtype == np.int16 else stored
        if syntax == "jpegls":
            frame = imagecodecs.jpegls_encode(samples)
        else:
            frame = imagecodecs.ljpeg_encode(samples, bitspersample=16)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = target
    ds.save_as(dst, enforce_file_format=True)


def compressed_copy(src_folder: Path, dst: Path, syntax: str) -> Path:
    dst.mkdir(parents=True)
    for path in dicom_files(src_folder):
        compress_file(path, dst / path.name, syntax)
    return dst


def without_preamble(src: Path, dst: Path, *, keep_file_meta: bool = True) -> None:
    """The file without the 128-byte preamble and 'DICM'; optionally without file meta too
    (a bare dataset, implicit VR little endian, as old ACR-NEMA style writers left them)."""
    if keep_file_meta:
        dst.write_bytes(src.read_bytes()[132:])
        return
    ds = pydicom.dcmread(src)
    ds.preamble = None
    del ds.file_meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    dst.write_bytes(buffer.getvalue())


def edited_copy(src: Path, dst: Path, **changes) -> None:
    """Copy with attributes changed; a value of None deletes the attribute."""
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> None:
    dst.write_bytes(src.read_bytes()[:keep_bytes])


def mixed_series_folder(folder: Path) -> tuple[Path, str]:
    """A folder of two CT series of the same scan (3 and 2 slices), a localizer of the
    second, a text file and an empty .dcm; returns the folder and the smaller series' UID."""
    folder.mkdir(parents=True)
    for path in dicom_files(CT_3SLICE):
        edited_copy(path, folder / f"a-{path.name}")
    other_uid = pydicom.uid.generate_uid(entropy_srcs=["other"])
    for path in dicom_files(CT_3SLICE)[:2]:
        edited_copy(
            path,
            folder / f"b-{path.name}",
            SeriesInstanceUID=other_uid,
            SOPInstanceUID=pydicom.uid.generate_uid(entropy_srcs=["other", path.name]),
        )
    edited_copy(
        dicom_files(CT_3SLICE)[0],
        folder / "scout.dcm",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesInstanceUID=other_uid,
    )
    (folder / "README.txt").write_text("not a DICOM file\n")
    (folder / "empty.dcm").write_bytes(b"")
    return folder, other_uid


def linked_copy(src: Path, dst: Path, link_target: str) -> Path:
    """A copy of the series in ``src`` plus a folder link ``dst/link -> link_target``
    (``.`` makes a loop, ``/etc`` leaves the sample's folder)."""
    copy_folder(src, dst)
    os.symlink(link_target, dst / "link")
    return dst


def dicom_frames(folder: Path) -> dict[str, lidc.SliceFrame]:
    frames = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        frames[str(ds.SOPInstanceUID)] = lidc.SliceFrame(
            origin=tuple(float(v) for v in ds.ImagePositionPatient),
            row_cosine=tuple(orientation[:3]),
            col_cosine=tuple(orientation[3:]),
            pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
            shape=(int(ds.Rows), int(ds.Columns)),
        )
    return frames


def phantom_nodule(rows: int, cols: int, slices: int, pixel_mm: float, slice_mm: float):
    """The nodule's centre (LPS mm) and diameter from the phantom's documented layout:
    x, y scaled from a 360 mm field of view, z a fraction of the lungs' half height."""
    scale = min(rows, cols) * pixel_mm / 360.0
    half = min(0.4 * (slices - 1) * slice_mm, 125.0)
    x, y, z_fraction, radius = phantom.NODULE
    return np.array([x * scale, y * scale, z_fraction * half]), 2 * radius * scale
