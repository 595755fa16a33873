"""`tunelab sweep CONFIG key=a,b …` queues one job per trial; `sweep show|list|cancel` follow and stop them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tunelab.cli.console import console
from tunelab.errors import ConfigError

_ACTIONS = ("show", "list", "cancel")


def sweep(
    args: list[str] = typer.Argument(
        ...,
        help="CONFIG then key=values: train.lr=1e-4,3e-4 (a list), method.rank=range(8,33,8), "
        "train.lr='tag(log,interval(1e-5,1e-2))' (optuna); or: show ID | list | cancel ID.",
    ),
    search: str = typer.Option("grid", help="grid (every combination) or optuna (TPE, median pruning)."),
    trials: int | None = typer.Option(None, help="optuna: how many trials."),
    metric: str = typer.Option("val_loss", help="What ranks the trials (and what optuna optimizes)."),
    direction: str = typer.Option("minimize", help="minimize or maximize the metric."),
    name: str | None = typer.Option(None, help="A name for the sweep (its runs are named NAME-trial-N)."),
    priority: int = typer.Option(0, help="Higher runs first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search config values: one queued job per trial, run by `tunelab worker` (any number, any machine)."""
    from tunelab.services import sweeps as services

    action, rest = (args[0], args[1:]) if args[0] in _ACTIONS else ("start", args)
    if action == "list":
        sweeps = services.list_sweeps()
        if as_json:
            typer.echo(json.dumps([s.to_dict() for s in sweeps], indent=2))
            return
        for s in sweeps:
            console.print(f"{s.id}  {s.status:<9}  {s.search:<6}  {len(s.results)} trials  {s.name or ''}")
        return
    if action in ("show", "cancel"):
        if len(rest) != 1:
            raise ConfigError(f"usage: tunelab sweep {action} SWEEP_ID")
        view = services.show_sweep(rest[0]) if action == "show" else services.cancel_sweep(rest[0])
        _render(view, as_json)
        return
    if len(rest) < 2:
        raise ConfigError(
            "usage: tunelab sweep CONFIG key=a,b,c [key=…]", hint="e.g. train.lr=1e-4,3e-4 method.rank=8,16"
        )
    view = services.start_sweep(
        Path(rest[0]),
        rest[1:],
        search=search,
        trials=trials,
        metric=metric,
        direction=direction,
        name=name,
        priority=priority,
    )
    if as_json:
        typer.echo(json.dumps(view.to_dict(), indent=2))
        return
    console.print(
        f"queued {len(view.results)} trials; start workers with `tunelab worker`; "
        f"follow with `tunelab sweep show {view.id}`; sweep {view.id}",
        soft_wrap=True,
    )


def _render(view: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(view.to_dict(), indent=2))
        return
    keys = list(view.space)
    table = Table("rank", "trial", "status", *keys, view.metric, "run", title=f"sweep {view.id} ({view.status})")
    for r in view.results:
        values = [_short(r.params.get(k)) for k in keys]
        value = f"{r.value:.4g}" if r.value is not None else "-"
        table.add_row(
            str(r.rank or "-"), str(r.trial if r.trial is not None else "-"), r.status, *values, value, r.run_id or "-"
        )
    console.print(table)
    if view.best is not None:
        console.print(f"best: trial {view.best.trial} (run {view.best.run_id}) {view.metric}={view.best.value:.4g}")
    if view.study:
        console.print(f"optuna: optuna.load_study(study_name={view.study!r}, storage={view.storage!r})", soft_wrap=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
