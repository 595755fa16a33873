"""`tunelab doctor`: what this machine has, which backend `auto` picks and why, what each backend can do, and
which extras are installed (with the command that adds each missing one)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console

_OPTIONS = (
    ("compiled_step", "compiled step"),
    ("gradient_checkpointing", "grad checkpointing"),
    ("bf16", "bf16"),
    ("quantized_bases", "quantized bases"),
)


def doctor(as_json: bool = typer.Option(False, "--json", help="Print the same facts as JSON.")) -> None:
    """Check this machine: hardware, installed backends, the backend `auto` picks, what each can do, and extras."""
    from tunelab import services

    report = services.doctor().to_dict()
    report["extras"] = [extra.to_dict() for extra in services.extras()]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _render(report)


def _render(report: dict[str, Any]) -> None:
    hw = report["hardware"]
    console.print("[bold]Hardware[/]")
    console.print(Text(f"  {hw['os']} ({hw['machine']}), Python {hw['python']}"))
    console.print(Text(f"  CPU: {hw['cpu']} — {hw['cores']} cores, {_gib(hw['memory_bytes'])} memory"))
    for gpu in hw["gpus"] or [{"name": "none", "api": "", "memory_bytes": None}]:
        api = f" ({gpu['api']})" if gpu["api"] else ""
        memory = f", {_gib(gpu['memory_bytes'])}" if gpu["memory_bytes"] else ""
        console.print(Text(f"  GPU: {gpu['name']}{api}{memory}"))
    installed = "  ".join(f"{name} {version or '-'}" for name, version in report["installed"].items())
    console.print("[bold]Installed[/]")
    console.print(Text(f"  {installed}"))
    auto = report["auto"]
    console.print(Text.assemble(("backend: auto", "bold"), f" → {auto['backend'] or 'none'} ({auto['reason']})"))
    console.print(_capability_table(report["capabilities"]))
    blas = report["mlx_blas"]
    if blas is not None:
        speed = f", {blas['gflops']:.0f} GFLOP/s (512² fp32 matmul)" if blas["gflops"] is not None else ""
        where = f" {blas.get('served_by') or blas['path'] or ''}".rstrip()
        console.print(Text.assemble(("MLX BLAS: ", "bold"), f"{blas['name']}{where}{speed} — {blas['why']}"))
        if blas["warning"]:
            console.print(Text.assemble(("warning: ", "bold yellow"), blas["warning"]))
    _render_extras(report["extras"])


def _render_extras(extras: list[dict[str, Any]]) -> None:
    """One line per extra: installed, or what is missing and the one command that adds it."""
    console.print("[bold]Extras[/]")
    width = max((len(extra["name"]) for extra in extras), default=0)
    for extra in extras:
        name = extra["name"].ljust(width)
        if extra["present"]:
            console.print(Text.assemble(f"  {name}  ", ("installed", "green")))
        else:
            missing = ", ".join(extra["missing"])
            console.print(Text.assemble(f"  {name}  ", ("missing", "yellow"), f" {missing}: {extra['command']}"))


def _capability_table(rows: list[dict[str, Any]]) -> Table:
    """One column per backend, one row per fact: stays readable in 80 columns as methods grow."""
    table = Table("", *(row["backend"] for row in rows), title="Capabilities", box=box.SIMPLE_HEAD)
    table.add_row("available here", *("yes" if row["available"] else "no" for row in rows))
    table.add_row("devices", *(", ".join(row["devices"]) or "-" for row in rows))
    table.add_row("methods", *(", ".join(row["methods"]) for row in rows))
    for key, label in _OPTIONS:
        table.add_row(label, *("yes" if row["options"].get(key) else "no" for row in rows))
    if any(row["note"] for row in rows):
        table.add_row("note", *(row["note"] for row in rows))
    return table


def _gib(n: int | None) -> str:
    return "?" if not n else f"{n / 2**30:.1f} GiB"
