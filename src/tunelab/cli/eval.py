"""`tunelab eval RUN_ID`: did the fine-tune get better?  Scores the run and its base on held-out examples."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console, err_console

_DEFAULT = "exact_match,contains,bleu,rouge_l"


def eval_run(
    run: str = typer.Argument(..., help="Run id (or a unique prefix of one)."),
    data: str | None = typer.Option(None, "--data", help="Held-out examples (default: the run's data.valid)."),
    metrics: str = typer.Option(
        _DEFAULT,
        "--metrics",
        help="Comma-separated: exact_match, exact_match_raw, contains, regex_match, json_valid, numeric, bleu, "
        "rouge_l, or your own module:function(prediction, reference, record) -> number.",
    ),
    base: bool = typer.Option(True, "--base/--no-base", help="Also score the base model on the same examples."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score only the first N examples."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest answer generated."),
    backend: str | None = typer.Option(None, help="auto | torch | mlx (default: the run's, or auto)."),
    harness: str | None = typer.Option(
        None,
        "--harness",
        help="Instead: lm-evaluation-harness tasks (comma-separated) from local task YAML, on the merged model; "
        "tunelab ships tunelab_basic_facts.",
    ),
    harness_path: list[Path] | None = typer.Option(
        None, "--harness-path", help="A folder of your own lm_eval task YAML (repeat for more)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Answer held-out prompts greedily with a run's model and its base; score both with the same metrics."""
    from tunelab import services

    if harness is not None:
        _harness(run, harness, harness_path or [], limit, as_json)
        return

    report = services.eval_run(
        run,
        data=data,
        metrics=[m for m in metrics.split(",") if m.strip()],
        base=base,
        limit=limit,
        max_new_tokens=max_new_tokens,
        backend=backend,
        on_stage=lambda text: err_console.print(Text(text)),
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"run {report.run_id} on {report.examples} examples")
    table.add_column("metric")
    if report.base_scores is not None:
        table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for name in report.metrics:
        cells = [name]
        if report.base_scores is not None:
            cells.append(f"{report.base_scores[name]:.4g}")
        cells.append(f"{report.scores[name]:.4g}")
        table.add_row(*cells)
    console.print(table)
    console.print(Text(f"answers: {report.examples_file}"))


def _harness(run: str, tasks: str, paths: list[Path], limit: int | None, as_json: bool) -> None:
    from tunelab import services

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    results = services.harness_run(
        run, names, task_dirs=paths, limit=limit, on_stage=lambda text: err_console.print(Text(text))
    )
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    table = Table(title=f"lm-evaluation-harness on run {run}")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, scores in results.items():
        for name, value in scores.items():
            table.add_row(task, name, f"{value:.4g}")
    console.print(table)
