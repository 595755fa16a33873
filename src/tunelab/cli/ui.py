"""`tunelab ui`: start the Streamlit dashboard on this machine."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from tunelab.cli.console import err_console
from tunelab.errors import ConfigError


def streamlit_command(host: str, port: int) -> list[str]:
    """The `streamlit run` command line for the packaged app, headless and without usage statistics."""
    app = Path(__file__).resolve().parent.parent / "ui" / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this dashboard is local
    ]  # fmt: skip


def ui(
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the dashboard to your network."),
    port: int = typer.Option(8501, min=1, max=65535, help="TCP port."),
) -> None:
    """Open the dashboard: runs and live charts, new fine-tunes, datasets, models, playground, system."""
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        raise ConfigError("the dashboard needs the ui extra", hint="pip install 'tunelab[ui]'")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]dashboard on {host}: it has no login, so anyone who can reach it can train[/]")
    err_console.print(f"dashboard: http://{host}:{port}  (Ctrl-C stops it)")
    # The child reads the same TUNELAB_HOME / TUNELAB_DB_URL, so it sees the CLI's registry.
    code = _serve(streamlit_command(host, port))
    if code:
        raise typer.Exit(code)


def _serve(command: list[str]) -> int:
    """Run Streamlit until it exits; Ctrl-C or SIGTERM here stops it too (never leaves it serving the port).

    A signal sent to this process alone (a service manager's SIGTERM, ``kill PID``) would otherwise end
    only the CLI and orphan the server: the handlers pass it on and wait for the child to go.
    """
    proc = subprocess.Popen(command, env=os.environ.copy())

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception in the wait: don't leave it behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else code
