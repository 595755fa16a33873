"""`tunelab estimate`: predicted peak memory of a config, line by line, and whether it fits here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console
from tunelab.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``80GiB``, ``24GB``, ``16g`` or a number of bytes, as bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--memory {text!r} is not a size", hint="write it like 80GiB, 24GB or 16G")
    return int(float(match.group(1)) * _UNITS[unit])


def estimate(
    config: Path = typer.Argument(..., help="YAML config (the one you would train with)."),
    overrides: list[str] | None = typer.Argument(None, help="Overrides such as train.batch_size=8."),
    device: str | None = typer.Option(None, help="Estimate for another device: cuda, mps, metal or cpu."),
    memory: str | None = typer.Option(None, help="Memory of that device, e.g. 80GiB (default: this machine's)."),
    bits: int | None = typer.Option(None, help="Estimate with the base quantized to 4 or 8 bits (QLoRA)."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
) -> None:
    """Predict a run's peak memory (weights, adapters, optimizer, activations, logits) before loading anything."""
    from tunelab import services
    from tunelab.config.load import load_config

    if device is not None and device not in ("cuda", "mps", "metal", "cpu"):
        raise ConfigError(f"--device must be cuda, mps, metal or cpu (got {device!r})")
    if bits is not None and bits not in (4, 8):
        raise ConfigError(f"--bits must be 4 or 8 (got {bits})")
    cfg = load_config(config, overrides or [])
    plan = services.estimate_memory(cfg, device=device, budget_bytes=parse_size(memory) if memory else None, bits=bits)
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return
    _render(plan)


def _render(plan: Any) -> None:
    assert plan.estimate is not None
    est, work = plan.estimate, plan.estimate.workload
    ckpt = ", gradient checkpointing" if work.gradient_checkpointing else ""
    quant = f", {work.bits}-bit base" if work.bits else ""
    console.print(
        Text(
            f"{work.backend} on {work.device}, {work.dtype}{quant}; {work.method} "
            f"(rank {work.rank}, {est.trainable_params:,} trainable); "
            f"batch {work.batch} × {work.seq_len} tokens{ckpt}"
        )
    )
    table = Table("", "size", "", title=f"Estimated peak memory (at the {est.peak_at})", box=box.SIMPLE_HEAD)
    table.columns[1].justify = "right"
    for line in est.lines:
        table.add_row(line.label, size_text(line.bytes), Text(line.note, style="dim"))
    table.add_row(Text("total", style="bold"), Text(size_text(est.total), style="bold"), "")
    console.print(table)
    console.print(
        Text(
            "worst case: every sequence data.max_seq_len long and fully supervised "
            "(tunelab train re-estimates from your data's longest example)",
            style="dim",
        )
    )
    if plan.auto:
        console.print(
            Text(
                f"batch_size auto: {plan.batch_size} × grad_accum {plan.grad_accum} "
                f"= {plan.batch_size * plan.grad_accum} examples per step"
            )
        )
    console.print(_verdict(plan))


def size_text(n: int) -> str:
    """Bytes in the unit that reads best: 512 KiB, 37.5 MiB, 14.96 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _verdict(plan: Any) -> Text:
    assert plan.estimate is not None
    budget = plan.budget
    if plan.fits is None:
        return Text(f"capacity of the {budget.device} unknown ({budget.source}); pass --memory 80GiB to compare")
    have = f"{plan.estimate.total / 2**30:.1f} GiB of {budget.bytes / 2**30:.1f} GiB ({budget.source})"  # type: ignore[operator]
    if plan.fits:
        return Text.assemble(("fits", "bold green"), f": {have}")
    advice = "try train.gradient_checkpointing=true, a smaller batch or data.max_seq_len, or --bits 4"
    return Text.assemble(("does not fit", "bold red"), f": {have}; {advice}")
