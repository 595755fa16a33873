"""`tunelab app` starts the dashboard, the service and a worker as one process tree, and Ctrl-C stops them all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from tests.conftest import cli_env, run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def role(proc: psutil.Process) -> str | None:
    """Which of the app's three a process is, from its command line."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return None
    if "streamlit" in line:
        return "dashboard"
    roles = {"tunelab serve": "service", "tunelab worker": "worker"}
    return next((name for word, name in roles.items() if word in line), None)


def test_app_runs_dashboard_service_and_worker_and_ctrl_c_stops_all(tmp_path: Path) -> None:
    ui_port, api_port = free_port(), free_port()
    log = tmp_path / "app.log"  # a file, not a pipe: the children write to it too, and a pipe nobody reads fills
    with log.open("wb") as out:
        app = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "app", "--port", str(ui_port), "--api-port", str(api_port)],
            env=cli_env(tmp_path / "home"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        up = {"service": False, "dashboard": False}
        while not all(up.values()) and time.monotonic() < deadline and app.poll() is None:
            up["service"] = answers(f"http://127.0.0.1:{api_port}/health")
            up["dashboard"] = answers(f"http://127.0.0.1:{ui_port}/_stcore/health")
            time.sleep(0.5)
        assert all(up.values()), f"up: {up}; exit code {app.poll()}\n{log.read_text()}"
        tree = psutil.Process(app.pid).children(recursive=True)
        roles = {role(proc): proc for proc in tree}
        assert {"service", "worker", "dashboard"} <= set(roles), [p.cmdline() for p in tree]
        assert roles["worker"].is_running() and roles["worker"].status() != psutil.STATUS_ZOMBIE
        app.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends (the children have their own sessions)
        app.wait(timeout=180)
    finally:
        if app.poll() is None:  # only when the test failed: never leave the app or its children serving a port
            tree = tree or psutil.Process(app.pid).children(recursive=True)
            app.kill()
            app.wait()
        for proc in tree:
            if proc.is_running():
                proc.kill()
    err = log.read_text()
    assert app.returncode == 0, err
    assert "Ctrl-C stops all three" in err and "Traceback" not in err
    assert tree and not [proc for proc in tree if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    assert not answers(f"http://127.0.0.1:{api_port}/health")


def test_app_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("app", "--port", str(port), "--api-port", str(free_port()), home=tmp_path / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--port" in result.stderr
