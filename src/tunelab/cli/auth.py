"""`tunelab auth create-key|list|revoke|set-secret|secrets`."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from tunelab import services
from tunelab.cli.console import console

app = typer.Typer(help="API keys for `tunelab serve`, and encrypted secrets.", no_args_is_help=True)


@app.command("create-key")
def create_key(name: str = typer.Option(..., "--name", help="Who or what the key is for.")) -> None:
    """Create an API key and print it once (the last word of the line); only its hash is stored."""
    key, row = services.create_key(name)
    console.print(f"API key {row.id} ({row.name}), shown only now: {key}", soft_wrap=True)


@app.command("list")
def list_keys(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List API keys (names and prefixes; the keys themselves are not stored)."""
    keys = services.list_keys()
    if as_json:
        typer.echo(json.dumps([k.to_dict() for k in keys], indent=2))
        return
    table = Table("id", "name", "prefix", "created", "last used", "revoked")
    for k in keys:
        table.add_row(
            str(k.id),
            k.name,
            k.prefix + "…",
            (k.created_at or "")[:19],
            (k.last_used_at or "-")[:19],
            (k.revoked_at or "-")[:19],
        )
    console.print(table if keys else "no API keys: create one with `tunelab auth create-key --name NAME`")


@app.command("revoke")
def revoke(key: str = typer.Argument(..., help="The key's id or name (all keys with that name).")) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    for row in services.revoke_key(key):
        console.print(f"revoked key {row.id} ({row.name})")


@app.command("set-secret")
def set_secret(
    name: str = typer.Argument(..., help="e.g. hf_token or wandb_api_key."),
) -> None:
    """Store a secret encrypted at rest; the value is read from stdin (or a hidden prompt)."""
    value = sys.stdin.read().strip() if not sys.stdin.isatty() else typer.prompt(name, hide_input=True)
    services.set_secret(name, value)
    console.print(f"secret {name} stored (encrypted)")


@app.command("secrets")
def secrets() -> None:
    """List the names of stored secrets (never their values)."""
    names = services.list_secrets()
    console.print("\n".join(names) if names else "no secrets stored")
