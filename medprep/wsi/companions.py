"""Slide formats whose index file names other files, checked before OpenSlide opens them.

OpenSlide joins the names it finds in these index files to their folder as they are:

- MIRAX (``x.mrxs``): ``x/Slidedat.ini`` names the index (``[HIERARCHICAL] INDEXFILE``)
  and the data files (``[DATAFILE] FILE_0`` ...), inside ``x/``;
- Hamamatsu VMS/VMU: the ``.vms``/``.vmu`` file names its JPEG or NGR images
  (``ImageFile``, ``ImageFile(x,y)``), ``MapFile``, ``OptimisationFile`` and
  ``MacroImage``, beside it.

A name with ``..`` in it would make OpenSlide read, and medprep publish as tiles, a file
outside the sample. Every name must stay inside the slide's own folder. (DICOM-WSI reads
the other files of its folder, which is the sample; the TIFF-based formats name no file.)
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

from medprep.common.errors import InputError

MAX_INDEX_BYTES = 1 << 20  # OpenSlide's own limit for Slidedat.ini
_VMS_KEYS = ("ImageFile", "MapFile", "OptimisationFile", "MacroImage")


def _read_ini(path: Path) -> configparser.ConfigParser | None:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_INDEX_BYTES).decode("utf-8-sig", errors="replace")
    except OSError:
        return None  # missing or unreadable: OpenSlide reports it when it opens the slide
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    return parser


def named_files(slide: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The file of a slide that names other files, and (key, name) of each name."""
    suffix = slide.suffix.lower()
    if suffix == ".mrxs":
        index = slide.with_suffix("") / "Slidedat.ini"
        ini = _read_ini(index)
        if ini is None:
            return index, []
        names = []
        if ini.has_option("HIERARCHICAL", "INDEXFILE"):
            names.append(("INDEXFILE", ini.get("HIERARCHICAL", "INDEXFILE")))
        if ini.has_section("DATAFILE"):
            names += [
                (key, value)
                for key, value in ini.items("DATAFILE")
                if re.fullmatch(r"FILE_\d+", key)
            ]
        return index, names
    if suffix in (".vms", ".vmu"):
        ini = _read_ini(slide)
        if ini is None:
            return slide, []
        names = [
            (key, value)
            for section in ini.sections()
            for key, value in ini.items(section)
            if key.startswith(_VMS_KEYS)
        ]
        return slide, names
    return slide, []


def check_named_files(slide: str | os.PathLike) -> None:
    """Refuse a slide whose index file names a file outside the slide's own folder."""
    index, names = named_files(Path(slide))
    for key, name in names:
        value = name.strip().strip('"')
        parts = re.split(r"[\\/]", value)
        if not value or os.path.isabs(value) or ".." in parts or re.match(r"^[A-Za-z]:", value):
            raise InputError(
                f"{key} names {value!r}, outside the slide's folder {index.parent.name}/; "
                "every file of a slide must sit in its own folder",
                path=str(index),
            )
