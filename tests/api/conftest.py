"""A real `tunelab serve` (uvicorn on 127.0.0.1, a free port) with its own home, and a key for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.integration.conftest import chat_data, e2e_model  # noqa: F401  (fixtures reused here)

UPLOAD_LIMIT_MB = 0.05  # ~51 KB: small enough to test oversize uploads cheaply


@dataclass(frozen=True)
class Server:
    url: str
    key: str
    home: Path
    roots: Path  # the extra folder TUNELAB_API_ROOTS allows
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TUNELAB_DB_URL"}
        return {**env, "TUNELAB_HOME": str(self.home), "TUNELAB_API_ROOTS": str(self.roots), **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(root: Path, log_level: str = "warning", **env: str) -> tuple[Server, subprocess.Popen]:
    """Start `tunelab serve` on a free loopback port with its home under ``root``; returns it and its process
    (in a session of its own: stop it with ``os.killpg``) once ``/health`` answers. ``info`` logs each request."""
    (root / "roots").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    srv = Server(f"http://127.0.0.1:{port}", "", root / "home", root / "roots", root / "serve.log")
    child_env = srv.env(**env)
    made = subprocess.run(
        [sys.executable, "-m", "tunelab", "auth", "create-key", "--name", "tests"],
        env=child_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--log-level", log_level]
    with srv.log.open("ab") as log:
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_healthy(srv.url, proc)
    return Server(srv.url, made.stdout.split()[-1], srv.home, srv.roots, srv.log), proc


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv, proc = start_server(tmp_path_factory.mktemp("server"), TUNELAB_UPLOAD_LIMIT_MB=str(UPLOAD_LIMIT_MB))
    try:
        yield srv
    finally:
        stop_server(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tunelab serve exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("tunelab serve did not become healthy")


@pytest.fixture
def api(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    """An authorised client; this process's registry is pointed at the server's, for checking side effects."""
    monkeypatch.setenv("TUNELAB_HOME", str(server.home))
    monkeypatch.setenv("TUNELAB_API_ROOTS", str(server.roots))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as client:
        yield client
