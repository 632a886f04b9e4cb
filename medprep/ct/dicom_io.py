"""The pydicom edge: read headers without pixels, decode pixels of chosen slices.

Compressed transfer syntaxes decode through pydicom's pixel handlers, which use the
installed pylibjpeg plugins (libjpeg: JPEG and JPEG-LS; openjpeg: JPEG 2000; rle: RLE).
Files without the 128-byte preamble and ``DICM`` prefix are read with ``force=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from medprep.ct.series import Rejected, SliceHeader
from medprep.errors import InputError
from medprep.parallel import thread_map

# Values longer than this are left on disk while reading headers (pixel data, big private tags).
DEFER_BYTES = 4096

IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "AccessionNumber",
    "InstitutionName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _has_dicom_prefix(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _float(value, default=None):
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _int(value, default=None):
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _signed(value: int | None, representation: int) -> int | None:
    # PixelPaddingValue is "US or SS"; writers often store a signed value as US (-2000 as 63536).
    if value is None:
        return None
    value = int(value)
    if representation == 1 and value > 32767:
        value -= 65536
    return value


def _transfer_syntax(ds) -> str:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return str(ts)
    from pydicom import uid

    implicit, little = getattr(ds, "original_encoding", (True, True))
    if little:
        return uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
    return uid.ExplicitVRBigEndian


def read_header(index: int, path: str) -> SliceHeader | Rejected:
    """Read one file's header (pixels stay on disk); non-DICOM files come back as Rejected."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        preamble = _has_dicom_prefix(path)
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, force=not preamble)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as error:
        return Rejected(index, path, f"unreadable DICOM ({type(error).__name__})")
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds on garbage
        return Rejected(index, path, f"unreadable DICOM ({type(error).__name__})")
    meta_sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if ds.file_meta else ""
    sop = str(ds.get("SOPClassUID", "") or meta_sop)
    if not preamble and not sop and "Modality" not in ds:
        return Rejected(index, path, "not DICOM")
    try:
        return _header_from_dataset(index, path, ds, sop, preamble)
    except Exception as error:  # noqa: BLE001 - malformed values of any kind
        return Rejected(index, path, f"malformed DICOM header ({type(error).__name__}: {error})")


def _header_from_dataset(index, path, ds, sop, preamble) -> SliceHeader:
    representation = _int(ds.get("PixelRepresentation"), 0)
    lut = None
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        data = item.LUTData
        if isinstance(data, bytes | bytearray):
            data = np.frombuffer(data, dtype="<u2" if descriptor[2] > 8 else "u1")
        entries = tuple(int(v) for v in np.atleast_1d(data))
        lut = (entries, _signed(descriptor[1], representation))
    has_pixels = "PixelData" in ds
    truncated = False
    ts = _transfer_syntax(ds)
    offset = None
    if has_pixels:
        from pydicom.uid import UID

        elem = ds.get_item("PixelData")
        start = getattr(elem, "file_tell", None)
        native = not UID(ts).is_compressed and not UID(ts).is_deflated
        if native and start is not None:
            expected = (
                _int(ds.get("Rows"), 0)
                * _int(ds.get("Columns"), 0)
                * _int(ds.get("SamplesPerPixel"), 1)
                * _int(ds.get("NumberOfFrames"), 1)
                * _int(ds.get("BitsAllocated"), 16)
                // 8
            )
            truncated = os.path.getsize(path) - int(start) < expected
            if UID(ts).is_little_endian:
                offset = int(start)
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    return SliceHeader(
        index=index,
        path=path,
        sop_class_uid=sop,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")).upper(),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "")),
        image_type=tuple(str(v) for v in (ds.get("ImageType") or ())),
        rows=_int(ds.get("Rows"), 0),
        cols=_int(ds.get("Columns"), 0),
        position=tuple(float(v) for v in position) if position and len(position) == 3 else None,
        orientation=(
            tuple(float(v) for v in orientation) if orientation and len(orientation) == 6 else None
        ),
        pixel_spacing=tuple(float(v) for v in spacing) if spacing and len(spacing) == 2 else None,
        instance_number=_int(ds.get("InstanceNumber")),
        slice_thickness=_float(ds.get("SliceThickness")),
        frames=_int(ds.get("NumberOfFrames"), 1) or 1,
        samples_per_pixel=_int(ds.get("SamplesPerPixel"), 1),
        has_pixel_data=has_pixels,
        pixel_data_truncated=truncated,
        transfer_syntax=ts,
        preamble=preamble,
        gantry_tilt_deg=_float(ds.get("GantryDetectorTilt")),
        rescale_slope=_float(ds.get("RescaleSlope")),
        rescale_intercept=_float(ds.get("RescaleIntercept")),
        rescale_type=str(ds.get("RescaleType")) if ds.get("RescaleType") else None,
        modality_lut=lut,
        pixel_representation=representation,
        bits_allocated=_int(ds.get("BitsAllocated"), 16),
        bits_stored=_int(ds.get("BitsStored"), 16),
        pixel_data_offset=offset,
        padding_value=_signed(_int(ds.get("PixelPaddingValue")), representation),
        padding_range_limit=_signed(_int(ds.get("PixelPaddingRangeLimit")), representation),
    )


def quiet_pydicom() -> None:
    """Stop pydicom warning about invalid values while reading: its warnings quote the
    values (patient names among them), and the rule log captures warnings."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def read_identifiers(header: SliceHeader) -> dict[str, str]:
    """Patient and study identifiers of one file (only used with include_identifiers)."""
    import pydicom

    ds = pydicom.dcmread(header.path, stop_before_pixels=True, force=not header.preamble)
    return {k: str(ds.get(k)) for k in IDENTIFIER_KEYWORDS if ds.get(k) not in (None, "")}


def scan_headers(paths: Sequence[str], threads: int = 1) -> list[SliceHeader | Rejected]:
    """Headers of all files, in input order, read on ``threads`` threads."""
    quiet_pydicom()
    return list(
        thread_map(lambda item: read_header(*item), list(enumerate(paths)), max(1, threads))
    )


def read_pixels(header: SliceHeader) -> np.ndarray:
    """The stored pixel values of one slice (rows, cols), as pydicom decodes them.

    Native little-endian 8/16-bit data are read straight from the offset the header scan
    found (no second parse of the file); everything else goes through pydicom's handlers.
    """
    if header.pixel_data_offset is not None and header.bits_allocated in (8, 16):
        return _read_native(header)
    return _read_with_pydicom(header)


def _read_native(header: SliceHeader) -> np.ndarray:
    signed = header.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{header.bits_allocated // 8}")
    count = header.rows * header.cols
    try:
        with open(header.path, "rb") as f:
            f.seek(header.pixel_data_offset)
            data = np.fromfile(f, dtype=dtype, count=count)
    except OSError as error:
        raise InputError(f"cannot read pixel data: {error}", path=header.path) from error
    if data.size != count:
        raise InputError("truncated file: pixel data shorter than expected", path=header.path)
    pixels = data.reshape(header.rows, header.cols)
    unused = header.bits_allocated - header.bits_stored
    if 0 < unused < header.bits_allocated:
        # bits above BitsStored may hold anything (old overlays): drop them, keep the sign
        if signed:
            pixels = (pixels << unused) >> unused
        else:
            pixels = pixels & dtype.type((1 << header.bits_stored) - 1)
    return pixels


def _read_with_pydicom(header: SliceHeader) -> np.ndarray:
    import pydicom
    from pydicom.uid import UID

    ts = UID(header.transfer_syntax)
    try:
        ds = pydicom.dcmread(header.path, force=not header.preamble)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = ts
        pixels = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - any decoder failure is bad input here
        raise InputError(
            f"cannot decode pixel data ({ts.name}): {type(error).__name__}: {error}",
            path=header.path,
        ) from error
    if pixels.shape != (header.rows, header.cols):
        raise InputError(
            f"decoded pixel data has shape {pixels.shape}, expected ({header.rows}, {header.cols})",
            path=header.path,
        )
    return pixels


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for name in (
        "medprep",
        "pydicom",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "numpy",
        "scipy",
        "nibabel",
        "pillow",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions
