"""`tracking: [wandb, mlflow]`: W&B offline and a real `mlflow server` on loopback get what metrics.jsonl has.

A tracker that can't work (no server, no key) warns once and the run still completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.conftest import run_cli
from tests.integration.conftest import base_config

STEPS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server (SQLite store, served artifacts) on a loopback port."""
    port = _free_port()
    log = (tmp_path / "mlflow.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: " + (tmp_path / "mlflow.log").read_text()[-2000:])
        yield url
    finally:
        # The server's graceful shutdown took ~12 s of the test's time; the test has read all it needs by now.
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started in its group
        proc.wait(timeout=60)


def _train(tmp_path: Path, model: Path, data: Path, tracking: list[str], **env: str) -> tuple[Path, str]:
    out = tmp_path / "out"
    raw = base_config(model, data, out, steps=STEPS, batch_size=4, eval_every=2)
    raw["tracking"], raw["tensorboard"] = tracking, True
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = run_cli("train", tmp_path / "cfg.yaml", env={"COLUMNS": "200", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def _jsonl(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        by_step.setdefault(row.pop("step"), {}).update(row)
    return by_step


def _wandb_history(out: Path) -> dict[int, dict[str, float]]:
    """The offline run's history records, read from its .wandb log by W&B's own reader."""
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    shown = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    history: dict[int, dict[str, float]] = {}
    for line in shown.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            items = record["history"]["item"]
            history.setdefault(int(items["_step"]), {}).update({k: v for k, v in items.items() if k[0] != "_"})
    return history


@pytest.mark.slow
def test_wandb_offline_and_a_real_mlflow_server_get_every_metric(
    tmp_path: Path, e2e_model: Path, chat_data: Path, mlflow_server: str
) -> None:
    from mlflow.tracking import MlflowClient

    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": mlflow_server}
    out, stderr = _train(tmp_path, e2e_model, chat_data, ["tensorboard", "wandb", "mlflow"], **env)
    assert "tracking stopped" not in stderr and (out / "tensorboard").is_dir()
    expected = _jsonl(out)
    assert sorted(expected) == list(range(1, STEPS + 1)) and "val_loss" in expected[2]

    history = _wandb_history(out)
    for step, metrics in expected.items():
        for name, value in metrics.items():
            assert history[step][name] == pytest.approx(value, rel=1e-6), (step, name)

    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["method.rank"] == "4"
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.run_id"]
    for name in ("train_loss", "val_loss", "lr"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx({s: m[name] for s, m in expected.items() if name in m}, rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "adapter"} <= artifacts
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter


@pytest.mark.slow
def test_trackers_that_cannot_work_warn_once_and_training_goes_on(
    tmp_path: Path, e2e_model: Path, chat_data: Path
) -> None:
    env = {
        "WANDB_MODE": "online",
        "WANDB_API_KEY": "",
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
    }
    out, stderr = _train(tmp_path, e2e_model, chat_data, ["wandb", "mlflow"], **env)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    said = " ".join(stderr.split())
    assert said.count("warning: mlflow tracking stopped") == 1, stderr[-3000:]
    assert said.count("warning: wandb tracking stopped") == 1, stderr[-3000:]
    assert not (out / "tensorboard").exists()  # tracking without tensorboard turns it off
