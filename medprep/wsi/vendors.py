"""Vendor files OpenSlide cannot tile correctly, recognised before it opens them.

Each check reads only headers and raises ``InputError`` with what the file is and what
to do, instead of OpenSlide's own message ("Couldn't get image flavor") or a misleading
guess ("a plain TIFF image that is not tiled"):

- Akoya/PerkinElmer (Vectra, Polaris) QPTIFF with several fluorescence channels, one
  greyscale page per channel: OpenSlide would read the first channel alone, if at all.
- DICOM-WSI (VL Whole Slide Microscopy) without ``ImageType``: OpenSlide needs its third
  value (VOLUME, LABEL, OVERVIEW, THUMBNAIL) to tell the pyramid from the other images.

Only structural facts go into messages (channel names, sizes); never slide IDs or other
free text of the vendor metadata.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medprep.common.errors import InputError

QPI_MARKER = "PerkinElmer-QPI-ImageDescription"
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _xml_field(description: str, name: str) -> str | None:
    match = re.search(rf"<{name}>([^<]{{0,64}})</{name}>", description)
    return match.group(1).strip() if match else None


def qptiff_problem(path: str | os.PathLike) -> str | None:
    """A one-line description of a multiplex QPTIFF, or None if ``path`` is not one."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            pages = [page for page in tiff.pages[:256] if isinstance(page, tifffile.TiffPage)]
            channels: list[str] = []
            for page in pages:
                description = page.description or ""
                if QPI_MARKER not in description[:512]:
                    return None if not channels else _qptiff_line(channels, pages[0])
                if _xml_field(description, "ImageType") != "FullResolution":
                    break
                if page.samplesperpixel != 1:
                    return None  # a brightfield (RGB) QPTIFF: OpenSlide's to judge
                channels.append(_xml_field(description, "Name") or f"channel {len(channels) + 1}")
    except Exception:  # noqa: BLE001 - not a readable TIFF: OpenSlide's message applies
        return None
    if not channels:
        return None
    return _qptiff_line(channels, pages[0])


def _qptiff_line(channels: list[str], first) -> str:
    return (
        f"a multiplex immunofluorescence QPTIFF (Akoya/PerkinElmer Vectra) with {len(channels)} "
        f"greyscale channel(s) ({', '.join(channels[:8])}) of {first.imagewidth} x "
        f"{first.imagelength} pixels, one page per channel; medprep tiles RGB slides only: "
        "export an RGB composite as a tiled pyramidal TIFF (vendor software, or "
        "`vips tiffsave --tile --pyramid`) and give that file instead"
    )


def dicom_problem(path: str | os.PathLike) -> str | None:
    """A one-line description of a DICOM-WSI OpenSlide cannot open, or None."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - OpenSlide's message applies
        return None
    if str(dataset.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        return None
    image_type = dataset.get("ImageType")
    if image_type and len(image_type) >= 3:
        return None
    what = "has no ImageType" if not image_type else f"has ImageType {list(image_type)}"
    size = ""
    if "TotalPixelMatrixColumns" in dataset and "TotalPixelMatrixRows" in dataset:
        size = f" of {dataset.TotalPixelMatrixColumns} x {dataset.TotalPixelMatrixRows} pixels"
    return (
        f"a DICOM whole-slide image{size} that {what}, which OpenSlide needs to tell the "
        "pyramid levels from label and overview images (its error: \"Couldn't get image "
        'flavor"); set ImageType, e.g. ORIGINAL\\PRIMARY\\VOLUME\\NONE for a pyramid level, '
        "with pydicom or the converter that wrote the file, and rerun"
    )


def check_supported(path: str | os.PathLike) -> None:
    """Refuse the vendor cases above with their one-line description."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        magic = f.read(4)
    problem = None
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        from medprep.wsi.guard import quiet_tifffile

        with quiet_tifffile():
            problem = qptiff_problem(path)
    else:
        problem = dicom_problem(path)
    if problem:
        raise InputError(problem, path=os.fspath(path))
