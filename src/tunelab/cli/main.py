"""Entry point: builds the Typer app and maps tunelab's errors to exit codes, once.

A user mistake prints what to change and exits non-zero; it never shows a
traceback.  Only unexpected exceptions (bugs) keep theirs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any

import typer
from rich.text import Text

from tunelab.cli import app as app_cmd
from tunelab.cli import auth as auth_cmd
from tunelab.cli import chat as chat_cmd
from tunelab.cli import config as config_cmd
from tunelab.cli import convert as convert_cmd
from tunelab.cli import data as data_cmd
from tunelab.cli import doctor as doctor_cmd
from tunelab.cli import estimate as estimate_cmd
from tunelab.cli import eval as eval_cmd
from tunelab.cli import export as export_cmd
from tunelab.cli import jobs as jobs_cmd
from tunelab.cli import runs as runs_cmd
from tunelab.cli import serve as serve_cmd
from tunelab.cli import sweep as sweep_cmd
from tunelab.cli import train as train_cmd
from tunelab.cli import ui as ui_cmd
from tunelab.cli import use as use_cmd
from tunelab.cli.console import err_console
from tunelab.errors import TunelabError
from tunelab.settings import quiet_libraries

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
app.command("chat")(chat_cmd.chat)
app.command("doctor")(doctor_cmd.doctor)
app.command("convert")(convert_cmd.convert)
app.command("estimate")(estimate_cmd.estimate)
app.command("export")(export_cmd.export)
app.command("eval")(eval_cmd.eval_run)
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(data_cmd.app, name="data")
app.add_typer(config_cmd.app, name="config")
app.command("serve")(serve_cmd.serve)
app.command("worker")(serve_cmd.worker)
app.add_typer(jobs_cmd.app, name="jobs")
app.command("sweep")(sweep_cmd.sweep)
app.add_typer(auth_cmd.app, name="auth")
app.command("ui")(ui_cmd.ui)
app.command("app")(app_cmd.app)


def _print_version(value: bool) -> None:
    if value:
        from tunelab import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Fine-tune open LLMs on your own data, locally."""


def _flags_take_no_value(command: Any) -> None:
    """Show on/off flags without a value placeholder in every help screen (Typer labels them ``<bool>``)."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    made_help = command.get_help_option  # --help itself is made on first use, so label it then

    def help_option(ctx: Any) -> Any:
        option = made_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _flags_take_no_value(sub)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with tunelab's exit code for user errors.

    Typer handles its own usage errors (and exit codes) in standalone mode; only
    tunelab's errors pass through it and are printed here, as plain text: a
    path such as ``data[v2]/x.jsonl`` must not be read as Rich markup.
    """
    quiet_libraries()
    command = typer.main.get_command(app)
    _flags_take_no_value(command)
    try:
        try:
            command(args=argv, prog_name="tunelab")
        except TunelabError as exc:
            err_console.print(Text.assemble(("error: ", "bold red"), exc.message))
            if exc.hint:
                err_console.print(Text.assemble(("hint: ", "yellow"), exc.hint))
            sys.exit(exc.exit_code)
    except SystemExit as done:
        if argv is None:  # the process's own command line: this is its entry point (in-process callers pass argv)
            _exit_now(done.code)
        raise


def _exit_now(code: object) -> None:
    """End the process as Python's own exit would, minus the interpreter's teardown.

    With torch, transformers and PEFT loaded, that teardown (freeing every module, then the
    garbage collector over all that remains) takes about a second and does nothing anyone
    sees: tunelab's files are closed and its registry transactions committed by then.  So,
    in the order Python uses, the atexit handlers run (logging's flush, TensorBoard's,
    weakref finalizers, a caller's hooks), the standard streams are flushed, and the
    process exits with the same code.  Python's path is kept when another non-daemon
    thread is still running (Python waits for it), when the code is not a number, and
    under a profiler, tracer or debugger (``python -m cProfile -m tunelab ...`` writes
    its profile after the program returns).
    """
    if code is not None and not isinstance(code, int):
        return  # a message: Python prints it
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: Python gives up on it too
            stream.flush()
    os._exit(code or 0)
