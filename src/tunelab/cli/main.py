"""Entry point: builds the Typer app and maps tunelab's errors to exit codes, once.

A user mistake prints what to change and exits non-zero; it never shows a
traceback.  Only unexpected exceptions (bugs) keep theirs.
"""

from __future__ import annotations

import sys

import click
import typer

from tunelab.cli import data as data_cmd
from tunelab.cli import runs as runs_cmd
from tunelab.cli import train as train_cmd
from tunelab.cli import use as use_cmd
from tunelab.cli.console import err_console
from tunelab.errors import TunelabError

app = typer.Typer(
    name="tunelab",
    help="Fine-tune open LLMs on your own data, locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train_cmd.train)
app.command("quickstart")(train_cmd.quickstart)
app.command("init")(use_cmd.init)
app.command("generate")(use_cmd.generate)
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(data_cmd.app, name="data")


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from tunelab import __version__

        typer.echo(__version__)
        raise typer.Exit()


def _quiet_libraries() -> None:
    """Keep the terminal for tunelab's own output: no weight-loading bars or deprecation chatter."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\.")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with tunelab's exit code for user errors."""
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
    except TunelabError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    if isinstance(code, int) and code:  # click returns typer.Exit codes instead of raising them here
        sys.exit(code)
