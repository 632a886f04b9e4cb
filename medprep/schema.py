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


def unknown_keys(config: Any, node: dict[str, Any] | None = None, parent: str = "") -> list[str]:
    """Lines naming each key of ``config`` that the config schema does not know.

    One line per key, with its parent and the closest known names, e.g.
    ``unknown key 'closing_radius' under ct.lung (did you mean closing_radius_mm?)``.
    Only object nodes that declare ``additionalProperties: false`` are checked; the
    schema's own validation then reports everything else (types, limits).
    """
    import difflib

    node = load_schema(CONFIG_SCHEMA) if node is None else node
    if not isinstance(config, dict) or node.get("type") != "object":
        return []
    known = node.get("properties", {})
    lines = []
    for key, value in config.items():
        where = f"{parent}.{key}" if parent else str(key)
        if key in known:
            lines += unknown_keys(value, known[key], where)
        elif node.get("additionalProperties") is False:
            close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(
                f"unknown key '{key}' under {parent or 'the top level'}{hint}; "
                f"known keys: {', '.join(known)}"
            )
    return lines
