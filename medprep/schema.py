"""The YAML JSON-schemas under ``schemas/``, and the config defaults they declare."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
CONFIG_SCHEMA = SCHEMAS / "config.schema.yaml"
SAMPLES_SCHEMA = SCHEMAS / "samples.schema.yaml"


@functools.cache
def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def config_defaults(*section: str) -> dict[str, Any]:
    """The defaults of a config section as nested dicts, e.g. ``config_defaults("ct")``.

    The schema is the one place defaults are written down; the engines take theirs from
    here when called outside Snakemake (which fills them in by validating the config).
    """
    node = load_schema(CONFIG_SCHEMA)
    for key in section:
        node = node["properties"][key]
    return copy.deepcopy(_defaults_of(node))


def _defaults_of(node: dict[str, Any]) -> Any:
    if node.get("type") == "object" and "properties" in node:
        return {key: _defaults_of(child) for key, child in node["properties"].items()}
    return node.get("default")
