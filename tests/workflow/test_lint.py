"""Static checks: the workflow parses, lints and is formatted; the Python code lints."""

from __future__ import annotations

import subprocess

from workflow_support import BIN, REPO, run_snakemake


def run_tool(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_dry_run_plans_every_chain(workdir):
    run = run_snakemake(workdir, "--dry-run")
    planned = [rule for rule, _ in run.jobs]
    assert planned.count("download") == 4 and planned.count("upload") == 4
    assert planned.count("preprocess_ct") == 2 and planned.count("tile_wsi") == 2


def test_snakemake_lint_is_clean(workdir):
    run = run_snakemake(workdir, "--lint", check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Congratulations, your workflow is in a good condition!" in output, output


def test_snakefmt_check():
    result = run_tool(str(BIN / "snakefmt"), "--check", "Snakefile", "rules")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_and_format():
    check = run_tool(str(BIN / "ruff"), "check", ".")
    assert check.returncode == 0, check.stdout + check.stderr
    formatted = run_tool(str(BIN / "ruff"), "format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_mypy_is_clean():
    result = run_tool(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout, result.stdout
