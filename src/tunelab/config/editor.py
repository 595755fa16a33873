"""The config's JSON Schema, so editors complete and check tunelab YAML files as they are typed.

The schema comes from the pydantic models, so it never drifts from what `tunelab train` accepts;
``defaults:`` (composition) is added by hand, as it is read before validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.config.compose import GROUPS
from tunelab.config.schema import RunConfig

SCHEMA_FILE = "tunelab.schema.json"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a tunelab config file."""
    schema = RunConfig.model_json_schema()
    entry = {
        "anyOf": [
            {"type": "string", "description": "a top-level preset, or _self_ (where this file's keys go)"},
            {
                "type": "object",
                "maxProperties": 1,
                "properties": {group: {"type": ["string", "null"]} for group in GROUPS},
                "additionalProperties": False,
            },
        ]
    }
    schema["properties"] = {
        "defaults": {
            "type": "array",
            "items": entry,
            "description": "presets merged before this file: `- model: NAME`, `- method: NAME`, … and _self_",
        },
        **schema.get("properties", {}),
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def write_schema(path: Path) -> Path:
    """Write :func:`json_schema` to ``path`` (its folder is made) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")
    return path


def schema_comment(schema: Path) -> str:
    """The first line of a config that points yaml-language-server (VS Code, Neovim, …) at the schema."""
    return f"# yaml-language-server: $schema={schema}\n"
