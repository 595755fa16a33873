"""`tunelab ui` serves the packaged app: the real command, on a free loopback port."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from tests.ui.browser import child, free_port, wait_http


def test_tunelab_ui_serves_the_dashboard(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TUNELAB_HOME": str(tmp_path / "home")}
    log = tmp_path / "ui.log"
    with child(["ui", "--port", str(port)], env, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert page.status_code == 200 and "<noscript>" in page.text  # Streamlit's single-page shell
    assert f"dashboard: http://127.0.0.1:{port}" in log.read_text()


def test_sigterm_to_tunelab_ui_stops_the_dashboard_too(tmp_path: Path) -> None:
    """A service manager's SIGTERM (or `kill PID`) reaches only the CLI process: Streamlit must go with it."""
    port = free_port()
    env = {**os.environ, "TUNELAB_HOME": str(tmp_path / "home")}
    log = tmp_path / "ui.log"
    with child(["ui", "--port", str(port)], env, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        proc.send_signal(signal.SIGTERM)  # the CLI alone, not its process group
        assert proc.wait(timeout=30) == 0, log.read_text()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _serving(port):
            time.sleep(0.2)
        assert not _serving(port), "Streamlit still serves the port after tunelab ui was stopped"


def _serving(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
    except httpx.HTTPError:
        return False
    return True
