"""The pydicom edge: read headers without pixels, decode pixels of chosen slices.

Compressed transfer syntaxes decode through pydicom's pixel handlers, which use the
installed pylibjpeg plugins (libjpeg: JPEG and JPEG-LS; openjpeg: JPEG 2000; rle: RLE).
Files without the 128-byte preamble and ``DICM`` prefix are read with ``force=True``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Literal, overload

import numpy as np

from medprep.common import claims
from medprep.common.errors import InputError
from medprep.common.parallel import thread_map
from medprep.ct.series import Rejected, SliceHeader

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
    # free text that sites type identifiers into (removed by DICOM's basic profile)
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ImageComments",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
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


@overload
def _signed(value: int, representation: int) -> int: ...
@overload
def _signed(value: int | None, representation: int) -> int | None: ...
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


_FRAMES_LOCK = threading.Lock()
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"

# Transfer syntaxes pydicom decodes through a plugin: which package to install.
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
# Lossy transfer syntaxes: decoded values approximate the original ones.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}


DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
RLE_SYNTAX = "1.2.840.10008.1.2.5"
# Inflating a deflated dataset to count its bytes, this much at a time.
INFLATE_CHUNK = 1 << 20


def claimed_pixel_bytes(header: SliceHeader) -> int:
    """Bytes the pixel data decodes to, as the header claims: rows x columns x frames x
    samples x bits allocated (every frame of a multi-frame file)."""
    bits = max(header.bits_allocated, 1)
    pixels = header.rows * header.cols * max(header.frames, 1) * max(header.samples_per_pixel, 1)
    return pixels * bits // 8 if bits % 8 == 0 else -(-pixels * bits // 8)


def check_pixel_claim(
    header: SliceHeader, stored_bytes: int, memory_bytes: int | None = None
) -> None:
    """Refuse a file whose pixel data would decode to more than its stored bytes can hold
    for its transfer syntax (``medprep.common.claims``: RLE 64:1, JPEG family and JPEG 2000
    5000:1, native in full) or more than this job's memory, before anything is decoded."""
    from pydicom.uid import UID

    claim = claimed_pixel_bytes(header)
    what = (
        f"{header.rows} x {header.cols} pixels x {max(header.frames, 1)} frame(s) x "
        f"{header.samples_per_pixel} sample(s) x {header.bits_allocated} bits"
    )
    ts = UID(header.transfer_syntax)
    if str(ts) == RLE_SYNTAX:
        ratio = claims.RLE_MAX_RATIO
    elif ts.is_compressed:
        ratio = claims.GENERAL_MAX_RATIO
    else:  # native (a deflated dataset is inflated by then): every byte is stored
        ratio = None
    claims.check_claim(
        claim,
        what=what,
        path=header.path,
        stored_bytes=stored_bytes,
        max_ratio=ratio,
        memory_bytes=memory_bytes,
    )


def check_codestream_claim(header: SliceHeader, ds) -> None:
    """Refuse a compressed frame whose own codestream header (JPEG SOF, JPEG-LS SOF55,
    JPEG 2000 SIZ) claims another size or more components than the DICOM header: the
    decoder would allocate what the codestream says."""
    from pydicom.encaps import get_frame

    frames = max(header.frames, 1)
    frame = get_frame(ds.PixelData, header.frame or 0, number_of_frames=frames)
    claim = claims.codestream_claim(bytes(frame[:65536]))
    if claim is None:
        return  # RLE, or no header found: the decoder reports what is wrong
    width, height, components = claim
    if (width, height) != (header.cols, header.rows) or components > header.samples_per_pixel:
        raise InputError(
            f"compressed frame {header.frame or 0} claims {width} x {height} pixels of "
            f"{components} component(s) but the DICOM header says {header.cols} x "
            f"{header.rows} of {header.samples_per_pixel} (a damaged header or a "
            "decompression bomb); refused unread",
            path=header.path,
        )


def check_deflated_size(path: str, memory_bytes: int | None = None) -> None:
    """A Deflated Explicit VR Little Endian file is inflated whole by pydicom before any
    of its tags can be read: count what it inflates to first, in bounded pieces, and refuse
    it when that is more than this job's memory."""
    import zlib

    import pydicom

    meta = pydicom.filereader.read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_SYNTAX:
        return
    limit = claims.memory_limit_bytes() if memory_bytes is None else memory_bytes
    with open(path, "rb") as f:
        data = f.read()
    # the deflated stream follows the file meta group
    start = _file_meta_end(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = data[start:]
    while pending and not inflater.eof:
        total += len(inflater.decompress(pending, INFLATE_CHUNK))
        pending = inflater.unconsumed_tail
        if total > limit:
            raise InputError(
                f"deflated dataset of {claims.human_bytes(len(data) - start)} inflates to more "
                f"than the {claims.human_bytes(limit)} of memory this job can have "
                "(a decompression bomb); refused unread",
                path=path,
            )


def _names_deflated_syntax(path: str) -> bool:
    """Whether the file meta group may name the deflated syntax (a cheap look before
    pydicom parses it)."""
    with open(path, "rb") as f:
        return DEFLATED_SYNTAX.encode() in f.read(4096)


def _file_meta_end(data: bytes) -> int:
    """Where the dataset starts after the preamble, ``DICM`` and the file meta group."""
    import struct

    pos = 132
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            length = struct.unpack("<I", data[pos + 8 : pos + 12])[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", data[pos + 6 : pos + 8])[0]
            pos += 8 + length
    return pos


def read_header(index: int, path: str) -> SliceHeader | Rejected:
    """The header of a single-frame file (the first frame's of a multi-frame one)."""
    item = read_file(index, path)
    return item[0] if isinstance(item, list) else item


def read_file(index: int, path: str) -> list[SliceHeader] | Rejected:
    """Parse one file once (pixels stay on disk): one header per slice (per frame of an
    Enhanced CT); non-DICOM files come back as Rejected."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        preamble = _has_dicom_prefix(path)
        if preamble and _names_deflated_syntax(path):
            check_deflated_size(path)
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, force=not preamble)
    except InputError as error:
        return Rejected(index, path, f"invalid pixel data: {error.cause}")
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as error:
        return Rejected(index, path, f"unreadable DICOM ({type(error).__name__})")
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds on garbage
        return Rejected(index, path, f"unreadable DICOM ({type(error).__name__})")
    meta_sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if ds.file_meta else ""
    sop = str(ds.get("SOPClassUID", "") or meta_sop)
    if not preamble and not sop and "Modality" not in ds:
        return Rejected(index, path, "not DICOM")
    try:
        header = _header_from_dataset(index, path, ds, sop, preamble)
    except Exception as error:  # noqa: BLE001 - malformed values of any kind
        return Rejected(index, path, f"malformed DICOM header ({type(error).__name__}: {error})")
    if header.has_pixel_data and not header.pixel_data_truncated:
        try:
            check_pixel_claim(header, _stored_pixel_bytes(ds, path))
        except InputError as error:
            return Rejected(index, path, f"invalid pixel data: {error.cause}", header.series_uid)
    try:
        if header.frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
            return _frame_headers(header, ds)
        return [header]
    except Exception as error:  # noqa: BLE001 - malformed values of any kind
        return Rejected(index, path, f"malformed DICOM header ({type(error).__name__}: {error})")


def _stored_pixel_bytes(ds, path: str) -> int:
    """The bytes that can back the pixel data: from where it starts to the end of the
    file (its own length when it was read into memory, as in a deflated dataset)."""
    elem = ds.get_item("PixelData")
    start = getattr(elem, "file_tell", None)
    value = getattr(elem, "value", None)
    if isinstance(value, bytes | bytearray):
        return len(value)
    if start is not None and str(_transfer_syntax(ds)) != DEFLATED_SYNTAX:
        return max(os.path.getsize(path) - int(start), 0)
    length = getattr(elem, "length", None)
    return int(length) if length not in (None, 0xFFFFFFFF) else os.path.getsize(path)


@overload
def _floats(value: object, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: object, count: int) -> tuple[float, ...] | None: ...
def _floats(value, count: int) -> tuple[float, ...] | None:
    """The ``count`` numbers of a multi-valued element (None: missing, not numbers, or
    another count)."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _functional(item, shared, sequence: str, keyword: str):
    """``keyword`` from the per-frame functional group ``sequence``, else the shared one."""
    for source in (item, shared):
        if source is not None and sequence in source and len(source[sequence].value):
            inner = source[sequence].value[0]
            if keyword in inner:
                return inner.get(keyword)
    return None


def _frame_headers(base: SliceHeader, ds) -> list[SliceHeader]:
    """One header per frame of an Enhanced (multi-frame) CT, from its functional groups."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if len(per_frame) != base.frames:
        raise ValueError(f"{len(per_frame)} per-frame functional groups for {base.frames} frames")
    frame_bytes = base.rows * base.cols * base.bits_allocated // 8
    out = []
    for frame, item in enumerate(per_frame):

        def get(sequence, keyword, item=item):
            return _functional(item, shared, sequence, keyword)

        frame_type = get("CTImageFrameTypeSequence", "FrameType")
        kernel = get("CTReconstructionSequence", "ConvolutionKernel")
        rescale_type = get("PixelValueTransformationSequence", "RescaleType")
        out.append(
            dataclasses.replace(
                base,
                frame=frame,
                position=_floats(get("PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats(get("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(get("PixelMeasuresSequence", "PixelSpacing"), 2),
                slice_thickness=_float(get("PixelMeasuresSequence", "SliceThickness")),
                rescale_slope=_float(get("PixelValueTransformationSequence", "RescaleSlope")),
                rescale_intercept=_float(
                    get("PixelValueTransformationSequence", "RescaleIntercept")
                ),
                rescale_type=str(rescale_type) if rescale_type else base.rescale_type,
                image_type=tuple(str(v) for v in frame_type) if frame_type else base.image_type,
                kernel=_joined(kernel) if kernel else base.kernel,
                pixel_data_offset=(
                    None
                    if base.pixel_data_offset is None
                    else base.pixel_data_offset + frame * frame_bytes
                ),
            )
        )
    return out


def _joined(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value.strip()
    return "\\".join(str(v).strip() for v in value)


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
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
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
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        kernel=_joined(ds.get("ConvolutionKernel")),
        lossy=str(ds.get("LossyImageCompression", "")) == "01" or ts in LOSSY_SYNTAXES,
        # kept only where pixels decode through pydicom (native ones are read at the offset)
        dataset=ds if offset is None else None,
    )


def quiet_pydicom() -> None:
    """Stop pydicom warning about invalid values while reading: its warnings quote the
    values (patient names among them), and the rule log captures warnings."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def read_identifiers(header: SliceHeader) -> dict[str, str]:
    """Patient and study identifiers of one file (only used with include_identifiers)."""
    ds = header.dataset
    if ds is None:
        import pydicom

        ds = pydicom.dcmread(header.path, stop_before_pixels=True, force=not header.preamble)
    return {k: str(ds.get(k)) for k in IDENTIFIER_KEYWORDS if ds.get(k) not in (None, "")}


def scan_headers(paths: Sequence[str], threads: int = 1) -> list[SliceHeader | Rejected]:
    """Headers of all files (one per frame of a multi-frame file), in input order, read on
    ``threads`` threads."""
    quiet_pydicom()
    out: list[SliceHeader | Rejected] = []
    for item in thread_map(lambda item: read_file(*item), list(enumerate(paths)), max(1, threads)):
        out.extend(item if isinstance(item, list) else [item])
    return out


def read_pixels(header: SliceHeader) -> np.ndarray:
    """The stored pixel values of one slice (rows, cols), as pydicom decodes them.

    Native little-endian 8/16-bit data are read straight from the offset the header scan
    found; everything else is decoded from the dataset kept by the header scan (its pixel
    data element is read from disk then, the file is not parsed again).
    """
    if header.pixel_data_offset is not None and header.bits_allocated in (8, 16):
        return _read_native(header, header.pixel_data_offset)
    return _read_with_pydicom(header)


def _read_native(header: SliceHeader, offset: int) -> np.ndarray:
    signed = header.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{header.bits_allocated // 8}")
    count = header.rows * header.cols
    try:
        with open(header.path, "rb") as f:
            f.seek(offset)
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


def _cannot_decode(ts) -> str:
    name = f"{ts.name} ({ts})"
    package = DECODER_PACKAGES.get(str(ts))
    if package:
        try:
            import importlib.metadata as md

            md.version(package)
        except md.PackageNotFoundError:
            return (
                f"cannot decode transfer syntax {name}: install {package} (pip install {package})"
            )
    return (
        f"cannot decode transfer syntax {name}: no decoder in pydicom or its pylibjpeg plugins; "
        "convert the files to an uncompressed or lossless syntax first (e.g. DCMTK: "
        "dcmdjpeg in.dcm out.dcm, or GDCM: gdcmconv --raw in.dcm out.dcm)"
    )


def _read_with_pydicom(header: SliceHeader) -> np.ndarray:
    import pydicom
    from pydicom.pixels import pixel_array
    from pydicom.uid import UID

    ts = UID(header.transfer_syntax)
    if ts.is_compressed and not ts.is_deflated and not _can_decode(ts):
        raise InputError(_cannot_decode(ts), path=header.path)
    try:
        ds = header.dataset
        if ds is not None and header.frame is not None:
            with _FRAMES_LOCK:  # frames of one file share its dataset: load its pixels once
                ds.get("PixelData")
        if ds is None:
            ds = pydicom.dcmread(header.path, defer_size=DEFER_BYTES, force=not header.preamble)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = ts
        if ts.is_encapsulated:
            check_codestream_claim(header, ds)
        pixels = pixel_array(ds, index=header.frame)
    except NotImplementedError as error:
        raise InputError(_cannot_decode(ts), path=header.path) from error
    except InputError:
        raise
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


def _can_decode(ts) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return get_decoder(ts).is_available
    except NotImplementedError:
        return False


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
