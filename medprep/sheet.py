"""The sample sheet: read, validate row by row, and report problems by line and column."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from medprep.schema import load_schema

NUMERIC_COLUMNS = ("mpp",)
# optional columns added empty when missing
OPTIONAL_COLUMNS = ("mpp", "series_uid", "label", "patient")
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

    Empty cells are missing values. Errors name the sheet, the line (as shown by an
    editor, header = line 1), the sample and the column.
    """
    import jsonschema

    path = Path(path)
    if not path.is_file():
        raise SampleSheetError(f"sample sheet {path} does not exist")
    lines = _data_line_numbers(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SampleSheetError(f"sample sheet {path} cannot be read as TSV: {error}") from error
    table.columns = [str(c).strip() for c in table.columns]
    schema = load_schema(schema_path)
    for column in schema.get("required", []):
        if column not in table.columns:
            raise SampleSheetError(
                f"sample sheet {path}: missing column '{column}' (columns: {list(table.columns)})"
            )
    validator = jsonschema.Draft202012Validator(schema)
    records = []
    first_line_of: dict[str, int] = {}
    for index, raw in enumerate(table.to_dict(orient="records")):
        line = lines[index] if index < len(lines) else index + 2
        record = _clean_record(raw, path, line)
        where = f"sample sheet {path} line {line}"
        if record.get("sample"):
            where += f" (sample '{record['sample']}')"
        for error in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            column = error.path[0] if error.path else _missing_property(error)
            message = error.message
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


def _data_line_numbers(path: Path) -> list[int]:
    """1-based line numbers of the data rows (after the header, skipping comments/blanks)."""
    numbers = []
    header_seen = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            if not header_seen:
                header_seen = True
                continue
            numbers.append(number)
    return numbers


def _clean_record(raw: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in raw.items():
        value = value.strip() if isinstance(value, str) else value
        if value == "" or value is None:
            continue
        if key in NUMERIC_COLUMNS:
            try:
                value = float(value)
            except ValueError:
                raise SampleSheetError(
                    f"sample sheet {path} line {line}, column '{key}': '{value}' is not a number"
                ) from None
        record[key] = value
    return record


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
