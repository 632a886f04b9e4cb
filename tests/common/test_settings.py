"""The engines' settings are views of the config schema: a key added to the schema is a
field with its default, with no Python edit; limits come from the schema; a default
restated in Python is refused."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medprep.common.settings import Settings, config_defaults, settings_section
from medprep.ct.settings import CtSettings
from medprep.wsi.settings import TileSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "engine": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "size": {"type": "integer", "minimum": 1, "default": 4},
                "names": {"type": "array", "items": {"type": "string"}, "default": ["a"]},
                "extra": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"on": {"type": "boolean", "default": False}},
                },
            },
        }
    },
}


@pytest.fixture
def schema(tmp_path):
    def write(**added):
        node = yaml.safe_load(yaml.safe_dump(SCHEMA))
        node["properties"]["engine"]["properties"].update(added)
        path = tmp_path / f"schema-{len(added)}.yaml"
        path.write_text(yaml.safe_dump(node))
        return path

    return write


def test_a_key_added_to_the_schema_is_a_field_with_its_default(schema):
    added = {"labels": {"type": ["string", "null"], "enum": ["xml", None], "default": None}}

    @settings_section("engine", schema=schema(**added))
    class Engine(Settings):
        pass

    engine = Engine()
    assert engine.labels is None and engine.size == 4 and engine.names == ("a",)
    assert engine.extra.on is False  # a nested section without a class of its own
    assert Engine.from_config({"labels": "xml", "extra": {"on": True}}).extra.on is True
    with pytest.raises(ValueError, match=r"^engine\.labels: 'json' is not one of"):
        Engine.from_config({"labels": "json"})
    assert Engine.from_config({"names": ["a"]}) == engine  # lists as tuples, either way


def test_a_default_restated_in_python_is_refused(schema):
    with pytest.raises(TypeError, match="restates the default of engine.size"):

        @settings_section("engine", schema=schema())
        class Engine(Settings):
            size: int = 5


def test_every_wsi_and_ct_section_holds_the_schemas_defaults():
    assert CtSettings().as_dict() == config_defaults("ct")
    assert TileSettings().as_dict() == config_defaults("wsi", "tile")


def test_settings_cross_process_boundaries():
    cfg = CtSettings.from_config({"normalise": {"mean": 0.0}})
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # nested classes made for the schema too
    assert cfg.normalise.as_dict() == {**config_defaults("ct", "normalise"), "mean": 0.0}


def test_the_schemas_defaults_are_valid_so_only_changed_values_are_checked():
    import jsonschema

    from medprep.common.settings import CONFIG_SCHEMA

    schema = yaml.safe_load(Path(CONFIG_SCHEMA).read_text())
    for section in ("ct", "wsi", "storage"):
        node = schema["properties"][section]
        errors = list(jsonschema.Draft202012Validator(node).iter_errors(config_defaults(section)))
        assert not errors, [e.message for e in errors]


def test_a_value_equal_to_its_default_in_another_type_is_still_checked(schema):
    @settings_section("engine", schema=schema())
    class Engine(Settings):
        pass

    with pytest.raises(ValueError, match=r"engine\.extra\.on: 0 is not of type 'boolean'"):
        Engine.from_config({"extra": {"on": 0}})
    with pytest.raises(ValueError, match=r"engine\.size: 0 is less than the minimum"):
        Engine.from_config({"size": 0})


def test_default_settings_need_no_jsonschema():
    code = (
        "import sys\n"
        "from medprep.ct.settings import CtSettings\n"
        "from medprep.wsi.settings import TileSettings\n"
        "CtSettings(); TileSettings.from_config({'size': 256})\n"
        "assert 'jsonschema' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_settings_class_declares_its_fields_as_the_schema_types_them():
    """Readers and type checkers see the fields: each class declares every key of its
    schema section with the type the schema gives it (``python -m
    medprep.common.settings SECTION...`` prints the lines to paste)."""
    import medprep.ct.settings
    import medprep.data.splits
    import medprep.wsi.guard
    import medprep.wsi.settings  # noqa: F401 - the sections register when imported
    from medprep.common.settings import declaration_problems, sections

    built = {".".join(cls._section) for cls in sections() if cls.__module__.startswith("medprep")}
    assert {"ct", "ct.lung", "ct.series", "wsi.tile", "wsi.tile.filters", "dataset"} <= built
    problems = [
        p
        for cls in sections()
        if cls.__module__.startswith("medprep")
        for p in declaration_problems(cls)
    ]
    assert not problems, problems


def test_a_missing_or_mistyped_declaration_is_found(schema):
    from medprep.common.settings import declaration_problems

    @settings_section("engine", schema=schema())
    class Engine(Settings):
        size: str

    problems = declaration_problems(Engine)
    assert "Engine.size is declared str, the schema says int" in problems
    assert any(p.startswith("Engine does not declare engine.names") for p in problems)


def test_a_workflow_job_does_not_check_its_settings_again():
    """Snakemake validated the whole config when it read the workflow: within a job
    (config_validated) changed values are taken as they are, and jsonschema stays out."""
    code = (
        "import sys\n"
        "from medprep.common.settings import config_validated\n"
        "from medprep.ct.settings import CtSettings\n"
        "with config_validated():\n"
        "    CtSettings.from_config({'spacing': [3.0, 3.0, 3.0]})\n"
        "assert 'jsonschema' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from medprep.common.settings import config_validated

    with config_validated():
        TileSettings(size=8)  # not checked within the block
    with pytest.raises(ValueError, match=r"^wsi\.tile\.size: 8 is less than the minimum"):
        TileSettings(size=8)  # checked again after it
