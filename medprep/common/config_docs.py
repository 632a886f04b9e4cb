"""``docs/configuration.md``, generated from ``schemas/config.schema.yaml``.

The schema is the one place a setting, its default and its limits are written; this page
is that schema laid out for reading, one table per section. Regenerate it after editing
the schema with ``make docs`` (``python -m medprep.common.config_docs docs/configuration.md``);
a test fails while the page is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from medprep.common.settings import CONFIG_SCHEMA, load_schema

HEADER = """# Configuration

Generated from `schemas/config.schema.yaml` by `make docs`: edit the schema, not this page.

Settings live in `config.yaml`. Override top-level keys with `snakemake --config
key=value`, nested ones with a YAML file of your own passed as `--configfile FILE` (only
the keys it names change). Threads and memory are not settings: they are rule resources
(`--set-threads`, `--set-resources`, or a profile). A misspelt key or a value beyond its
limits stops the run before any job starts, naming the key.
"""


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _kind(node: dict[str, Any]) -> str:
    kinds = node.get("type", "")
    kinds = " or ".join(kinds) if isinstance(kinds, list) else kinds
    limits = []
    for key, word in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in node:
            limits.append(f"{word} {node[key]:g}")
    if "enum" in node:
        limits.append("one of " + ", ".join(_value(v) for v in node["enum"]))
    if "pattern" in node:
        limits.append(f"matching `{node['pattern']}`")
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        limits.append(f"items: {_kind(node['items'])}")
    return "; ".join([kinds, *limits]) if limits else kinds


def _text(node: dict[str, Any]) -> str:
    return " ".join(str(node.get("description", "")).split()).replace("|", "\\|")


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for key, child in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        if child.get("type") == "object" and "properties" in child:
            rows += _rows(child, f"{name}.")
            continue
        default = _value(child["default"]) if "default" in child else "(required)"
        rows.append(f"| `{name}` | {default} | {_kind(child)} | {_text(child)} |")
    return rows


def configuration_markdown(schema: dict[str, Any] | None = None) -> str:
    """The configuration page for ``schema`` (default: the config schema)."""
    schema = schema or load_schema(CONFIG_SCHEMA)
    table_head = ["| key | default | type and limits | meaning |", "|---|---|---|---|"]
    out = [HEADER]
    top = {k: v for k, v in schema["properties"].items() if "properties" not in v}
    out += ["## Top level", "", *table_head, *_rows({"properties": top}, ""), ""]
    for key, section in schema["properties"].items():
        if key in top:
            continue
        out += [f"## `{key}`", "", _text(section), "", *table_head, *_rows(section, f"{key}.")]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = configuration_markdown()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
