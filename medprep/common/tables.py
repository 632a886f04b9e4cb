"""Arrow tables from columns of plain values (lists or numpy arrays), for the tile and
patch tables that every tile job writes.

The arrays are built from numpy buffers. pyarrow's own conversion of Python sequences
(``pa.array``, ``pa.table`` on lists) imports pandas to look for pandas objects, which
costs about 0.3 s of CPU in each job: more than writing a table of 10,000 rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# the column kinds the tables use, as numpy dtypes
KINDS: dict[str, type[np.generic]] = {
    "int64": np.int64,
    "int32": np.int32,
    "float64": np.float64,
    "bool": np.bool_,
}


def _validity(values: Sequence[Any] | np.ndarray) -> np.ndarray | None:
    """True where a value is present, or None when every value is (numpy input never
    holds None)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return None
    present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    return None if present.all() else present


def _bitmap(present: np.ndarray | None):
    import pyarrow as pa

    if present is None:
        return None
    return pa.py_buffer(np.packbits(present, bitorder="little"))


def _string_array(values: Sequence[str | None] | np.ndarray, present: np.ndarray | None):
    import pyarrow as pa

    encoded = [b"" if v is None else str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a string column of a table holds 2 GiB or more")
    return pa.Array.from_buffers(
        pa.string(),
        len(encoded),
        [_bitmap(present), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
    )


def arrow_array(values: Sequence[Any] | np.ndarray, kind: str):
    """One column as a pyarrow array of ``kind`` ("string" or a key of ``KINDS``);
    None becomes null."""
    import pyarrow as pa

    present = _validity(values)
    if kind == "string":
        return _string_array(values, present)
    if present is not None:
        values = [0 if v is None else v for v in values]
    data = np.ascontiguousarray(np.asarray(values, dtype=KINDS[kind]))
    arrow_type = {"int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64()}
    if kind == "bool":
        buffer, arrow_kind = pa.py_buffer(np.packbits(data, bitorder="little")), pa.bool_()
    else:
        buffer, arrow_kind = pa.py_buffer(data), arrow_type[kind]
    return pa.Array.from_buffers(arrow_kind, len(data), [_bitmap(present), buffer])


def arrow_table(columns: Mapping[str, Sequence[Any] | np.ndarray], kinds: Mapping[str, str]):
    """The table of ``kinds``' columns, in that order, taken from ``columns``."""
    import pyarrow as pa

    lengths = {name: len(columns[name]) for name in kinds}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"table columns differ in length: {lengths}")
    arrays = [arrow_array(columns[name], kind) for name, kind in kinds.items()]
    return pa.Table.from_arrays(arrays, names=list(kinds))
