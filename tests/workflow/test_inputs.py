"""Inputs listed safely, sample names Snakemake accepts, sheet errors by line and column,
and bad input that costs one attempt (unit level; the workflow runs are in
tests/workflow/test_bad_input.py and tests/workflow/test_inputs_workflow.py)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from medprep import storage
from medprep.common.errors import InputError, defer, undefer
from medprep.common.settings import periodic_suffix_pattern, sample_name_pattern
from medprep.storage import local
from medprep.workflow.parse import source_fingerprint
from medprep.workflow.sheet import SampleSheetError, read_sample_sheet

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "samples.schema.yaml"


def sample_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ct-1"
    (folder / "series").mkdir(parents=True)
    (folder / "01.dcm").write_bytes(b"a" * 10)
    (folder / "series" / "02.dcm").write_bytes(b"b" * 20)
    return folder


def listed_keys(folder: Path) -> list[str]:
    return [f.key for f in local.fetch(str(folder), "unused", threads=1, settings={})]


##### listing a sample's folder


def test_a_linked_sample_folder_and_file_links_anywhere_are_listed(tmp_path):
    folder = sample_folder(tmp_path)
    outside = tmp_path / "store" / "blob"
    outside.parent.mkdir()
    outside.write_bytes(b"c" * 30)
    (folder / "03.dcm").symlink_to(outside)  # data stores (git-annex) keep files behind links
    linked = tmp_path / "cohort-view" / "ct-1"
    linked.parent.mkdir()
    linked.symlink_to(folder)  # the sheet's uri may itself be a link
    files = local.fetch(str(linked), "unused", threads=1, settings={})
    assert [(f.key, f.bytes) for f in files] == [
        ("01.dcm", 10),
        ("03.dcm", 30),
        ("series/02.dcm", 20),
    ]
    assert files[1].path == str(outside)


def hostile(tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    """A sample folder with one hostile entry: (folder, the entry, the expected cause)."""
    folder = sample_folder(tmp_path)
    entry = folder / "series" / "bad"
    if kind == "loop-to-itself":
        os.symlink(".", entry)
        return folder, entry, "symbolic link loop: leads back to"
    if kind == "loop-to-the-top":
        os.symlink("..", entry)
        return folder, entry, "symbolic link loop: leads back to"
    if kind == "self-link":
        os.symlink("bad", entry)
        return folder, entry, "symbolic link loop (too many levels of links)"
    if kind == "link-to-etc":
        os.symlink("/etc", entry)
        return folder, entry, "symbolic link to /etc, a folder outside the sample's folder"
    if kind == "link-to-a-sibling-sample":
        (tmp_path / "ct-2").mkdir()
        os.symlink("../../ct-2", entry)
        return folder, entry, f"symbolic link to {tmp_path / 'ct-2'}, a folder outside"
    if kind == "same-folder-twice":
        os.symlink("series", folder / "again")  # listed before series/ (sorted by name)
        return folder, folder / "series", f"the same folder as {folder / 'again'}"
    if kind == "broken-link":
        os.symlink("missing.dcm", entry)
        return folder, entry, "broken symbolic link (to missing.dcm, which does not exist)"
    if kind == "fifo":
        os.mkfifo(entry)
        return folder, entry, "not a regular file or folder"
    raise ValueError(kind)


HOSTILE = [
    "loop-to-itself",
    "loop-to-the-top",
    "self-link",
    "link-to-etc",
    "link-to-a-sibling-sample",
    "same-folder-twice",
    "broken-link",
    "fifo",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_entry_fails_the_listing_with_one_line_naming_it(tmp_path, kind):
    folder, entry, cause = hostile(tmp_path, kind)
    with pytest.raises(InputError) as error:
        local.fetch(str(folder), "unused", threads=1, settings={})
    assert error.value.path == str(entry)
    assert cause in error.value.cause
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", HOSTILE)
def test_the_fingerprint_never_raises_and_carries_the_error_to_the_download(tmp_path, kind):
    folder, entry, cause = hostile(tmp_path, kind)
    marker = source_fingerprint(str(folder), {}, sample="ct-1")
    error = undefer(marker)
    assert error is not None and error.path == str(entry) and cause in error.cause


def test_a_bug_in_a_fingerprint_function_becomes_a_marker_too(tmp_path, monkeypatch):
    def broken(uri, settings):
        raise KeyError("etag")

    monkeypatch.setattr(storage, "source_fingerprint", broken)
    error = undefer(source_fingerprint("s3://bucket/ct/1/", {}, sample="S"))
    assert str(error).startswith("file s3://bucket/ct/1/: unexpected KeyError: 'etag'")


def test_a_fingerprint_is_never_taken_for_a_marker(tmp_path):
    assert undefer(source_fingerprint(str(sample_folder(tmp_path)), {})) is None
    assert undefer(source_fingerprint(str(tmp_path / "absent"), {})) is None
    assert undefer(None) is None


def test_a_deferred_error_keeps_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    marker = defer(InputError("denied for AKIAABCDEFGHIJKLMNOP", path="s3://u:pw@b/k"))
    assert "AKIAABCDEFGHIJKLMNOP" not in marker and "pw" not in marker


def test_discovery_lists_the_other_folders_when_one_is_hostile(tmp_path):
    root = tmp_path / "cohort"
    root.mkdir()
    good = sample_folder(root)
    bad = root / "ct-bad"
    bad.mkdir()
    os.symlink("/etc", bad / "etc")
    found = {s["sample"]: s for s in storage.discover(str(root), "ct")}
    assert set(found) == {good.name, "ct-bad"}
    assert undefer(found[good.name]["fingerprint"]) is None
    assert undefer(found["ct-bad"]["fingerprint"]).path == str(bad / "etc")


##### names Snakemake accepts as wildcard values


def snakemake_refuses(name: str) -> bool:
    """Snakemake's own check (only here, to hold our rule to it)."""
    from snakemake.io import PeriodicityDetector

    return PeriodicityDetector().is_periodic(name) is not None


def candidate_names() -> list[str]:
    rng = random.Random(7)
    names = []
    for unit in ["0", "ab", "x1-", "a.b_c", "abcdef"]:
        for repeats in (18, 19, 20, 21, 40):
            for prefix in ("case-", "", "Z"):
                name = (prefix + unit * repeats)[:128]
                names.append(name)
                names.append(name + "q")
    alphabet = "01ab.-_"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 128))) for _ in range(300)]
    return [n for n in names if re.fullmatch(sample_name_pattern(), n)]


def test_our_periodic_rule_is_snakemakes():
    names = candidate_names()
    refused = {n for n in names if snakemake_refuses(n)}
    assert refused and len(refused) < len(names)  # both outcomes are exercised
    assert {n for n in names if re.search(periodic_suffix_pattern(), n)} == refused


def test_the_sample_name_pattern_is_written_once():
    """The samples schema holds it; the run name, the wildcard constraint and discovery
    use the same one."""
    from medprep.workflow.parse import SAMPLE_PATTERN

    sample = yaml.safe_load(SCHEMA.read_text())["properties"]["sample"]["pattern"]
    config = yaml.safe_load((SCHEMA.parent / "config.schema.yaml").read_text())
    assert config["properties"]["run_name"]["pattern"] == sample
    assert f"^{SAMPLE_PATTERN}$" == f"^{sample_name_pattern()}$" == sample
    assert not re.fullmatch(SAMPLE_PATTERN, "x" * 129) and re.fullmatch(SAMPLE_PATTERN, "x" * 128)


def test_discovery_refuses_a_folder_name_snakemake_would_refuse(tmp_path):
    with pytest.raises(InputError, match="PeriodicWildcardError"):
        storage.safe_sample_name("case-" + "0" * 20, where=str(tmp_path))


##### sample sheet errors: one line naming the sheet, the line and the column


def write_sheet(tmp_path: Path, data: bytes | str) -> Path:
    path = tmp_path / "samples.tsv"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


HEADER = "sample\tmodality\turi\tmpp\n"


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"", "line 1, column 'sample': the sheet is empty (0 bytes)"),
        (b"\n\n", "line 1, column 'sample': the sheet is blank"),
        (b"# only a comment\n", "line 1, column 'sample': no header line (only comments)"),
        (
            "sample\tmodality\turi\nA\twsi\ta.svs\nB\twsi\tb.svs\t0.5\n",
            "line 3 (sample 'B'), column 4: 4 fields but the header (line 1) has 3 columns",
        ),
        (
            HEADER + "A\twsi\ta.svs\t\t0.5\n",
            "line 2 (sample 'A'), column 5: 5 fields but the header (line 1) has 4 columns",
        ),
        (
            HEADER + "A\twsi\ta.svs\tnan\n",
            "line 2 (sample 'A'), column 'mpp': 'nan' is not a finite",
        ),
        (
            HEADER + "A\twsi\ta.svs\tinf\n",
            "line 2 (sample 'A'), column 'mpp': 'inf' is not a finite",
        ),
        (HEADER + "A\twsi\ta.svs\t-Infinity\n", "column 'mpp': '-Infinity' is not a finite"),
        (
            HEADER + "case-00000000000000000000\twsi\ta.svs\t\n",
            "line 2 (sample 'case-00000000000000000000'), column 'sample': "
            "'case-00000000000000000000' ends in a part repeated 20 or more times",
        ),
        (
            HEADER + "A\twsi\ta.svs\n" + "ab" * 20 + "\tct\tx/\n",
            f"line 3 (sample '{'ab' * 20}'), column 'sample'",
        ),
        (b"sample\tmodality\turi\nA\twsi\tcaf\xe9.svs\n", "line 2, column 3: not UTF-8 text"),
        ("sample\tmodality\tsample\turi\n", "line 1, column 3: column 'sample' appears twice"),
        (
            "sample\tmodality\turi\t\nA\twsi\ta.svs\tx\n",
            "line 2 (sample 'A'), column 4: a value in a column without a name",
        ),
    ],
    ids=[
        "zero-bytes",
        "blank",
        "comments-only",
        "extra-field",
        "extra-field-after-empty-mpp",
        "mpp-nan",
        "mpp-inf",
        "mpp-minus-infinity",
        "periodic-name",
        "periodic-name-of-two-letters",
        "not-utf8",
        "duplicate-column",
        "value-under-unnamed-column",
    ],
)
def test_bad_sheet_gives_one_line_with_sheet_line_and_column(tmp_path, data, expected):
    path = write_sheet(tmp_path, data)
    with pytest.raises(SampleSheetError) as error:
        read_sample_sheet(path, SCHEMA)
    message = str(error.value)
    assert message.startswith(f"sample sheet {path} line ")
    assert expected in message and "\n" not in message


def test_sheet_edge_cases_that_are_fine(tmp_path):
    path = write_sheet(
        tmp_path,
        "\ufeffsample\tmodality\turi\tmpp\t\r\n"  # BOM, CRLF, trailing tab in the header
        "# comment\r\n"
        "case-0000000000000000000\twsi\tdata/a#1.svs\t0.25\t\r\n"  # 19 repeats: accepted
        "B\tct\tdata/b/\r\n",  # a short row: missing trailing cells are empty
    )
    sheet = read_sample_sheet(path, SCHEMA)
    assert list(sheet.index) == ["case-0000000000000000000", "B"]
    assert sheet.loc["case-0000000000000000000", "uri"] == "data/a#1.svs"  # '#' inside: data
    assert sheet.loc["case-0000000000000000000", "mpp"] == 0.25
    assert sheet.loc["B", "mpp"] is None or sheet.loc["B", "mpp"] != sheet.loc["B", "mpp"]


##### an input error costs one attempt

RUNNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    from medprep.common.errors import InputError
    from medprep.workflow.runner import run_step

    class Named(list):
        pass

    mode, attempt_log = sys.argv[1], Path(sys.argv[2])
    smk = SimpleNamespace(
        wildcards={"sample": "S7", "modality": "ct"}, rule="preprocess_ct",
        log=Named([f"logs/preprocess_ct/S7.log"]), threads=1,
        input=Named(["in.json"]), params={"engine": "e1"}, output=Named([]),
    )

    def main(smk):
        with attempt_log.open("a") as f:
            f.write("worked\\n")
        if mode == "input":
            raise InputError("no pixel data", path="ct/S7/02.dcm")
        if mode == "memory":
            raise MemoryError()
        if mode == "changed":
            raise InputError("object changed during the download", path="s3://b/k",
                             retryable=True)

    run_step(smk, main)
    """
)


def attempt(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), mode, str(tmp_path / "worked.txt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def times_worked(tmp_path: Path) -> int:
    path = tmp_path / "worked.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def runner(tmp_path):
    from medprep.workflow.runner import start_run

    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "in.json").write_text("{}")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        start_run()
    finally:
        os.chdir(old)
    return tmp_path


def test_a_retry_after_an_input_error_fails_at_once_with_the_same_line(runner):
    first = attempt(runner, "input")
    second = attempt(runner, "input")
    assert first.returncode == second.returncode == 1
    assert times_worked(runner) == 1  # the retry redid no work
    line = "sample S7: file ct/S7/02.dcm: no pixel data"
    assert f"medprep error: {line} (log:" in first.stderr
    assert f"medprep error: {line} (input error, not retried) (log:" in second.stderr
    log = (runner / "logs" / "preprocess_ct" / "S7.log").read_text()
    assert log.count("\n") == 1 and "Traceback" not in log and "(input error, not retried)" in log


def test_a_new_run_or_changed_inputs_try_again(runner):
    from medprep.workflow.runner import start_run

    attempt(runner, "input")
    (runner / "in.json").write_text('{"changed": 1}')
    attempt(runner, "input")
    assert times_worked(runner) == 2  # other inputs: the job ran again
    old = Path.cwd()
    os.chdir(runner)
    try:
        start_run()  # the next `snakemake` run
    finally:
        os.chdir(old)
    attempt(runner, "input")
    assert times_worked(runner) == 3


@pytest.mark.parametrize(
    ("mode", "code", "kind"), [("memory", 2, "internal"), ("changed", 1, "transient")]
)
def test_failures_a_retry_can_fix_are_retried(runner, mode, code, kind):
    first, second = attempt(runner, mode), attempt(runner, mode)
    assert first.returncode == second.returncode == code
    assert times_worked(runner) == 2
    assert "not retried" not in second.stderr
    record = json.loads((runner / "logs" / "failures" / "S7.preprocess.json").read_text())
    assert record["kind"] == kind and re.fullmatch("[0-9a-f]{32}", record["inputs"])


##### resource functions: an error there would stop every job of the run


EXTRA = {
    "preprocess_ct": {"spacing_out": [1.0, 1.0, 1.0]},
    "tile_ct": {},
    "preprocess_wsi": {"mask_mpp": 8.0},
    "tile_wsi": {
        "tile_settings": {"size": 256, "block_tiles": 8, "container": "tar", "format": "jpeg"}
    },
}


@pytest.mark.parametrize(
    ("step", "key", "content"),
    [
        ("preprocess_ct", "download_manifest", "{not json"),
        ("preprocess_ct", "download_manifest", '{"total_bytes": "many"}'),
        ("tile_ct", "preprocess_manifest", '{"summary": {"shape_out": ["x", 1, 1]}}'),
        (
            "tile_wsi",
            "preprocess_manifest",
            '{"summary": {"tissue_area_mm2": "a", "target_mpp": 1}}',
        ),
        ("preprocess_wsi", "download_manifest", '{"files": 3}'),
        ("preprocess_wsi", "download_manifest", "[]"),
    ],
)
def test_a_memory_estimate_falls_back_instead_of_stopping_the_run(tmp_path, step, key, content):
    from medprep.workflow.resources import mem_mb

    manifest = tmp_path / "step.json"
    manifest.write_text(content)
    unknown = mem_mb(step, threads=2, **{key: None}, **EXTRA[step])
    assert mem_mb(step, threads=2, **{key: str(manifest)}, **EXTRA[step]) == unknown > 0
    assert (
        mem_mb(step, threads=2, attempt=2, **{key: str(manifest)}, **EXTRA[step]) >= 2 * unknown - 1
    )


def test_an_unreachable_store_still_stops_the_run(monkeypatch):
    """Not one sample's problem; a marker would rerun (and fail) every finished sample."""
    from medprep.storage.s3 import StorageUnavailable

    def unreachable(uri, settings):
        raise StorageUnavailable("cannot list s3://bucket/ct/1/: EndpointConnectionError")

    monkeypatch.setattr(storage, "source_fingerprint", unreachable)
    with pytest.raises(StorageUnavailable):
        source_fingerprint("s3://bucket/ct/1/", {}, sample="S")
