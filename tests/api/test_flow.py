"""A job submitted over HTTP runs on a real worker; events stream over the WebSocket; chat serves its adapter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import Server
from tests.conftest import run_cli
from tests.integration.conftest import base_config
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def _collect(url: str, key: str, out: list[dict[str, Any]]) -> None:
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=30) as ws:
        for message in ws:  # ends when the server closes after the run's last event
            out.append(json.loads(message))


def _tunelab(server: Server, *args: str) -> subprocess.CompletedProcess:
    env = server.env(TUNELAB_API_KEY=server.key, TUNELAB_HOME=str(server.home.parent / "client-home"))
    return run_cli(*args, env=env)


def test_http_job_runs_on_worker_with_live_events_and_chat(
    api: httpx.Client, server: Server, e2e_model: Path, chat_data: Path
) -> None:
    model, data = server.roots / "model", server.roots / "data"
    shutil.copytree(e2e_model, model)
    shutil.copytree(chat_data, data)
    config = base_config(model, data, server.home / "runs" / "flow", steps=12, save_every=4, log_every=2)
    created = api.post("/v1/jobs", json={"config": config})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued" and job["run_id"]
    ws_url = f"{server.url.replace('http', 'ws')}/v1/runs/{job['run_id']}/events"
    live: list[dict[str, Any]] = []
    listener = threading.Thread(target=_collect, args=(ws_url, server.key, live))
    listener.start()

    worker = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "worker", "--max-jobs", "1", "--heartbeat", "0.5", "--stale-after", "5"],
        env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    listener.join(timeout=60)
    assert not listener.is_alive(), "the WebSocket closes by itself once the run has ended"
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed", out
    # The worker's log holds tunelab's lines, not its libraries' deprecation notices (issue 22 item 21).
    assert b"Warning" not in out, out.decode(errors="replace")[-3000:]

    statuses = [e["status"] for e in live if e["type"] == "status"]
    assert statuses == ["queued", "running", "completed"]
    metric_steps = [e["step"] for e in live if e["type"] == "metric" and "train_loss" in e]
    assert metric_steps == [2, 4, 6, 8, 10, 12]
    assert any(e["type"] == "log" for e in live)
    late: list[dict[str, Any]] = []
    _collect(ws_url, server.key, late)
    assert [e["id"] for e in late] == [e["id"] for e in live], "a late subscriber gets everything it missed"

    run = api.get(f"/v1/runs/{job['run_id']}").json()
    shown = subprocess.run(
        [sys.executable, "-m", "tunelab", "runs", "show", job["run_id"], "--json"],
        env=server.env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert run == json.loads(shown.stdout)
    metrics = api.get(f"/v1/runs/{job['run_id']}/metrics").json()
    assert {(m["step"], m["name"]) for m in metrics} >= {(12, "train_loss"), (12, "val_loss")}
    models = api.get("/v1/models").json()
    assert f"run:{job['run_id']}" in [m["id"] for m in models["data"]]

    _check_chat(api, f"run:{job['run_id']}")
    listed = _tunelab(server, "jobs", "list", "--server", server.url, "--json")
    assert job["id"] in [j["id"] for j in json.loads(listed.stdout)], listed.stderr
    logs = _tunelab(server, "jobs", "logs", job["id"][:6], "--follow", "--server", server.url)
    assert logs.stdout.splitlines()[-1].endswith("status completed"), logs.stderr


def _check_chat(api: httpx.Client, model: str) -> None:
    request = {"model": model, "messages": [{"role": "user", "content": "List: tea, jam"}], "max_tokens": 12}
    whole = api.post("/v1/chat/completions", json=request)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    text = body["choices"][0]["message"]["content"]
    chunks = []
    with api.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed)
    assert streamed == text, "greedy streaming yields the same text as the whole answer"
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_run_trained_from_the_cli_replays_its_events_over_the_websocket(
    server: Server, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    config = base_config(e2e_model, chat_data, tmp_path / "out", steps=6, save_every=3, log_every=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    trained = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path)],
        env=server.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    runs = subprocess.run(
        [sys.executable, "-m", "tunelab", "runs", "list", "--json"],
        env=server.env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    run_id = next(r["id"] for r in json.loads(runs.stdout) if r["output_dir"] == str(tmp_path / "out"))

    replayed: list[dict[str, Any]] = []
    _collect(f"{server.url.replace('http', 'ws')}/v1/runs/{run_id}/events", server.key, replayed)
    assert [e["status"] for e in replayed if e["type"] == "status"] == ["running", "completed"]
    assert [e["step"] for e in replayed if e["type"] == "metric" and "train_loss" in e] == [2, 4, 6]
    logs = [e["text"] for e in replayed if e["type"] == "log"]
    assert "checkpoint saved at step 3" in logs and any("tokenization cache" in text for text in logs)
