"""The config schema is the one place settings are declared: a misspelt key anywhere fails
at parse time, naming the key and its parent."""

from __future__ import annotations

import copy

import pytest
import yaml
from workflow_support import REPO, run_snakemake, write_config

from medprep.common.settings import CONFIG_SCHEMA, load_schema, unknown_keys

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def object_nodes(node, path=()):
    if node.get("type") == "object":
        yield path, node
        for key, child in node.get("properties", {}).items():
            yield from object_nodes(child, (*path, key))


def test_every_settings_object_refuses_unknown_keys():
    open_nodes = [
        ".".join(path) or "<root>"
        for path, node in object_nodes(load_schema(CONFIG_SCHEMA))
        # a mapping of names the user chooses (split name -> fraction) is open by design
        if "additionalProperties" not in node
    ]
    assert open_nodes == []


def test_shipped_config_has_no_unknown_key():
    assert unknown_keys(CONFIG) == []


@pytest.mark.parametrize(
    "path, key, expected",
    [
        (
            (),
            "destinaton",
            "unknown key 'destinaton' under the top level (did you mean destination?)",
        ),
        (("ct", "lung"), "closing_radius", "under ct.lung (did you mean closing_radius_mm?)"),
        (("wsi", "tile"), "sise", "unknown key 'sise' under wsi.tile (did you mean size"),
        (("storage",), "conections", "under storage (did you mean connections?)"),
    ],
)
def test_a_misspelt_key_is_named_with_its_parent(path, key, expected):
    config = copy.deepcopy(CONFIG)
    node = config
    for part in path:
        node = node[part]
    node[key] = 1
    lines = unknown_keys(config)
    assert len(lines) == 1 and expected in lines[0]


@pytest.mark.slow
def test_a_typo_in_a_nested_key_stops_the_run_before_any_job(workdir):
    write_config(workdir, ct={"lung": {"closing_radius": 10}})
    run = run_snakemake(workdir, "--dry-run", check=False)
    assert run.returncode != 0
    assert "medprep error: config: unknown key 'closing_radius' under ct.lung" in run.stderr
    assert "Traceback" not in run.stderr and not (workdir / "results").exists()
