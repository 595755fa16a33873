"""`tunelab runs list|show`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tunelab.cli.console import console

app = typer.Typer(help="Find runs again: list them, show one.", no_args_is_help=True)


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


@app.command("list")
def list_runs(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    status: str | None = typer.Option(None, help="Only runs with this status."),
    limit: int = typer.Option(50, help="How many of the newest runs."),
) -> None:
    """List runs, newest first."""
    from tunelab import services

    runs = services.list_runs(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in runs], indent=2))
        return
    table = Table("id", "name", "status", "backend", "device", "method", "step", "train loss", "val loss", "created")
    for r in runs:
        table.add_row(
            r["id"],
            r.get("name") or "",
            r["status"],
            r.get("backend") or "-",
            r.get("device") or "-",
            r["config"].get("method", {}).get("name", "-"),
            f"{r.get('step') or 0}/{r.get('total_steps') or '?'}",
            _num(r["metrics"].get("train_loss")),
            _num(r["metrics"].get("val_loss")),
            (r.get("created_at") or "")[:19].replace("T", " "),
        )
    console.print(table if runs else "no runs yet: start one with `tunelab train CONFIG` or `tunelab quickstart`")


@app.command("show")
def show_run(
    run_id: str = typer.Argument(..., help="Run id (or a unique prefix of it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one run: status, config, metrics and artifacts."""
    from tunelab import services

    run = services.show_run(run_id)
    if as_json:
        typer.echo(json.dumps(run.to_dict(), indent=2))
        return
    m = run["metrics"]
    console.print(f"[bold]{run['id']}[/] {run.get('name') or ''} — {run['status']}")
    console.print(f"backend {run.get('backend')} on {run.get('device')} ({run.get('backend_reason') or ''})")
    console.print(f"model {run['config']['model']['path']}  data {run['config']['data']['train']}")
    console.print(
        f"step {run.get('step')}/{run.get('total_steps')}  train loss {_num(m.get('train_loss'))}  "
        f"val loss {_num(m.get('val_loss'))}  tokens/s {_num(m.get('tokens_per_sec'), ',.0f')}"
    )
    if run.get("error"):
        console.print(f"[red]error:[/] {run['error']}")
    for path in run.get("missing") or []:
        console.print(f"[red]gone:[/] {path} (deleted or moved since the run wrote it)")
    for kind, path in run["artifacts"].items():
        if path:
            console.print(f"{kind}: {path}")
