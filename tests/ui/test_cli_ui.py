"""`tunelab ui` serves the packaged app: the real command, on a free loopback port."""

from __future__ import annotations

import os
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
