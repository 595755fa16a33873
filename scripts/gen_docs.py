"""Generate the docs site's reference pages from the code, so they never drift from it.

- ``reference/config.md``: every key of the pydantic run config (type, default, range, description);
- ``reference/cli.md``: every command of the Typer CLI, with its arguments and options;
- ``reference/rest-api.md``: every route of the service, from the app's OpenAPI schema;
- ``benchmarks.md``: ``bench/README.md``, the benchmarks' method and figures, as the bench scripts left them.

mkdocs runs this file as a hook (``hooks:`` in mkdocs.yml): the pages are made in memory on each build,
so ``mkdocs build --strict`` always documents the code as it is. ``python scripts/gen_docs.py DIR``
writes them to DIR to read them without building the site.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PAGES = ("reference/config.md", "reference/cli.md", "reference/rest-api.md", "benchmarks.md")
ROOT = Path(__file__).resolve().parents[1]


# --- config reference -------------------------------------------------------------------------------------------


def config_keys() -> Iterator[tuple[str, FieldInfo, type[BaseModel] | None]]:
    """Every leaf key of the run config as ``(dotted key, field, its section's model)``, in schema order."""
    from tunelab.config.schema import RunConfig

    def walk(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo, type[BaseModel] | None]]:
        for name, field in model.model_fields.items():
            sub = _section(field.annotation)
            if sub is not None:
                yield from walk(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field, model

    yield from walk(RunConfig, "")


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def type_name(annotation: Any) -> str:
    """A reader's spelling of a type: ``int | None``, ``"auto" | "cpu"``, ``dict[str, str]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as YAML would spell it, or *required*."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def range_text(field: FieldInfo) -> str:
    """The bounds pydantic checks (``>= 1, <= 4096``), or an empty string."""
    parts = []
    for meta in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None and isinstance(meta, annotated_types.BaseMetadata):
                parts.append(f"{symbol} {value}")
        for attr, label in (("min_length", "length >="), ("max_length", "length <=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{label} {value}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """The config reference page: one table per section, one row per key."""
    from tunelab.config.schema import RunConfig

    lines = [
        "# Config reference",
        "",
        "Generated from tunelab's config schema (`tunelab.config.schema`) on every docs build: it lists every key",
        "a config file may hold. Any key can be overridden on the command line (`tunelab train cfg.yaml",
        "train.lr=1e-4`); `tunelab config show FILE` prints a config with every default filled in and",
        "`tunelab config schema` writes the JSON Schema editors complete keys from.",
    ]
    section = None
    for key, field, model in config_keys():
        head = key.split(".")[0] if "." in key else "top level"
        if head != section:
            section = head
            doc = (model.__doc__ or "").strip().splitlines()[0] if model is not None and model is not RunConfig else ""
            lines += ["", f"## {section}", ""] + ([doc, ""] if doc else [])
            lines += ["| key | type | default | range | description |", "|---|---|---|---|---|"]
        cells = (f"`{key}`", f"`{type_name(field.annotation)}`", default_text(field), range_text(field))
        lines.append("| " + " | ".join(_cell(c) for c in (*cells, field.description or "")) + " |")
    return "\n".join(lines) + "\n"


# --- CLI reference ----------------------------------------------------------------------------------------------


def cli_commands() -> Iterator[tuple[str, Any]]:
    """Every command of the CLI as ``(full name, click command)``, groups included, depth first."""
    import typer

    from tunelab.cli.main import app

    def walk(command: Any, name: str) -> Iterator[tuple[str, Any]]:
        yield name, command
        for sub_name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, f"{name} {sub_name}")

    yield from walk(typer.main.get_command(app), "tunelab")


def _param_row(param: Any) -> str:
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}`"
    else:
        name = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
    kind = "flag" if getattr(param, "is_flag", False) else param.bare_type()
    bounds = [f"{s} {v}" for s, v in ((">=", getattr(param, "min", None)), ("<=", getattr(param, "max", None))) if v]
    if bounds:
        kind += f" ({', '.join(bounds)})"
    default = param.default
    shown = "" if default in (None, (), []) or callable(default) else f"`{default}`"
    if param.required:
        shown = "*required*"
    return "| " + " | ".join(_cell(c) for c in (name, kind, shown, getattr(param, "help", None) or "")) + " |"


def cli_reference() -> str:
    """The CLI reference page: one section per command, its help and a table of its parameters."""
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app (`tunelab.cli.main`) on every docs build. `tunelab COMMAND --help` prints",
        "the same in a terminal.",
    ]
    for name, command in cli_commands():
        if getattr(command, "hidden", False):
            continue
        depth = min(name.count(" ") + 1, 3)
        lines += ["", f"{'#' * (depth + 1)} `{name}`", ""]
        lines.append((command.help or "").strip() or (command.short_help or ""))
        params = [p for p in command.params if p.name not in ("help",) and not getattr(p, "hidden", False)]
        if getattr(command, "commands", None):
            subs = ", ".join(f"`{name} {sub}`" for sub in sorted(command.commands))
            lines += ["", f"Commands: {subs}."]
        if params:
            lines += ["", "| parameter | type | default | description |", "|---|---|---|---|"]
            lines += [_param_row(p) for p in params]
    return "\n".join(lines) + "\n"


# --- REST API reference -----------------------------------------------------------------------------------------


def openapi_schema() -> dict[str, Any]:
    """The service's OpenAPI schema, as `tunelab serve` publishes it at /openapi.json."""
    from tunelab.api.app import create_app

    return create_app().openapi()


def rest_reference() -> str:
    """The REST API page: each route with its parameters, request body and responses."""
    spec = openapi_schema()
    lines = [
        "# REST API reference",
        "",
        "Generated from the service's OpenAPI schema on every docs build. A running `tunelab serve` shows the",
        "same interactively at `/docs` and as JSON at `/openapi.json`. Every route but `/health` needs",
        "`Authorization: Bearer KEY` (make one with `tunelab auth create-key --name NAME`).",
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            lines += ["", f"## `{method.upper()} {path}`", ""]
            lines.append(op.get("summary", ""))
            if op.get("description"):
                lines += ["", op["description"].strip()]
            params = op.get("parameters", [])
            if params:
                lines += ["", "| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for p in params:
                    schema = p.get("schema", {})
                    kind = schema.get("type") or " | ".join(s.get("type", "?") for s in schema.get("anyOf", []))
                    cells = (f"`{p['name']}`", p["in"], kind, "yes" if p.get("required") else "no")
                    lines.append("| " + " | ".join(_cell(c) for c in (*cells, p.get("description", ""))) + " |")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                lines += ["", f"Body ({media}): {_schema_name(content.get('schema', {}))}"]
            codes = ", ".join(f"{code} {r.get('description', '')}" for code, r in op.get("responses", {}).items())
            lines += ["", f"Responses: {codes}."]
    return "\n".join(lines) + "\n"


def _schema_name(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref")
    return f"`{ref.rsplit('/', 1)[-1]}`" if ref else f"`{schema.get('type', 'object')}`"


# --- mkdocs hook and command line -------------------------------------------------------------------------------


def generate() -> dict[str, str]:
    """Every generated page, by its path under docs/."""
    pages = (config_reference(), cli_reference(), rest_reference(), benchmarks())
    return dict(zip(PAGES, pages, strict=True))


def benchmarks() -> str:
    """The benchmarks page: bench/README.md, which each bench script's figures are written into."""
    text = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    note = "The scripts are in `bench/` of the repository; each prints its figures, and they are copied here.\n\n"
    head, _, rest = text.partition("\n")
    return f"{head}\n\n{note}{rest.lstrip()}"


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated pages to the site before the nav is built."""
    from mkdocs.structure.files import File

    for path, text in generate().items():
        files.append(File.generated(config, path, content=text))
    return files


def main(argv: list[str]) -> int:
    """Write the generated pages under the folder given (default: site-gen/)."""
    out = Path(argv[0] if argv else "site-gen")
    for path, text in generate().items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
