"""An upload is offered as a dataset only once it is whole and valid, even when the server is killed mid-way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import start_server, stop_server


def _listed(home: Path) -> list[str]:
    """What the dashboard and `data.train` pickers offer: services.uploaded_datasets() in a fresh process."""
    env = {**os.environ, "TUNELAB_HOME": str(home)}
    env.pop("TUNELAB_DB_URL", None)
    code = "import json; from tunelab import services; print(json.dumps(services.uploaded_datasets()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_server_killed_mid_upload_leaves_nothing_offered_as_a_dataset(tmp_path: Path) -> None:
    srv, proc = start_server(tmp_path / "a", TUNELAB_UPLOAD_LIMIT_MB="200")
    body = "".join(
        json.dumps({"prompt": f"question {i} " * 20, "completion": " answer"}) + "\n" for i in range(150_000)
    )
    datasets = srv.home / "datasets"
    try:

        def upload() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
                httpx.post(
                    f"{srv.url}/v1/datasets",
                    files={"file": ("mine.jsonl", body.encode(), "application/jsonl")},
                    headers={"Authorization": f"Bearer {srv.key}"},
                    timeout=120,
                )

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        deadline = time.monotonic() + 120
        while not (datasets.is_dir() and any(p.is_file() for p in datasets.rglob("*"))):  # the upload lands
            assert time.monotonic() < deadline and sender.is_alive(), "the upload never reached the disk"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        sender.join(timeout=30)
    finally:
        if proc.poll() is None:
            stop_server(proc)

    assert _listed(srv.home) == []  # neither offered nor acceptable as data.train
    assert not [p for p in datasets.rglob("*") if p.is_file()]  # the dead writer's staged bytes are swept


@pytest.mark.slow
def test_a_whole_upload_is_offered_under_its_generated_name(tmp_path: Path) -> None:
    srv, proc = start_server(tmp_path / "b")
    try:
        rows = "".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(50))
        made = httpx.post(
            f"{srv.url}/v1/datasets",
            files={"file": ("mine.jsonl", rows.encode(), "application/jsonl")},
            headers={"Authorization": f"Bearer {srv.key}"},
            timeout=60,
        )
        assert made.status_code == 201, made.text
        assert _listed(srv.home) == [made.json()["path"]]
    finally:
        stop_server(proc)
