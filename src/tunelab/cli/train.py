"""`tunelab train` and `tunelab quickstart`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from tunelab.cli.console import console, err_console
from tunelab.cli.progress import LiveView
from tunelab.errors import ConfigError
from tunelab.services import BaseCallback


class StopSwitch(BaseCallback):
    """Ctrl-C/SIGTERM for one run; called, it answers the loop's "should I stop?".

    Before the loop starts there is nothing to checkpoint, and loading a model or
    tokenizing can take minutes, so a stop then ends the process at once (the run
    is marked cancelled).  Once training, the first stop asks the loop to
    checkpoint and stop after this step; a second one aborts at once.
    """

    every_rank = True  # each rank must know when its own loop started, or a stop then kills it alone

    def __init__(self) -> None:
        self.requested = False
        self.training = False

    def __call__(self) -> bool:
        return self.requested

    def on_start(self, *, step: int, total_steps: int) -> None:
        self.training = True

    def handle(self, signum: int, frame: Any) -> None:
        if not self.training:
            err_console.print("[yellow]stopped before training started; the run is marked cancelled[/]")
            raise KeyboardInterrupt
        if self.requested:
            err_console.print("[yellow]aborting without a checkpoint[/]")
            raise KeyboardInterrupt
        self.requested = True
        err_console.print("[yellow]stopping after this step and saving a checkpoint (Ctrl-C again to abort)[/]")


@contextmanager
def graceful_stop() -> Iterator[StopSwitch]:
    """Install a :class:`StopSwitch` on SIGINT and SIGTERM for the block (pass it as a callback too)."""
    switch = StopSwitch()
    previous = {sig: signal.signal(sig, switch.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield switch
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(
    config: Path | None = typer.Argument(None, help="YAML config (see `tunelab init` and examples/)."),
    overrides: list[str] | None = typer.Argument(None, help="Overrides such as train.lr=1e-4 method.rank=16."),
    resume: str | None = typer.Option(None, "--resume", help="Continue the run with this id from its checkpoint."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Data-parallel processes here (torchrun; mlx.launch with backend: mlx); batch_size is per process.",
    ),
) -> None:
    """Fine-tune a model as the config says (or resume a run after a crash or Ctrl-C)."""
    from tunelab import services
    from tunelab.config.load import load_config

    if resume and (config is not None or overrides):
        raise ConfigError("--resume takes the run's stored config; don't pass a config or overrides")
    if not resume and config is None:
        raise ConfigError("give a config file (tunelab train CONFIG) or --resume RUN_ID")
    if nproc != 1:
        code = services.launch_run(nproc, config, overrides or [], resume)
        if code != 0:
            raise typer.Exit(code)
        return
    main = services.is_main_process()  # under torchrun only rank 0 shows progress
    views: list[BaseCallback] = [LiveView()] if main else []
    try:
        with graceful_stop() as stop:
            if resume:
                outcome = services.resume_run(
                    resume, callbacks=[*views, stop], should_stop=stop, on_recorded=_announce if main else None
                )
            else:
                assert config is not None  # checked above
                cfg = load_config(config, overrides or [])
                outcome = services.start_run(
                    cfg, callbacks=[*views, stop], should_stop=stop, on_recorded=_announce if main else None
                )
    except KeyboardInterrupt:  # a stop before training started, or a second Ctrl-C: the run is marked cancelled
        raise typer.Exit(130) from None
    if main:
        _report(outcome)


def _announce(run_id: str, output_dir: Path) -> None:
    """The run's id first, before loading and tokenizing, so it can be followed or resumed from the start."""
    # One line, never wrapped by Rich: the id and the command to see it stay together for copying.
    console.print(f"run [bold]{run_id}[/] → {output_dir}  (tunelab runs show {run_id})", soft_wrap=True)


def _report(outcome: Any) -> None:
    if outcome.status == "completed":
        metrics = outcome.metrics
        named = [(k, metrics.get(k)) for k in ("val_loss", "train_loss") if metrics.get(k) is not None]
        loss = f" ({named[0][0].replace('_', ' ')} {named[0][1]:.4f})" if named else ""
        console.print(f"[green]run {outcome.run_id} completed[/]{loss}")
        console.print(f"result: {outcome.result_dir}")
    else:
        console.print(
            f"[yellow]run {outcome.run_id} stopped[/]; continue with: tunelab train --resume {outcome.run_id}"
        )
        raise typer.Exit(130)


def quickstart(
    workdir: Path | None = typer.Option(None, help="Where to put the quickstart's data and runs."),
    steps: int = typer.Option(0, help="Override the number of training steps (0 = the built-in default)."),
    model: str = typer.Option(
        "auto",
        help="auto: SmolLM2-135M-Instruct where this machine can get it, else the tiny model; tiny: a tiny model "
        "built on the spot; or any model.path (a folder, a hub id, a .gguf file) to fine-tune instead.",
    ),
) -> None:
    """Fine-tune a real small model on a shipped task, and show it get better (held-out exact match)."""
    from rich.table import Table

    from tunelab import services

    console.print("[bold]tunelab quickstart[/]")
    result = services.run_quickstart(
        workdir=workdir,
        steps=steps or None,
        callbacks=[LiveView()],
        on_stage=lambda text: console.print(text),
        model=model,
    )
    table = Table("held-out prompt", "base model", "after LoRA fine-tune", show_lines=True)
    for sample in result.samples:
        table.add_row(sample.prompt, sample.before, sample.after)
    console.print(table)
    console.print(
        f"LoRA run [bold]{result.lora_run}[/]: train loss {result.loss_first:.2f} → {result.loss_last:.2f}, "
        f"validation loss {result.val_loss or float('nan'):.3f}"
    )
    if result.exact_match is not None:
        before, after = result.exact_match
        console.print(
            f"held-out exact match on {result.examples} orders: base [bold]{before:.0%}[/] → "
            f"fine-tuned [bold]{after:.0%}[/]"
        )
    console.print(f"adapter (PEFT format): {result.adapter}")
    console.print(f"next: tunelab runs show {result.lora_run}")
    console.print(f'      tunelab generate --run {result.lora_run} "{result.try_prompt}"')
