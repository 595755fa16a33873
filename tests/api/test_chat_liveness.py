"""A chat client that leaves mid-stream, or many clients at once, never take the rest of the server down with them.

A real `tunelab serve` serves a run trained on the spot (one step: its answers to "hi" run to thousands of
tokens, so a generation outlives the client that asked for it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from tests.api.conftest import Server, start_server, stop_server
from tests.conftest import run_cli
from tests.integration.conftest import base_config

pytestmark = pytest.mark.slow

WAIT_S = 5  # TUNELAB_CHAT_WAIT_S: how long a chat may wait for the model before a 503
PENDING = 48  # more chats at once than the server's shared thread pool has threads (40)
LONG = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096, "stream": True}
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
# The chats queued behind the left stream: long enough that 48 of them take seconds one after another, so at
# least 20 are still waiting when /health is checked even on a quiet machine (8 tokens each drained in < 1 s).
QUEUED = {**SHORT, "max_tokens": 64}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path
) -> Iterator[tuple[Server, subprocess.Popen, str]]:
    root = tmp_path_factory.mktemp("chat-server")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(e2e_model, chat_data, root / "run", steps=1)), encoding="utf-8")
    trained = run_cli("train", str(cfg), home=root / "home")
    assert trained.returncode == 0, trained.stderr
    srv, proc = start_server(root, TUNELAB_CHAT_WAIT_S=str(WAIT_S))
    models = httpx.get(f"{srv.url}/v1/models", headers=_auth(srv), timeout=30).json()["data"]
    try:
        yield srv, proc, models[0]["id"]
    finally:
        if proc.poll() is None:
            stop_server(proc)


def _auth(srv: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.key}"}


def _leave_a_long_stream(srv: Server, model: str, chunks: int = 5) -> None:
    """Start a streaming answer of up to 4,096 tokens, read a few chunks, and hang up."""
    with _stream(srv, model) as response:
        assert response.status_code == 200, response.read()
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == chunks:
                return


def _stream(srv: Server, model: str) -> contextlib.AbstractContextManager[httpx.Response]:
    body = {**LONG, "model": model}
    return httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=_auth(srv), timeout=60)


def _answers_fast(srv: Server) -> None:
    """The routes that never generate answer while generation is busy or wedged (the issue's bound: 1 s)."""
    assert httpx.get(f"{srv.url}/health", timeout=1).status_code == 200
    for path in ("/v1/runs", "/v1/jobs"):
        assert httpx.get(srv.url + path, headers=_auth(srv), timeout=5).status_code == 200


def test_a_client_leaving_a_stream_wedges_nothing_and_pending_chats_starve_no_route(
    served: tuple[Server, subprocess.Popen, str],
) -> None:
    srv, _, model = served
    _leave_a_long_stream(srv, model)
    _answers_fast(srv)

    statuses: list[httpx.Response | httpx.HTTPError] = []

    def chat() -> None:
        try:
            statuses.append(httpx.post(f"{srv.url}/v1/chat/completions", json={**QUEUED, "model": model},
                                       headers=_auth(srv), timeout=120))  # fmt: skip
        except httpx.HTTPError as exc:  # reported by the assertions below, not as a thread's traceback
            statuses.append(exc)

    senders = [threading.Thread(target=chat, daemon=True) for _ in range(PENDING)]
    for sender in senders:
        sender.start()
    time.sleep(1.0)  # every request has arrived; most are waiting for the model
    _answers_fast(srv)
    assert sum(s.is_alive() for s in senders) >= 20, "the check above ran while at least 20 chats were pending"
    for sender in senders:
        sender.join(timeout=120)
    assert len(statuses) == PENDING and all(isinstance(r, httpx.Response) for r in statuses), statuses
    assert {r.status_code for r in statuses} <= {200, 503}, {r.status_code: r.text for r in statuses}
    assert any(r.status_code == 200 for r in statuses), "the stream that was left does not keep the model"
    for busy in (r for r in statuses if r.status_code == 503):
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["detail"]
    _answers_fast(srv)
    again = httpx.post(f"{srv.url}/v1/chat/completions", json={**SHORT, "model": model}, headers=_auth(srv), timeout=60)
    assert again.status_code == 200, again.text


def test_a_chat_waits_for_a_busy_model_a_bounded_time_then_gets_503(
    served: tuple[Server, subprocess.Popen, str],
) -> None:
    srv, _, model = served
    with _stream(srv, model) as live:
        assert live.status_code == 200
        lines = live.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")  # generating, and the client is still there: the model is busy
        busy = httpx.post(srv.url + "/v1/chat/completions", json={**SHORT, "model": model},
                          headers=_auth(srv), timeout=60)  # fmt: skip
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"].isdigit() and "busy" in busy.json()["detail"]
    after = httpx.post(f"{srv.url}/v1/chat/completions", json={**SHORT, "model": model}, headers=_auth(srv), timeout=60)
    assert after.status_code == 200, "the stream's generation stopped with its client"


def test_the_server_stops_promptly_on_sigterm_and_logged_no_tracebacks(
    served: tuple[Server, subprocess.Popen, str],
) -> None:
    srv, proc, model = served
    _leave_a_long_stream(srv, model)
    with _stream(srv, model) as live:  # and one client still connected, not reading, when SIGTERM comes
        assert next(live.iter_lines()).startswith("data: ")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)  # uvicorn's graceful shutdown would wait for the stream's client for ever
        except subprocess.TimeoutExpired:
            pytest.fail("tunelab serve was still running 15 s after SIGTERM")
    log = srv.log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log, log[-3000:]
