"""`tunelab config show|schema`: the resolved config (presets merged, references resolved), and its JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunelab.cli.console import console

app = typer.Typer(help="Show a config as tunelab reads it, or write its JSON Schema for editors.", no_args_is_help=True)


@app.command("show")
def show(
    config: Path = typer.Argument(..., help="YAML config (its defaults: presets are merged)."),
    overrides: list[str] | None = typer.Argument(None, help="Overrides such as train.lr=1e-4."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the config after presets, overrides and ${…} references, validated, with every default filled in."""
    import yaml

    from tunelab.config.load import load_config

    cfg = load_config(config, overrides or [])
    if as_json:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
    else:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


@app.command("schema")
def schema(
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the schema to this file (default: print it)."),
) -> None:
    """The JSON Schema of config files: point your editor at it to complete and check keys and values."""
    from tunelab.config.editor import json_schema, schema_comment, write_schema

    if out is None:
        typer.echo(json.dumps(json_schema(), indent=2))
        return
    write_schema(out)
    console.print(f"wrote {out}; put this first in a config: {schema_comment(out.resolve()).strip()}", soft_wrap=True)
