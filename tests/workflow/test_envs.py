"""The conda environment files pin the same versions as the pip lock."""

from __future__ import annotations

import re

import pytest
import yaml
from workflow_support import REPO

ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "envs" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name.split("[")[0])] = version
    return pins


def env_pins(path) -> list[tuple[str, str]]:
    spec = yaml.safe_load(path.read_text())
    pins = []
    for dependency in spec["dependencies"]:
        if isinstance(dependency, dict):
            pins += [tuple(d.split("==")) for d in dependency["pip"]]
        elif dependency not in ("pip",) and not dependency.startswith("python="):
            pins.append(tuple(dependency.split("=")))
    return pins


def test_every_rule_env_exists_and_is_used():
    used = set()
    for smk in (REPO / "rules").glob("*.smk"):
        used |= set(re.findall(r'"\.\./envs/([\w-]+\.yaml)"', smk.read_text()))
    assert used == {p.name for p in ENV_FILES}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_pins_match_the_lock(path):
    pins = lock()
    for name, version in env_pins(path):
        assert normalise(name) in pins, f"{path.name}: {name} is not in envs/requirements.txt"
        assert pins[normalise(name)] == version, (
            f"{path.name}: {name}={version}, lock has {pins[normalise(name)]}"
        )


def test_lock_pins_every_direct_requirement():
    pins = lock()
    for line in (REPO / "envs" / "requirements.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert pins.get(normalise(name.split("[")[0])) == version, line
