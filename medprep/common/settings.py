"""The YAML JSON-schemas under ``schemas/``, the config defaults they declare, and the
typed settings the engines build from them.

``schemas/config.schema.yaml`` is the one place a setting's default and limits are
written down. ``settings_section("wsi", "tile")`` turns a class into a frozen dataclass
whose fields are the keys of that schema section, with the schema's defaults; building one
validates the values against the schema's limits (one line naming the key), and
``from_config`` refuses unknown keys (one line naming the key and its parent).

A section's class declares its fields with their types and the schema's default
(``size: int = FROM_SCHEMA``), so that readers and type checkers see them; a test checks
the declarations against the schema, and ``python -m medprep.common.settings wsi tile``
prints them for a section.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, dataclass_transform

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
CONFIG_SCHEMA = SCHEMAS / "config.schema.yaml"
SAMPLES_SCHEMA = SCHEMAS / "samples.schema.yaml"


def load_schema(path: str | Path) -> dict[str, Any]:
    """The schema at ``path``, read once per process (whichever way the path is written)."""
    return _load_schema(os.path.realpath(path))


@functools.cache
def _load_schema(path: str) -> dict[str, Any]:
    import yaml

    # libyaml's loader where PyYAML has it: parse time is paid by every run and every
    # cluster job, and the pure-Python loader takes 60 ms per schema
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader


@functools.cache
def sample_name_pattern() -> str:
    """What a sample name (and a run name) may be, as a regular expression without anchors:
    the samples schema's ``sample`` pattern, the one place it is written."""
    pattern = load_schema(SAMPLES_SCHEMA)["properties"]["sample"]["pattern"]
    return pattern.removeprefix("^").removesuffix("$")


# The periodic-suffix rule beside it: Snakemake refuses a wildcard value ending in a unit
# repeated 20 or more times (its PeriodicWildcardError stops the whole run).
def periodic_suffix_pattern() -> str:
    return load_schema(SAMPLES_SCHEMA)["properties"]["sample"]["not"]["pattern"]


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
    node = load_schema(CONFIG_SCHEMA) if node is None else node
    if not isinstance(config, Mapping) or node.get("type") != "object":
        return []
    known = node.get("properties", {})
    lines = []
    for key, value in config.items():
        where = f"{parent}.{key}" if parent else str(key)
        if key in known:
            lines += unknown_keys(value, known[key], where)
        elif node.get("additionalProperties") is False:
            lines.append(unknown_key_line(key, parent, known))
    return lines


def unknown_key_line(key: Any, parent: str, known: Iterable[str]) -> str:
    """``unknown key 'sise' under wsi.tile (did you mean size?); known keys: ...``."""
    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown key '{key}' under {parent or 'the top level'}{hint}; "
        f"known keys: {', '.join(known)}"
    )


##### settings views: dataclasses whose fields and defaults are those of the schema #####

S = TypeVar("S", bound="Settings")


class _FromSchema:
    """The default of a settings field that is a config key: the schema's."""

    def __repr__(self) -> str:
        return "FROM_SCHEMA"


# ``size: int = FROM_SCHEMA`` in a settings class: the field's default is the schema's (its
# type is Any so that type checkers take it for any field's default)
FROM_SCHEMA: Any = _FromSchema()
# (schema file, section path) -> the class of that section, so a parent section takes the
# class its module named (e.g. ``wsi.tile.filters`` -> FilterSettings) for its field
_SECTIONS: dict[tuple[str, tuple[str, ...]], type[Settings]] = {}

# True while a workflow job runs its step: its settings come from the config, which
# Snakemake validated against the whole schema when it read the workflow
_config_validated = False


@contextlib.contextmanager
def config_validated() -> Iterator[None]:
    """Within the block, settings come from a config already validated against the
    schema: their values are not checked again (a job then never imports jsonschema)."""
    global _config_validated
    previous, _config_validated = _config_validated, True
    try:
        yield
    finally:
        _config_validated = previous


_TYPES = {"number": "float", "integer": "int", "string": "str", "boolean": "bool"}


def section_node(*section: str, schema: str | os.PathLike[str] = CONFIG_SCHEMA) -> dict[str, Any]:
    """The schema node of a config section, e.g. ``section_node("wsi", "tile")``."""
    node = load_schema(os.fspath(schema))
    for key in section:
        node = node["properties"][key]
    return node


def _is_section(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" in node


def _annotation(node: dict[str, Any]) -> str:
    kinds = node.get("type", "object")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    names = [
        "None" if k == "null" else "tuple" if k == "array" else _TYPES.get(k, "Any") for k in kinds
    ]
    return " | ".join(names)


def _frozen(value: Any) -> Any:
    """Lists as tuples (hashable, and equal whether from YAML or from the defaults)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _as_json(value: Any) -> str | None:
    """``value`` as canonical JSON (so 1, 1.0 and True differ), None if it has none."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """Tuples as lists and sections as dicts: what JSON (and jsonschema) take."""
    if isinstance(value, Settings):
        return value.as_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Settings:
    """A config section as a frozen dataclass (see ``settings_section``): read its values
    as attributes (``cfg.lung.grid_mm``); ``as_dict()`` gives plain dicts for JSON.

    Fields that are not config keys (declared in the class body with a default, e.g. a
    value that comes from the scan) are attributes too, but not part of ``as_dict``.
    """

    _section: ClassVar[tuple[str, ...]] = ()
    _node: ClassVar[dict[str, Any]] = {}
    _keys: ClassVar[tuple[str, ...]] = ()
    # the type each config key is declared with in the class body (None: not declared)
    _declared: ClassVar[dict[str, str | None]] = {}
    _schema: ClassVar[str] = os.fspath(CONFIG_SCHEMA)
    _children: ClassVar[dict[str, type[Settings]]] = {}
    _default_json: ClassVar[dict[str, str | None]] = {}

    def __post_init__(self) -> None:
        cls = type(self)
        for key in cls._keys:
            value = getattr(self, key)
            child = cls._children.get(key)
            if child is not None and not isinstance(value, child):
                object.__setattr__(self, key, child.from_config(value))
            elif isinstance(value, list):
                object.__setattr__(self, key, _frozen(value))
        scalars = {k: _plain(getattr(self, k)) for k in cls._keys if k not in cls._children}
        # each key is checked on its own and the defaults are valid (tested), so only the
        # values that differ from them need jsonschema: most jobs never import it (0.1 s)
        changed = {k: v for k, v in scalars.items() if _as_json(v) != cls._default_json[k]}
        if not changed or _config_validated:
            return
        errors = sorted(_validator(cls).iter_errors(changed), key=lambda e: list(e.path))
        if errors:
            where = ".".join(cls._section)
            raise ValueError(
                "; ".join(
                    f"{'.'.join(str(p) for p in (where, *e.path) if p != '')}: {e.message}"
                    for e in errors
                )
            )

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any] | Settings | None = None) -> S:
        """The section from (all or part of) its config mapping, the rest from the schema;
        an unknown key raises ValueError in one line naming it and its parent."""
        if isinstance(config, cls):
            return config
        where = ".".join(cls._section)
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: expected a mapping of settings, got {config!r}")
        unknown = [k for k in config if k not in cls._keys]
        if unknown:
            raise ValueError("; ".join(unknown_key_line(k, where, cls._keys) for k in unknown))
        return cls(**config)

    def as_dict(self) -> dict[str, Any]:
        """The section as plain nested dicts and lists (JSON-ready)."""
        return {key: _plain(getattr(self, key)) for key in self._keys}


_VALIDATORS: dict[type[Settings], Any] = {}


def _validator(cls: type[Settings]) -> Any:
    if cls not in _VALIDATORS:
        import jsonschema

        properties = {k: v for k, v in cls._node["properties"].items() if k not in cls._children}
        schema = {"type": "object", "properties": properties}
        _VALIDATORS[cls] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[cls]


@dataclass_transform(frozen_default=True)
def settings_section(
    *section: str, schema: str | os.PathLike[str] = CONFIG_SCHEMA
) -> Callable[[type[S]], type[S]]:
    """Class decorator: the class becomes the frozen dataclass of config ``section``.

    Its fields are the section's keys in schema order with the schema's defaults (a
    nested section is a field holding that section's class: the one a module declared
    with this decorator, or one made here). The class body declares each key's type with
    ``= FROM_SCHEMA`` as its default; it may add methods, properties and fields that are
    not config keys (with a default of their own); it does not restate a config key's
    default (a different one is an error at import).
    """

    def build(cls: type[S]) -> type[S]:
        return _build(cls, tuple(section), os.fspath(schema))  # type: ignore[return-value]

    return build


def _build(cls: type, section: tuple[str, ...], schema: str) -> type[Settings]:
    if not issubclass(cls, Settings):
        raise TypeError(f"{cls.__name__}: a settings section must subclass Settings")
    node = section_node(*section, schema=schema)
    where = ".".join(section)
    own = dict(cls.__dict__.get("__annotations__", {}))
    declared = {key: own.get(key) for key in node["properties"]}
    annotations: dict[str, Any] = {}
    children: dict[str, type[Settings]] = {}
    for key, child in node["properties"].items():
        annotations[key] = own.pop(key, None)
        default = cls.__dict__.get(key, dataclasses.MISSING)
        if default is FROM_SCHEMA:
            default = dataclasses.MISSING
        if _is_section(child):
            nested = _SECTIONS.get((schema, (*section, key)))
            if nested is None:
                name = "".join(p.title() for p in key.split("_")) + "Settings"
                doc = {"__doc__": f"``{where}.{key}`` (schemas/config.schema.yaml)."}
                nested = _build(type(name, (Settings,), doc), (*section, key), schema)
                nested.__module__ = cls.__module__
                nested.__qualname__ = f"{cls.__qualname__}.{name}"
                setattr(cls, name, nested)  # so that pickle finds it
            children[key] = nested
            annotations[key] = annotations[key] or nested.__name__
            setattr(cls, key, dataclasses.field(default_factory=nested))
            continue
        value = _frozen(copy.deepcopy(child.get("default")))
        if default is not dataclasses.MISSING and default != value:
            raise TypeError(
                f"{cls.__name__}.{key} restates the default of {where}.{key} as {default!r}; "
                f"the schema says {value!r} (defaults live in {os.path.basename(schema)})"
            )
        annotations[key] = annotations[key] or _annotation(child)
        if isinstance(value, dict):
            setattr(
                cls, key, dataclasses.field(default_factory=functools.partial(copy.deepcopy, value))
            )
        else:
            setattr(cls, key, value)
    for key in own:  # fields that are not config keys: they need their own default
        if key not in cls.__dict__:
            raise TypeError(f"{cls.__name__}.{key} is not a key of {where}: give it a default")
    cls.__annotations__ = {**annotations, **own}
    built = dataclasses.dataclass(frozen=True)(cls)
    built._section = section
    built._schema = schema
    built._node = node
    built._keys = tuple(node["properties"])
    built._declared = {k: v if v is None else str(v) for k, v in declared.items()}
    built._children = children
    built._default_json = {
        key: _as_json(child.get("default"))
        for key, child in node["properties"].items()
        if key not in children
    }
    _SECTIONS[(schema, section)] = built
    return built


def field_type(node: dict[str, Any], section: tuple[str, ...] = ()) -> str:
    """The type a settings class declares for a schema key: ``int``, ``float | None``,
    ``tuple[str, ...]``, ``dict[str, float]``, or the class of a nested section."""
    if _is_section(node):
        return "".join(p.title() for p in section[-1].split("_")) + "Settings"
    kinds = node.get("type", "object")
    names = []
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind == "array":
            item = node.get("items", {})
            inner = _TYPES.get(str(item.get("type")), "Any") if isinstance(item, dict) else "Any"
            fixed = node.get("minItems") is not None and node.get("minItems") == node.get(
                "maxItems"
            )
            names.append(
                f"tuple[{', '.join([inner] * node['minItems'])}]"
                if fixed
                else f"tuple[{inner}, ...]"
            )
        elif kind == "object":
            extra = node.get("additionalProperties")
            value = _TYPES.get(str(extra.get("type")), "Any") if isinstance(extra, dict) else "Any"
            names.append(f"dict[str, {value}]")
        else:
            names.append("None" if kind == "null" else _TYPES.get(kind, "Any"))
    return " | ".join(names)


def declarations(*section: str, schema: str | os.PathLike[str] = CONFIG_SCHEMA) -> list[str]:
    """The field lines of the class of config ``section`` (``name: type``), schema order."""
    node = section_node(*section, schema=schema)
    return [
        f"{key}: {field_type(child, (*section, key))} = FROM_SCHEMA"
        for key, child in node["properties"].items()
    ]


def declaration_problems(cls: type[Settings]) -> list[str]:
    """What a settings class declares differently from its schema section (empty: none)."""
    where = ".".join(cls._section)
    lines = declarations(*cls._section, schema=cls._schema)
    expected = dict(line.removesuffix(" = FROM_SCHEMA").split(": ", 1) for line in lines)
    expected.update({key: child.__name__ for key, child in cls._children.items()})
    problems = []
    for key, kind in expected.items():
        have = cls._declared.get(key)
        if have is None:
            problems.append(f"{cls.__name__} does not declare {where}.{key}: add `{key}: {kind}`")
        elif have.replace("'", "") != kind:
            problems.append(f"{cls.__name__}.{key} is declared {have}, the schema says {kind}")
    return problems


def sections() -> list[type[Settings]]:
    """Every settings class built so far (import the engines' settings modules first)."""
    return list(_SECTIONS.values())


if __name__ == "__main__":
    import sys

    # python -m medprep.common.settings ct lung: the field lines to paste into a class body
    print("\n".join(f"    {line}" for line in declarations(*sys.argv[1:])))
