"""`tunelab init` (write a config to start from) and `tunelab generate` (try the result)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from tunelab.cli.console import console
from tunelab.errors import ConfigError
from tunelab.vocab import METHODS


def init(
    out: Path = typer.Option(Path("tunelab.yaml"), "--out", "-o", help="Where to write the config."),
    model: str | None = typer.Option(None, help="Base model: local folder or hub id."),
    data: str | None = typer.Option(None, help="Training data file or folder."),
    method: str | None = typer.Option(None, help=" | ".join(METHODS)),
    steps: int | None = typer.Option(None, help="Optimizer steps (leave empty for one epoch)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Don't ask; use the options and defaults."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
) -> None:
    """Ask a few questions and write a commented config to start from."""
    from tunelab.config.load import load_config
    from tunelab.config.starter import check_starter_paths, render_starter

    if out.exists() and not force:
        raise ConfigError(f"{out} already exists", hint="pass --force to overwrite it, or --out another.yaml")
    interactive = not yes and sys.stdin.isatty()
    if interactive:
        model, data, method, steps = _ask(model, data, method, steps)
    if not model or not data:
        raise ConfigError("init needs --model and --data (or answer the questions in a terminal)")
    check_starter_paths(model=model, data=data)
    text = render_starter(model=model, data=data, method=method or "lora", steps=steps)
    load_config(_parse(text))  # the starter must itself be valid
    text = _schema_line() + text
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}; start training with: tunelab train {out}")


def _schema_line() -> str:
    """Point editors at the config's JSON Schema (rewritten by each init, so it matches this tunelab)."""
    from tunelab.config.editor import SCHEMA_FILE, schema_comment, write_schema
    from tunelab.settings import get_settings

    return schema_comment(write_schema(get_settings().home / SCHEMA_FILE))


def _ask(model: str | None, data: str | None, method: str | None, steps: int | None) -> tuple[Any, Any, Any, Any]:
    """The questions for what the options left out; paths are checked as they are typed."""
    import questionary

    from tunelab.config.starter import path_problem

    def check(what: str) -> Any:
        return lambda text: path_problem(text, what) or True  # questionary shows a string as the problem

    model = (
        model
        or questionary.text(
            "Base model (folder or hub id):", default="Qwen/Qwen2.5-0.5B-Instruct", validate=check("model")
        ).ask()
    )
    data = data or questionary.text("Training data (file or folder):", default="data/", validate=check("data")).ask()
    method = method or questionary.select("Method:", choices=list(METHODS), default="lora").ask()
    if steps is None:
        answer = questionary.text("Steps (empty = one epoch):", default="").ask()
        steps = int(answer) if answer and answer.strip().isdigit() else None
    return model, data, method, steps


def _parse(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user message for chat-trained runs)."),
    run: str | None = typer.Option(None, "--run", help="Use the result of this run."),
    model: str | None = typer.Option(None, help="Base model folder or hub id (instead of --run)."),
    adapter: str | None = typer.Option(None, help="PEFT adapter folder to apply to --model."),
    system: str | None = typer.Option(None, help="System prompt before the prompt (chat models)."),
    max_new_tokens: int = typer.Option(128, min=1, help="How many tokens at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: auto)."),
    backend: str | None = typer.Option(None, help="auto | torch | mlx (default: the run's, or auto)."),
) -> None:
    """Stream a completion from a run's model, or from a base model with an adapter (`tunelab chat` for more turns)."""
    from tunelab import services

    if not run and not model:
        raise ConfigError("give --run RUN_ID, or --model PATH (optionally with --adapter PATH)")
    session = services.open_chat(run=run, model=model, adapter=adapter, system=system, backend=backend, chat=chat)
    sampling = services.Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for piece in session.send(prompt, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
