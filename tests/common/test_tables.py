"""medprep.common.tables: the tile and patch tables' arrays, built without pyarrow's Python
conversion (which imports pandas in every tile job)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from medprep.common.tables import arrow_table

KINDS = {"i": "int64", "j": "int32", "f": "float64", "b": "bool", "s": "string"}


def test_same_table_as_pyarrows_own_conversion_nulls_included():
    rng = np.random.default_rng(3)
    n = 1000
    columns = {
        "i": [None if k % 7 == 0 else int(v) for k, v in enumerate(rng.integers(-9e15, 9e15, n))],
        "j": rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int32),
        "f": [None if k % 5 == 0 else float(v) for k, v in enumerate(rng.normal(size=n))],
        "b": rng.random(n) < 0.5,
        "s": [None if k % 3 == 0 else f"tumour-{k}-ü✓" * (k % 4) for k in range(n)],
    }
    ours = arrow_table(columns, KINDS)
    types = {"int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64()}
    types |= {"bool": pa.bool_(), "string": pa.string()}
    theirs = pa.table(
        {name: pa.array(list(columns[name]), type=types[kind]) for name, kind in KINDS.items()}
    )
    assert ours.schema == theirs.schema
    assert ours.equals(theirs)
    assert ours.column("i").null_count == len(range(0, n, 7))
    assert ours.column("s").null_count == len(range(0, n, 3))
    # NaN stays a NaN value; None is null
    floats = arrow_table({"f": [float("nan"), None, 1.5]}, {"f": "float64"}).column("f")
    assert np.isnan(floats[0].as_py()) and floats.null_count == 1 and floats[2].as_py() == 1.5


def test_empty_table_and_unequal_columns():
    empty = arrow_table({name: [] for name in KINDS}, KINDS)
    assert empty.num_rows == 0 and empty.column_names == list(KINDS)
    with pytest.raises(ValueError, match="differ in length"):
        arrow_table({"i": [1, 2], "f": [1.0]}, {"i": "int64", "f": "float64"})


def test_writing_a_tile_table_does_not_import_pandas(tmp_path):
    # pandas costs about 0.3 s of CPU in each tile job that would import it
    code = f"""
import sys
from medprep.wsi import writers
from medprep.ct import tile
columns = {{name: [] for name in writers.TABLE_COLUMNS}}
writers.write_table(columns, {str(tmp_path / "t.parquet")!r})
rows = {{name: [] for name in tile.TABLE_COLUMNS}}
tile._write_table({str(tmp_path / "p.parquet")!r}, rows)
assert "pandas" not in sys.modules, "pandas was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "t.parquet").num_rows == 0
