"""The commands the README and the docs pages show are commands that work.

Every shell command of a ``bash`` block, and every inline command that starts with
``.venv/bin/``, is checked as far as it can be without running it: a `make` target exists,
a `snakemake` command line parses with Snakemake's own argument parser (and a profile it
names exists), a benchmark script accepts every option shown. The user flows themselves
run in their own tests (`make run`, the report, region labels, reruns, SLURM, ...).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from workflow_support import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) of every command shown in the README and the docs pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line and not line.startswith("#"):
                    found.append((page.name, line))
        for inline in re.findall(r"`(\.venv/bin/[^`]+)`", text):
            found.append((page.name, inline))
    return found


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    programs = {shlex.split(line)[0] for _, line in COMMANDS}
    assert {"make", ".venv/bin/snakemake", ".venv/bin/python"} <= programs


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_shown_command_is_one_that_works(page, line):
    words = shlex.split(line)
    program, args = words[0], words[1:]
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        assert set(args) <= targets, f"{page}: make {args} is not a Makefile target"
    elif program.endswith("snakemake"):
        from snakemake.cli import get_argument_parser

        parsed = get_argument_parser().parse_args(args)  # exits (fails) on an unknown option
        profiles = parsed.profile if isinstance(parsed.profile, list) else [parsed.profile]
        for profile in filter(None, profiles):
            assert (REPO / profile).is_dir(), f"{page}: no profile {profile}"
    elif program.endswith("python") and args and args[0].startswith("benchmarks/"):
        script = REPO / args[0]
        assert script.is_file(), f"{page}: no {args[0]}"
        helped = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        for option in {a.split("=", 1)[0] for a in args[1:] if a.startswith("--")}:
            assert option in helped, f"{page}: {args[0]} has no option {option}"
    elif program.endswith("python") and args[:1] == ["-m"]:
        __import__(args[1])
    else:
        assert program in ("printf", "apt-get"), f"{page}: unchecked command {line!r}"


def test_the_configuration_page_is_current():
    from medprep.common.config_docs import configuration_markdown

    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == configuration_markdown(), "docs/configuration.md is stale: run `make docs`"


def test_the_configuration_page_follows_the_schema():
    """Every setting is on the page with its default; a changed schema changes the page."""
    import copy

    from medprep.common.config_docs import configuration_markdown
    from medprep.common.settings import CONFIG_SCHEMA, load_schema

    schema = load_schema(CONFIG_SCHEMA)
    page = configuration_markdown(schema)
    assert "| `wsi.tile.size` | `256` |" in page
    assert "| `ct.lung.threshold_hu` | `-320` |" in page
    edited = copy.deepcopy(schema)
    edited["properties"]["wsi"]["properties"]["tile"]["properties"]["size"]["default"] = 512
    assert "| `wsi.tile.size` | `512` |" in configuration_markdown(edited)


def test_the_readme_fits_on_a_few_screens():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move reference material to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from README.md"


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of the markdown headings outside code blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [(len(m[1]), m[2].strip()) for m in re.finditer(r"^(#+) (.+)$", text, re.M)]


def anchor(title: str) -> str:
    """The anchor a heading gets (GitHub's rule)."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_every_page_has_one_title():
    for page in PAGES:
        titles = [title for level, title in headings(page.read_text()) if level == 1]
        assert len(titles) == 1, f"{page.name}: {titles}"


def test_links_between_pages_lead_somewhere():
    for page in PAGES:
        for target, fragment in re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]*))?\)", page.read_text()):
            linked = page.parent / target
            assert linked.is_file(), f"{page.name} links to missing {target}"
            anchors = {anchor(title) for _, title in headings(linked.read_text())}
            assert not fragment or fragment in anchors, f"{page.name}: no #{fragment} in {target}"


def test_no_page_speaks_of_issues():
    for page in [*PAGES, REPO / "CHANGELOG.md"]:
        text = page.read_text()
        assert not re.search(r"\bissues? ?#?\d+|the issue's|seed-style", text, re.I), page.name
