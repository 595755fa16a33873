"""`tunelab runs list|show`."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from tunelab.cli.console import console
from tunelab.vocab import FINAL_STATUSES

app = typer.Typer(help="Find runs again: list them, show one.", no_args_is_help=True)


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


# Columns of `runs list`, most useful first: when the terminal is narrow the last ones are dropped, so the id
# (what a user copies) is always shown whole and nothing is cut to "6640…".
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "left"),
    ("status", "left"),
    ("step", "right"),
    ("val loss", "right"),
    ("method", "left"),
    ("created", "left"),
    ("train loss", "right"),
    ("name", "left"),
    ("backend", "left"),
    ("device", "left"),
)


@app.command("list")
def list_runs(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    status: str | None = typer.Option(None, help="Only runs with this status."),
    limit: int = typer.Option(50, help="How many of the newest runs."),
) -> None:
    """List runs, newest first (any command taking a run id also takes a unique prefix of it)."""
    from tunelab import services

    runs = services.list_runs(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in runs], indent=2))
        return
    if not runs:
        console.print("no runs yet: start one with `tunelab train CONFIG` or `tunelab quickstart`")
        return
    console.print(_fitted_table([_row(r) for r in runs], console.width))
    console.print(f"a unique prefix of an id works too, e.g. tunelab runs show {runs[0].id[:4]}", style="dim")


def _row(r: Any) -> dict[str, str]:
    return {
        "id": r.id,
        "status": r.status,
        "step": f"{r.step or 0}/{r.total_steps or '?'}",
        "val loss": _num(r.metrics.get("val_loss")),
        "method": r.method,
        "created": (r.created_at or "")[:16].replace("T", " "),
        "train loss": _num(r.metrics.get("train_loss")),
        "name": r.name or "",
        "backend": r.backend or "-",
        "device": r.device or "-",
    }


def _fitted_table(rows: list[dict[str, str]], width: int) -> Table:
    """The columns that fit in ``width`` at their full width, in order of usefulness (at least id and status)."""
    kept: list[tuple[str, str]] = []
    used = 1  # the table's left border
    for name, justify in _COLUMNS:
        cell = max(len(name), *(len(row[name]) for row in rows))
        if kept[1:] and used + cell + 3 > width:  # padding on both sides and a border
            break
        kept.append((name, justify))
        used += cell + 3
    table = Table()
    for name, justify in kept:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(row[name] for name, _ in kept))
    return table


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
    console.print(_backend_line(run))
    console.print(f"model {run['config']['model']['path']}  data {run['config']['data']['train']}")
    total = run.get("total_steps")
    console.print(
        f"step {run.get('step') or 0}/{total if total is not None else '?'}  train loss {_num(m.get('train_loss'))}  "
        f"val loss {_num(m.get('val_loss'))}  tokens/s {_num(m.get('tokens_per_sec'), ',.0f')}"
    )
    if run.get("error"):
        console.print(f"[red]error:[/] {run['error']}")
    for path in run.get("missing") or []:
        console.print(f"[red]gone:[/] {path} (deleted or moved since the run wrote it)")
    for kind, path in run["artifacts"].items():
        if path:
            console.print(f"{kind}: {path}")


def _backend_line(run: Any) -> str:
    """Where it trained; a run that failed before loading never chose a backend, so say that instead of None."""
    if not run.get("backend"):
        ended = run["status"] in FINAL_STATUSES
        return "backend not chosen: " + ("the run ended before loading the model" if ended else "not loaded yet")
    reason = f" ({run['backend_reason']})" if run.get("backend_reason") else ""
    return f"backend {run['backend']} on {run.get('device') or '?'}{reason}"
