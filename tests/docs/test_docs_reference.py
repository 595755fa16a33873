"""The generated reference pages list everything the code has: every config key of the schema (with its
default and description), every CLI command and option, every REST route. They are made on each docs build
(scripts/gen_docs.py is mkdocs' hook), and these tests compare them with the code through other paths."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tunelab.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_keys() -> dict[str, dict[str, Any]]:
    """Every leaf key of the config, read from its JSON Schema (what editors see), with its schema."""
    schema = RunConfig.model_json_schema()
    defs = schema.get("$defs", {})

    def walk(node: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
        found = {}
        for name, prop in node["properties"].items():
            target = prop.get("$ref") or (prop.get("allOf") or [{}])[0].get("$ref")
            if target:
                found |= walk(defs[target.rsplit("/", 1)[-1]], f"{prefix}{name}.")
            else:
                found[f"{prefix}{name}"] = prop
        return found

    return walk(schema, "")


def table_rows(page: str) -> dict[str, list[str]]:
    """The rows of a page's tables by their first cell's code span."""
    rows = {}
    for line in page.splitlines():
        match = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(2))]
    return rows


def test_the_config_reference_lists_every_key_of_the_schema(gen_docs: ModuleType) -> None:
    rows = table_rows(gen_docs.config_reference())
    keys = schema_keys()
    assert set(rows) == set(keys)
    assert {"model.path", "method.rank", "train.lr", "objective.name", "output_dir"} <= set(rows)
    undescribed = sorted(key for key, prop in keys.items() if not prop.get("description"))
    assert not undescribed, f"give these schema fields a description: {undescribed}"
    for key, prop in keys.items():
        _type, default, _range, description = rows[key]
        assert description == prop["description"].replace("|", "\\|").replace("\n", " "), key
        if "default" in prop and prop["default"] not in ({}, []):
            value = prop["default"]
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            assert default == f"`{shown}`", key
    assert rows["model.path"][1] == "*required*" and rows["method.rank"][2] == ">= 1, <= 4096"


def test_the_cli_reference_lists_every_command_and_option(gen_docs: ModuleType) -> None:
    import typer

    from tunelab.cli.main import app

    page = gen_docs.cli_reference()
    headings = set(re.findall(r"^#+ `(tunelab[^`]*)`$", page, flags=re.M))

    def walk(command: Any, name: str) -> None:
        if command.hidden:  # internal commands (a job's rank process) stay out of the reference
            return
        assert name in headings, name
        section = page.split(f"`{name}`\n", 1)[1].split("\n#", 1)[0]
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert f"`{param.opts[0]}`" in section, f"{name} {param.opts[0]}"
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {sub_name}")

    walk(typer.main.get_command(app), "tunelab")
    assert {"tunelab train", "tunelab export", "tunelab runs list", "tunelab config schema"} <= headings


def test_the_rest_reference_lists_every_route(gen_docs: ModuleType) -> None:
    from fastapi.testclient import TestClient

    from tunelab.api.app import create_app

    page = gen_docs.rest_reference()
    spec = TestClient(create_app()).get("/openapi.json").json()  # what a running service publishes
    routes = {f"{method.upper()} {path}" for path, methods in spec["paths"].items() for method in methods}
    assert routes == set(re.findall(r"^## `([A-Z]+ [^`]+)`$", page, flags=re.M))
    assert "POST /v1/jobs" in routes and "POST /v1/chat/completions" in routes
