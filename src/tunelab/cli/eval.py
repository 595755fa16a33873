"""`tunelab eval RUN_ID`: did the fine-tune get better?  Scores the run and its base on held-out examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from tunelab.cli.console import console, err_console
from tunelab.cli.export_report import fail_on_drops, print_table
from tunelab.errors import ConfigError

_DEFAULT = "exact_match,contains,bleu,rouge_l"


def eval_run(
    run: str | None = typer.Argument(None, help="Run id (or a unique prefix of one)."),
    model: str | None = typer.Option(
        None, "--model", help="Instead of a run: a model folder or hub id (needs --data)."
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="With --model: a PEFT adapter folder to apply."),
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
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, help="Prompts answered at once (same answers as one at a time, sooner)."
    ),
    backend: str | None = typer.Option(None, help="auto | torch | mlx (default: the run's, or auto)."),
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="Also have an LLM grade each answer 0-10 against the reference: an OpenAI-compatible URL "
        "(tunelab serve, Ollama, llama.cpp's server); its key, if any, from TUNELAB_JUDGE_KEY. Off by default.",
    ),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="With --judge: the model that grades (default: the only one it serves)."
    ),
    harness: str | None = typer.Option(
        None,
        "--harness",
        help="Instead: lm-evaluation-harness tasks (comma-separated) from local task YAML, on the merged model; "
        "tunelab ships tunelab_basic_facts.",
    ),
    harness_path: list[Path] | None = typer.Option(
        None, "--harness-path", help="A folder of your own lm_eval task YAML (repeat for more)."
    ),
    exports: bool = typer.Option(
        False,
        "--exports",
        help="Instead: the same examples on each export of the run (hf, gguf, onnx, mlx, gguf-adapter, mlx-adapter), "
        "side by side.",
    ),
    max_drop: float | None = typer.Option(
        None,
        "--max-drop",
        min=0.0,
        help="With --exports: fail (exit 8) when an export's metric or greedy agreement "
        "falls more than this below the run's.",
    ),
    queue: bool = typer.Option(
        False, "--queue", help="Queue the eval as a job for `tunelab worker` instead of running it here."
    ),
    server: str | None = typer.Option(
        None, "--server", envvar="TUNELAB_SERVER", help="With --queue: a `tunelab serve` URL to queue it on."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Answer held-out prompts greedily with a run's model and its base; score both with the same metrics."""
    from tunelab import services

    if judge is not None and (queue or exports or harness is not None):
        raise ConfigError("--judge grades answers generated here: not with --queue, --exports or --harness")
    if model is not None or run is None:
        _model(run, model, adapter, data, metrics, limit, max_new_tokens, batch_size, backend, (judge, judge_model),
               as_json)  # fmt: skip
        return
    if queue:
        _queue(run, server, data, metrics, base, limit, max_new_tokens, as_json)
        return
    if exports:
        chosen = metrics if metrics != _DEFAULT else "exact_match"
        _exports(run, data, chosen, limit, max_new_tokens, max_drop, as_json)
        return
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
        batch_size=batch_size,
        backend=backend,
        judge=judge,
        judge_model=judge_model,
        on_stage=lambda text: err_console.print(Text(text)),
    )
    _show(report, f"run {report.run_id}", as_json)


def _queue(
    run: str, server: str | None, data: str | None, metrics: str, base: bool, limit: int | None, max_new: int,
    as_json: bool,
) -> None:  # fmt: skip
    from tunelab import services

    names = [m for m in metrics.split(",") if m.strip()]
    request: dict[str, Any] = {"data": data, "metrics": names, "base": base, "limit": limit, "max_new_tokens": max_new}
    if server:
        job = services.job_service(server).submit_eval(run, **request)
    else:
        job = services.submit_eval(run, **request)
    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
        return
    console.print(f"queued the eval of run {job['run_id']}; start a worker with `tunelab worker`; job {job['id']}")


def _model(
    run: str | None, model: str | None, adapter: str | None, data: str | None, metrics: str, limit: int | None,
    max_new: int, batch_size: int, backend: str | None, judge: tuple[str | None, str | None], as_json: bool,
) -> None:  # fmt: skip
    from tunelab import services

    if run is not None or model is None or data is None:
        raise ConfigError("give a run id (tunelab eval RUN_ID), or --model PATH [--adapter PATH] with --data FILE")
    report = services.eval_model(
        model, data=data, adapter=adapter, metrics=[m for m in metrics.split(",") if m.strip()], limit=limit,
        max_new_tokens=max_new, batch_size=batch_size, backend=backend, judge=judge[0], judge_model=judge[1],
        on_stage=lambda text: err_console.print(Text(text)),
    )  # fmt: skip
    _show(report, report.run_id, as_json)


def _show(report: Any, title: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{title} on {report.examples} examples")
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


def _exports(
    run: str, data: str | None, metrics: str, limit: int | None, max_new: int, max_drop: float | None, as_json: bool
) -> None:
    from tunelab import services

    result = services.export_table(
        run, data=data, metrics=[m for m in metrics.split(",") if m.strip()], limit=limit, max_new_tokens=max_new,
        max_drop=max_drop, on_stage=lambda text: err_console.print(Text(text)),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result)
    fail_on_drops(result)
