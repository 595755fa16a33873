"""`tunelab app`: the dashboard, a local service and a worker in one process tree, as a desktop app would run.

The three are children of this process, each in its own session, so a terminal's Ctrl-C reaches this process
alone and it stops them in order: the worker first (it checkpoints a running job and puts it back in the
queue), then the service and the dashboard. A signal sent to this process (``kill PID``) does the same, and
when one child dies on its own the others are stopped too, so nothing is ever left serving a port.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import typer

from tunelab.cli.console import err_console
from tunelab.cli.ui import streamlit_command
from tunelab.errors import ConfigError

# A worker checkpoints its running job before it exits: give it the time a checkpoint of a big run takes.
STOP_GRACE_S = {"worker": 120.0, "service": 15.0, "dashboard": 15.0}


@dataclass
class Child:
    """One process of the app: what it is and its handle."""

    name: str
    proc: subprocess.Popen[bytes]


def app(
    host: str = typer.Option("127.0.0.1", help="Address the dashboard and the service bind; keep it on loopback."),
    port: int = typer.Option(8501, min=1, max=65535, help="The dashboard's TCP port."),
    api_port: int = typer.Option(8000, min=1, max=65535, help="The service's TCP port (REST API, docs at /docs)."),
) -> None:
    """Open the dashboard with a local service and worker in one process tree; Ctrl-C stops all three."""
    needed = ("streamlit", "plotly", "fastapi", "uvicorn")
    if any(importlib.util.find_spec(module) is None for module in needed):
        raise ConfigError("tunelab app needs the app extra (dashboard and service)", hint="pip install 'tunelab[app]'")
    if port == api_port:
        raise ConfigError(f"--port and --api-port are both {port}; give the dashboard and the service one each")
    for which, number in (("--port", port), ("--api-port", api_port)):
        if not _port_free(host, number):
            raise ConfigError(f"port {number} on {host} is in use", hint=f"pass a free one with {which}")
    me = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "tunelab"]
    commands = {
        "service": [*me, "serve", "--host", host, "--port", str(api_port), "--log-level", "warning"],
        "worker": [*me, "worker"],
        "dashboard": streamlit_command(host, port),
    }
    children = [Child(name, subprocess.Popen(cmd, start_new_session=True)) for name, cmd in commands.items()]
    err_console.print(
        f"dashboard: http://{host}:{port}  service: http://{host}:{api_port} (docs at /docs)  worker: running\n"
        "Ctrl-C stops all three",
        markup=False,
        highlight=False,
    )
    code = _supervise(children)
    if code:
        raise typer.Exit(code)


def _supervise(children: list[Child]) -> int:
    """Wait until a signal comes or a child exits; then stop every child and return the exit code."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    died: Child | None = None
    try:
        while not stopping and died is None:
            died = next((child for child in children if child.proc.poll() is not None), None)
            time.sleep(0.2)
    finally:
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if died is not None and not stopping:
        err_console.print(
            f"the {died.name} exited (code {died.proc.returncode}); the others were stopped", markup=False
        )
        return died.proc.returncode or 1
    return 0


def _stop_all(children: list[Child]) -> None:
    """Ask each child to stop (SIGINT: the worker checkpoints its job), in order, and wait; kill what stays."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGINT)
    for child in children:
        try:
            child.proc.wait(timeout=STOP_GRACE_S[child.name])
        except subprocess.TimeoutExpired:
            err_console.print(f"the {child.name} did not stop in time; killing it", markup=False)
            os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
