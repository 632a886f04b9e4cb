"""MetaImage headers (``.mhd``), read and checked by medprep before SimpleITK sees a file.

A header names its voxel data in ``ElementDataFile``: ``LOCAL`` (after the header, in the
same file), one file name (LUNA16's ``x.raw``), ``LIST`` (file names on the lines that
follow) or a numbered pattern (``slice%03d.raw 1 120 1``). Any of these may name an
absolute path, a ``../`` path or a file of another sample, and SimpleITK reads whatever
it is told. So SimpleITK never reads the input's own header: medprep parses it, checks
that every data file is one of the sample's own files inside the header's folder and
that the claimed size is backed by the data, and gives SimpleITK a header of its own
that names only those checked files (``sanitised_header``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from medprep.common import claims
from medprep.common.errors import InputError

# Headers are a few hundred bytes; a LIST of one file per slice stays well under this.
MAX_HEADER_BYTES = 1 << 20
MAX_SIDE = 1 << 16
MAX_DATA_FILES = 1 << 14

ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
# fields passed on to SimpleITK (first name: the one written), with the aliases MetaIO reads
FIELDS = {
    "ObjectType": (),
    "NDims": (),
    "DimSize": (),
    "ElementType": (),
    "ElementSpacing": (),
    "ElementSize": (),
    "Offset": ("Position", "Origin"),
    "TransformMatrix": ("Rotation", "Orientation"),
    "CenterOfRotation": (),
    "AnatomicalOrientation": (),
    "ElementByteOrderMSB": ("BinaryDataByteOrderMSB",),
    "BinaryData": (),
    "CompressedData": (),
    "CompressedDataSize": (),
    "ElementNumberOfChannels": (),
    "HeaderSize": (),
}
_CANONICAL = {alias: name for name, aliases in FIELDS.items() for alias in (name, *aliases)}
_NUMBERS = re.compile(r"^[-+0-9.eE ]+$")
_WORD = re.compile(r"^[A-Za-z_]+$")


@dataclass(frozen=True)
class MetaImageHeader:
    """A parsed header: ``fields`` by canonical name (values as written), the data files
    (absolute paths, checked), and where LOCAL data starts in the header's own file."""

    path: str
    fields: dict[str, str]
    data_files: tuple[str, ...] = ()
    local_offset: int | None = None
    list_dims: int | None = None
    dims: tuple[int, ...] = field(default=())

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.fields["ElementType"]]

    @property
    def channels(self) -> int:
        return int(self.fields.get("ElementNumberOfChannels", "1"))

    @property
    def compressed(self) -> bool:
        return self.fields.get("CompressedData", "False").lower() == "true"

    @property
    def decoded_bytes(self) -> int:
        return math.prod(self.dims) * self.element_bytes * self.channels


def _refuse(header: str, cause: str) -> InputError:
    return InputError(f"MetaImage header: {cause}", path=header)


def _checked_name(header: str, value: str) -> str:
    """The absolute path of a data file named ``value`` in ``header``, if it stays inside
    the header's folder; otherwise one line naming the header and the value."""
    if not value:
        raise _refuse(header, "ElementDataFile names no file")
    if os.path.isabs(value) or value.startswith(("\\", "~")) or re.match(r"^[A-Za-z]:", value):
        raise _refuse(
            header,
            f"ElementDataFile {value!r} is an absolute path; a data file must sit in the "
            "sample's own folder, named relative to its header",
        )
    parts = re.split(r"[\\/]", value)
    if ".." in parts:
        raise _refuse(
            header,
            f"ElementDataFile {value!r} climbs out of the header's folder; a data file must "
            "sit in the sample's own folder",
        )
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(header)), value))


def data_file_names(value: str, following: list[str], header: str) -> tuple[list[str], int | None]:
    """The file names that ``ElementDataFile = value`` means (``following``: the header's
    lines after it, for LIST), and the dimension of each file for LIST/patterns."""
    words = value.split()
    if words and words[0].upper() == "LIST":
        names = [line.strip() for line in following if line.strip()]
        dims = (
            int(words[1].rstrip("Dd"))
            if len(words) > 1 and words[1].rstrip("Dd").isdigit()
            else None
        )
        return names, dims
    if "%" in value and len(words) >= 3:
        try:
            start, stop = int(words[1]), int(words[2])
            step = int(words[3]) if len(words) > 3 else 1
            dims = int(words[4]) if len(words) > 4 else None
        except ValueError:
            raise _refuse(header, f"ElementDataFile pattern {value!r} is malformed") from None
        if step <= 0 or stop < start or (stop - start) // step + 1 > MAX_DATA_FILES:
            raise _refuse(header, f"ElementDataFile pattern {value!r} has an unusable range")
        try:
            names = [words[0] % k for k in range(start, stop + 1, step)]
        except (TypeError, ValueError):
            raise _refuse(header, f"ElementDataFile pattern {value!r} is malformed") from None
        return names, dims
    return [value], None


def read_header(path: str, sample_files: Collection[str] | None = None) -> MetaImageHeader:
    """Parse and check the header at ``path``.

    ``sample_files``: the sample's own files; every data file must be one of them (by
    real path). None checks only that data files stay inside the header's folder (the
    download of a single ``.mhd`` uses this to find its data files).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES)
    except OSError as error:
        raise InputError(f"cannot read MetaImage header: {error.strerror}", path=path) from None
    fields: dict[str, str] = {}
    offset = 0
    lines = raw.split(b"\n")
    for number, line in enumerate(lines):
        offset += len(line) + 1
        text = line.decode("latin-1").strip()
        key, equals, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            continue
        if key == "ElementDataFile":
            following = [part.decode("latin-1") for part in lines[number + 1 :]]
            return _finish(path, fields, value, following, offset, sample_files)
        name = _CANONICAL.get(key)
        if name is None:
            continue  # comments, names and other fields SimpleITK does not need
        if name in fields:
            raise _refuse(path, f"{key} is given twice")
        if not (_NUMBERS.match(value) or _WORD.match(value)):
            raise _refuse(path, f"{key} has an unusable value {value[:60]!r}")
        fields[name] = value
    raise _refuse(path, "no ElementDataFile (not a MetaImage header, or cut short)")


def _finish(
    path: str,
    fields: dict[str, str],
    value: str,
    following: list[str],
    offset: int,
    sample_files: Collection[str] | None,
) -> MetaImageHeader:
    dims = _dims(path, fields)
    if fields.get("ElementType") not in ELEMENT_BYTES:
        raise _refuse(path, f"ElementType {fields.get('ElementType')!r} is not a scalar type")
    if value.upper() == "LOCAL":
        if "HeaderSize" in fields:
            raise _refuse(path, "HeaderSize with ElementDataFile = LOCAL is not supported")
        return MetaImageHeader(path, fields, local_offset=offset, dims=dims)
    names, list_dims = data_file_names(value, following, path)
    if not names or len(names) > MAX_DATA_FILES:
        raise _refuse(path, f"ElementDataFile names {len(names)} files")
    files = tuple(_checked_name(path, name) for name in names)
    if sample_files is not None:
        own = {os.path.realpath(p) for p in sample_files}
        for name, full in zip(names, files, strict=True):
            if os.path.realpath(full) not in own:
                raise _refuse(
                    path,
                    f"ElementDataFile {name!r} is not one of the sample's files (a data file "
                    "must be fetched with its header: beside it, named as LUNA16 does, or in "
                    "the same folder sample)",
                )
    return MetaImageHeader(path, fields, data_files=files, list_dims=list_dims, dims=dims)


def _dims(path: str, fields: dict[str, str]) -> tuple[int, ...]:
    try:
        ndims = int(fields.get("NDims", "0"))
        dims = tuple(int(v) for v in fields.get("DimSize", "").split())
    except ValueError:
        raise _refuse(path, f"DimSize {fields.get('DimSize')!r} is not whole numbers") from None
    if not 1 <= ndims <= 4 or len(dims) != ndims:
        raise _refuse(
            path, f"NDims {fields.get('NDims')!r} and DimSize {fields.get('DimSize')!r} disagree"
        )
    if any(not 1 <= n <= MAX_SIDE for n in dims):
        raise _refuse(path, f"DimSize {fields['DimSize']!r}: each side must be 1..{MAX_SIDE}")
    return dims


def check_claim(header: MetaImageHeader, *, memory_bytes: int | None = None) -> None:
    """Refuse a header whose claimed voxels its data cannot back, or that no memory holds."""
    if header.local_offset is not None:
        stored = os.path.getsize(header.path) - header.local_offset
    else:
        stored = sum(os.path.getsize(p) for p in header.data_files if os.path.isfile(p))
        missing = [p for p in header.data_files if not os.path.isfile(p)]
        if missing:
            raise _refuse(header.path, f"data file {os.path.basename(missing[0])} not found")
        skip = int(header.fields.get("HeaderSize", "0") or 0)
        stored -= max(skip, 0) * len(header.data_files)
    what = f"{' x '.join(str(n) for n in header.dims)} voxels of {header.fields['ElementType']}" + (
        f" x {header.channels} channels" if header.channels > 1 else ""
    )
    claims.check_claim(
        header.decoded_bytes,
        what=what,
        path=header.path,
        stored_bytes=stored,
        max_ratio=claims.DEFLATE_MAX_RATIO if header.compressed else None,
        memory_bytes=memory_bytes,
    )


def sanitised_header(header: MetaImageHeader) -> str:
    """A header naming only the checked data files, by absolute path, for SimpleITK."""
    lines = [f"{name} = {header.fields[name]}" for name in FIELDS if name in header.fields]
    if header.local_offset is not None:
        lines.append(f"HeaderSize = {header.local_offset}")
        lines.append(f"ElementDataFile = {os.path.abspath(header.path)}")
    elif len(header.data_files) == 1 and header.list_dims is None:
        lines.append(f"ElementDataFile = {header.data_files[0]}")
    else:
        dims = f" {header.list_dims}D" if header.list_dims else ""
        lines.append(f"ElementDataFile = LIST{dims}")
        lines.extend(header.data_files)
    return "\n".join(lines) + "\n"
