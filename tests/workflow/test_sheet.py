"""The sample sheet: valid sheets load; every bad one fails naming the line and the column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medprep.workflow.sheet import SampleSheetError, carried_columns, read_sample_sheet

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "samples.schema.yaml"


def write_sheet(tmp_path, text):
    path = tmp_path / "samples.tsv"
    path.write_text(text)
    return path


def test_valid_sheet_with_optional_columns_comments_and_extra_columns(tmp_path):
    path = write_sheet(
        tmp_path,
        "# cohort A\n"
        "sample\tmodality\turi\tmpp\tseries_uid\tsite\n"
        "slide-1\twsi\tdata/s1.svs\t0.25\t\tleeds\n"
        "\n"
        "ct_1\tct\ts3://bucket/ct/ct_1/\t\t1.2.840.1\tnyc\n",
    )
    sheet = read_sample_sheet(path, SCHEMA)
    assert list(sheet.index) == ["slide-1", "ct_1"]
    assert sheet.loc["slide-1", "mpp"] == 0.25
    assert sheet.loc["ct_1", "series_uid"] == "1.2.840.1"
    assert sheet.loc["ct_1", "site"] == "nyc"


def test_missing_optional_columns_are_added_empty(tmp_path):
    sheet = read_sample_sheet(write_sheet(tmp_path, "sample\tmodality\turi\nA\tct\tx/\n"), SCHEMA)
    assert sheet.loc["A", "mpp"] is None and sheet.loc["A", "series_uid"] is None


@pytest.mark.parametrize(
    "body,expected",
    [
        ("A\tct\tx\nB\tmri\ty\n", "line 3 (sample 'B'), column 'modality': 'mri' is not one of"),
        (
            "A\tct\tx\nA\twsi\ty\n",
            "line 3 (sample 'A'), column 'sample': duplicate sample name 'A' (first on line 2)",
        ),
        ("A\twsi\t\n", "line 2 (sample 'A'), column 'uri': 'uri' is a required property"),
        (
            "../evil\tct\tx\n",
            "line 2 (sample '../evil'), column 'sample': '../evil' does not match",
        ),
        ("A\twsi\tx\tabc\n", "line 2 (sample 'A'), column 'mpp': 'abc' is not a number"),
        (
            "A\twsi\tx\t-1\n",
            "line 2 (sample 'A'), column 'mpp': -1.0 is less than or equal to the minimum of 0",
        ),
        ("A\tct\tx\t0.5\n", "line 2 (sample 'A'), column 'mpp': mpp applies to wsi samples only"),
    ],
)
def test_bad_rows_name_line_and_column(tmp_path, body, expected):
    path = write_sheet(tmp_path, "sample\tmodality\turi\tmpp\n" + body)
    with pytest.raises(SampleSheetError) as error:
        read_sample_sheet(path, SCHEMA)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_missing_column_and_missing_file_and_empty_sheet(tmp_path):
    with pytest.raises(SampleSheetError, match="missing column 'uri'"):
        read_sample_sheet(write_sheet(tmp_path, "sample\tmodality\nA\tct\n"), SCHEMA)
    with pytest.raises(SampleSheetError, match="does not exist"):
        read_sample_sheet(tmp_path / "nope.tsv", SCHEMA)
    with pytest.raises(SampleSheetError, match="no samples"):
        read_sample_sheet(write_sheet(tmp_path, "sample\tmodality\turi\n"), SCHEMA)


def test_label_patient_and_meta_columns_are_read_and_checked(tmp_path):
    path = write_sheet(
        tmp_path,
        "sample\tmodality\turi\tlabel\tpatient\tmeta_site\tmeta_age_band\n"
        "A\tct\tx/\t1\tP1\tleeds\t60-70\n"
        "B\tct\ty/\t\tP1\t\t\n"
        "C\twsi\tz.svs\tLUAD\t\tnyc\t\n",
    )
    sheet = read_sample_sheet(path, SCHEMA)
    assert sheet.loc["A", "label"] == "1" and sheet.loc["C", "label"] == "LUAD"
    assert sheet.loc["B", "patient"] == "P1" and pd.isna(sheet.loc["C", "patient"])
    assert sheet.loc["A", "meta_site"] == "leeds"
    assert carried_columns(sheet.columns) == ["label", "patient", "meta_age_band", "meta_site"]
    bare = read_sample_sheet(write_sheet(tmp_path, "sample\tmodality\turi\nA\tct\tx/\n"), SCHEMA)
    assert bare.loc["A", "label"] is None and bare.loc["A", "patient"] is None


def test_a_bad_patient_value_is_not_shown_in_the_error(tmp_path):
    secret = "Doe-" + "x" * 300
    path = write_sheet(tmp_path, f"sample\tmodality\turi\tpatient\nA\tct\tx/\t{secret}\n")
    with pytest.raises(SampleSheetError, match="column 'patient': invalid value") as error:
        read_sample_sheet(path, SCHEMA)
    assert "Doe-" not in str(error.value)
