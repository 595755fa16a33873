"""`tunelab chat`: talk to a run's model (or a base model plus an adapter), one streamed answer per line.

Reads one message per line from stdin, so it works in a terminal and with input piped in
(`printf 'hi\\n/exit\\n' | tunelab chat RUN`); piped input is echoed after the prompt so the
transcript reads like a session.  Lines starting with ``/`` are commands, not messages.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.text import Text

from tunelab.cli.console import console
from tunelab.errors import ConfigError, TunelabError

COMMANDS = "/system TEXT (set the system prompt; /system alone clears it), /reset (forget the turns), /exit"


def chat(
    run: str | None = typer.Argument(None, help="Run id (or a unique prefix) whose result to chat with."),
    model: str | None = typer.Option(None, help="Base model folder or hub id (instead of a run)."),
    adapter: str | None = typer.Option(None, help="PEFT adapter folder to apply to --model."),
    system: str | None = typer.Option(None, help="System prompt to start with (/system changes it)."),
    max_new_tokens: int = typer.Option(256, min=1, help="How many tokens at most per answer."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    backend: str | None = typer.Option(None, help="auto | torch | mlx (default: the run's, or auto)."),
) -> None:
    """Chat with a run's model: answers stream as they are generated, and the conversation is kept."""
    from tunelab import services

    if run and model:
        raise ConfigError("give a run id or --model, not both")
    session = services.open_chat(run=run, model=model, adapter=adapter, system=system, backend=backend)
    sampling = services.Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    console.print(Text(f"chatting with {session.label}; {COMMANDS}", style="dim"))
    if not session.keeps_history:
        console.print(Text("no chat template: each message is a fresh prompt, without history", style="yellow"))
    while (line := _read_line()) is not None:
        if line.startswith("/"):
            try:
                if not _command(session, line):
                    break
            except TunelabError as exc:  # e.g. /system on a model without a template: say so, keep chatting
                console.print(Text.assemble(("error: ", "bold red"), exc.message))
            continue
        if line.strip():
            _answer(session, line, sampling)


def _read_line() -> str | None:
    """The next message, or None at end of input or Ctrl-C/Ctrl-D at the prompt."""
    piped = not sys.stdin.isatty()
    try:
        line = input("you> ")
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
        return None
    if piped:
        sys.stdout.write(line + "\n")
    return line.rstrip("\r\n")


def _command(session: Any, line: str) -> bool:
    """Apply one slash command; False when the user asked to leave."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        forgotten = session.reset()
        console.print(
            Text(f"history cleared ({forgotten} exchange{'s' if forgotten != 1 else ''} forgotten)", style="dim")
        )
    elif name == "/system":
        session.set_system(rest.strip() or None)
        console.print(Text(f"system prompt: {session.system}" if session.system else "no system prompt", style="dim"))
    else:
        console.print(Text(f"unknown command {name}; commands: {COMMANDS}", style="yellow"))
    return True


def _answer(session: Any, text: str, sampling: Any) -> None:
    """Stream one answer; Ctrl-C stops it (the unfinished turn is not kept) and returns to the prompt."""
    sys.stdout.write("model> ")
    try:
        for piece in session.send(text, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
