"""A job writes only into a folder of its own under the runs folder, and nothing at all before a worker runs it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from tests.api.conftest import Server


def _model_folder(root: Path) -> Path:
    """A folder that looks like a checkpoint (config.json + weights), as a user's model folder does."""
    folder = root / "my-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_a_job_may_not_write_into_an_allowed_input_folder(api: httpx.Client, server: Server) -> None:
    model = _model_folder(server.roots)
    data = server.roots / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n", encoding="utf-8")
    for output_dir in (model, data, server.roots / "new-folder"):
        config = {
            "model": {"path": str(model)},
            "data": {"train": str(data / "train.jsonl")},
            "output_dir": str(output_dir),
        }
        refused = api.post("/v1/jobs", json={"config": config})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith("output_dir must be inside"), refused.text
        assert not (output_dir / "config.yaml").exists()
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # untouched


def test_submitting_writes_nothing_and_the_run_folder_is_the_runs_own(api: httpx.Client, server: Server) -> None:
    model = _model_folder(server.roots)
    data = server.roots / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n", encoding="utf-8")
    out = server.home / "runs" / "mine"
    config = {"model": {"path": str(model)}, "data": {"train": str(data / "train.jsonl")}, "output_dir": str(out)}
    queued = api.post("/v1/jobs", json={"config": config})
    assert queued.status_code == 201, queued.text
    assert not out.exists()  # created by the worker that runs it, not at submit
    api.post(f"/v1/jobs/{queued.json()['id']}/cancel")
