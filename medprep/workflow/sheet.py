"""The sample sheet: read, validate row by row, and report problems by line and column."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medprep.common.settings import load_schema

NUMERIC_COLUMNS = ("mpp",)
# optional columns added empty when missing
OPTIONAL_COLUMNS = ("mpp", "series_uid", "label", "patient", "annotations")
# the suffixes of the annotation files each modality reads (the ``annotations`` column)
ANNOTATION_SUFFIXES = {"ct": (".csv", ".xml"), "wsi": (".geojson", ".json")}
# columns whose values never appear in messages (they may be pseudonyms of patients)
PRIVATE_COLUMNS = ("patient",)
META_PREFIX = "meta_"


def carried_columns(columns) -> list[str]:
    """The sheet columns copied into the dataset index: label, patient, meta_*."""
    return ["label", "patient", *sorted(c for c in columns if str(c).startswith(META_PREFIX))]


class SampleSheetError(ValueError):
    """A problem in the sample sheet, naming the file, the line and the column."""


def read_sample_sheet(path: str | os.PathLike, schema_path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a tab-separated sample sheet; index it by ``sample``.

    Lines starting with ``#`` and blank lines are skipped; empty cells are missing values.
    Errors name the sheet, the line (as shown by an editor, counting from 1), the sample
    and the column.
    """
    import jsonschema

    path = Path(path)
    if not path.is_file():
        raise SampleSheetError(f"sample sheet {path} does not exist")
    schema = load_schema(os.fspath(schema_path))
    header_line, header, rows = _read_rows(path, required=schema.get("required", []))
    for column in schema.get("required", []):
        if column not in header:
            raise SampleSheetError(
                f"sample sheet {path} line {header_line}: missing column '{column}' "
                f"(columns: {[c for c in header if c]})"
            )
    validator = jsonschema.Draft202012Validator(schema)
    records = []
    first_line_of: dict[str, int] = {}
    for line, cells in rows:
        where = f"sample sheet {path} line {line}"
        column = header.index("sample") if "sample" in header else len(cells)
        sample = cells[column].strip() if column < len(cells) else ""
        if sample:
            where += f" (sample '{sample}')"
        if len(cells) > len(header):
            # the values are not shown: free text could hold identifiers
            raise SampleSheetError(
                f"{where}, column {len(header) + 1}: {len(cells)} fields but the header "
                f"(line {header_line}) has {len(header)} columns (a stray tab?)"
            )
        for index, (name, value) in enumerate(zip(header, cells, strict=False), start=1):
            if not name and value.strip():
                raise SampleSheetError(
                    f"{where}, column {index}: a value in a column without a name in the header"
                )
        named = {name: value for name, value in zip(header, cells, strict=False) if name}
        record = _clean_record(named, where)
        for error in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            column = error.path[0] if error.path else _missing_property(error)
            message = _message(error)
            if column in PRIVATE_COLUMNS:
                message = (
                    f"invalid value (not shown; rule: {error.validator} {error.validator_value})"
                )
            raise SampleSheetError(f"{where}, column '{column}': {message}")
        sample = record["sample"]
        if sample in first_line_of:
            raise SampleSheetError(
                f"{where}, column 'sample': duplicate sample name '{sample}' "
                f"(first on line {first_line_of[sample]})"
            )
        first_line_of[sample] = line
        _check_modality_columns(record, where)
        records.append(record)
    if not records:
        raise SampleSheetError(f"sample sheet {path} has no samples")
    sheet = pd.DataFrame.from_records(records)
    for column in OPTIONAL_COLUMNS:
        if column not in sheet.columns:
            sheet[column] = None
    return sheet.set_index("sample", drop=False)


def _read_rows(
    path: Path, required: list[str]
) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """The header's line number and cells, and (line number, cells) of every data row.

    Cells are split on tabs (a field in double quotes may hold a tab, as in pandas and
    spreadsheets); a header cell left empty (e.g. by a trailing tab) names no column, and
    its values must be empty too.
    """
    data = path.read_bytes()
    expected = ", ".join(f"'{c}'" for c in required)
    if not data.strip():
        what = "empty (0 bytes)" if not data else "blank"
        raise SampleSheetError(
            f"sample sheet {path} line 1, column 'sample': the sheet is {what}; expected a "
            f"header line with the tab-separated columns {expected}"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = data[: error.start].rsplit(b"\n", 1)[-1].count(b"\t") + 1
        raise SampleSheetError(
            f"sample sheet {path} line {line}, column {column}: not UTF-8 text "
            f"(byte 0x{data[error.start]:02x})"
        ) from None
    header_line, header, rows = 0, [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cells = next(csv.reader([raw], delimiter="\t"))
        if not header_line:
            header_line, header = number, [c.strip() for c in cells]
            _check_header(path, number, header)
            continue
        rows.append((number, cells))
    if not header_line:
        raise SampleSheetError(
            f"sample sheet {path} line 1, column 'sample': no header line (only comments); "
            f"expected the tab-separated columns {expected}"
        )
    return header_line, header, rows


def _check_header(path: Path, line: int, header: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(header, start=1):
        if name in seen:
            raise SampleSheetError(
                f"sample sheet {path} line {line}, column {index}: column '{name}' appears "
                "twice in the header"
            )
        if name:
            seen.add(name)


def _clean_record(raw: dict[str, Any], where: str) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in raw.items():
        value = value.strip() if isinstance(value, str) else value
        if value == "" or value is None:
            continue
        if key in NUMERIC_COLUMNS:
            try:
                number = float(value)
            except ValueError:
                raise SampleSheetError(
                    f"{where}, column '{key}': '{value}' is not a number"
                ) from None
            if not math.isfinite(number):
                raise SampleSheetError(f"{where}, column '{key}': '{value}' is not a finite number")
            value = number
        record[key] = value
    return record


def _message(error: Any) -> str:
    """jsonschema's message, or the schema's own reason for the keyword (``x-messages``)."""
    reasons = error.schema.get("x-messages", {}) if isinstance(error.schema, dict) else {}
    reason = reasons.get(error.validator)
    return f"{error.instance!r} {reason}" if reason else error.message


def _missing_property(error: Any) -> str:
    # "'uri' is a required property" has an empty path; the name is in the message
    if error.validator == "required":
        return str(error.message).split("'")[1]
    return "?"


def _check_modality_columns(record: dict[str, Any], where: str) -> None:
    if record["modality"] == "ct" and "mpp" in record:
        raise SampleSheetError(f"{where}, column 'mpp': mpp applies to wsi samples only")
    if record["modality"] == "wsi" and "series_uid" in record:
        raise SampleSheetError(
            f"{where}, column 'series_uid': series_uid applies to ct samples only"
        )
    annotations = record.get("annotations")
    if annotations is not None:
        suffixes = ANNOTATION_SUFFIXES[record["modality"]]
        name = annotations.rstrip("/").rsplit("/", 1)[-1].lower()
        if not name.endswith(suffixes):
            raise SampleSheetError(
                f"{where}, column 'annotations': {annotations!r} is not a known annotation "
                f"file for {record['modality']} (expected {' or '.join(suffixes)})"
            )
