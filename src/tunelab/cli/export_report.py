"""The export regression table as the terminal shows it: `tunelab eval --exports` and `tunelab export --eval`."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console, err_console


def print_table(result: Any) -> None:
    """One row per model (the run first, as the reference): its metrics, greedy agreement and perplexity ratio."""
    table = Table(title=f"run {result.run_id} and its exports on {result.examples} examples")
    for column in ("model", *result.metrics, "greedy agreement", "perplexity ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result.rows:
        scores = [f"{row['scores'][m]:.4g}" for m in result.metrics]
        table.add_row(row["target"], *scores, f"{row['agreement']:.0%}", f"{row['perplexity_ratio']:.6f}")
    console.print(table)


def fail_on_drops(result: Any, *, unrecorded: str | None = None) -> None:
    """Name each drop past --max-drop and exit 8, as a failed export verification does."""
    if not result.failures:
        return
    for failure in result.failures:
        err_console.print(Text(f"error: {failure}"))
    if unrecorded:
        err_console.print(Text(f"  the export in {unrecorded} is kept for inspection but not recorded on the run"))
    raise typer.Exit(8)
