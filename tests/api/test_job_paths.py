"""Relative paths in a job resolve inside the server's allowed folders, and the job keeps the path that was checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from tests.api.conftest import Server


def test_a_relative_data_path_is_taken_inside_the_allowed_roots(api: httpx.Client, server: Server) -> None:
    (server.roots / "rel").mkdir(exist_ok=True)
    (server.roots / "rel" / "train.jsonl").write_text(json.dumps({"text": "hi"}) + "\n", encoding="utf-8")
    config = {"model": {"path": str(server.roots / "model")}, "data": {"train": "rel/train.jsonl"}}
    queued = api.post("/v1/jobs", json={"config": config, "kind": "validate"})
    assert queued.status_code == 201, queued.text
    # Not the server's working directory, nor the worker's: the file inside the root, by its absolute path.
    assert queued.json()["config"]["data"]["train"] == str(server.roots / "rel" / "train.jsonl")
    api.post(f"/v1/jobs/{queued.json()['id']}/cancel")

    escape = {"model": {"path": str(server.roots / "model")}, "data": {"train": "../../../etc/passwd"}}
    refused = api.post("/v1/jobs", json={"config": escape, "kind": "validate"})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("data.train"), refused.text


def test_a_file_swapped_for_a_link_after_submit_is_refused_when_the_worker_reads_it(
    api: httpx.Client, server: Server, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.jsonl"  # outside every allowed folder
    secret.write_text(json.dumps({"text": "the private key is 1234"}) + "\n", encoding="utf-8")
    data = server.roots / "swapped.jsonl"
    data.write_text(json.dumps({"text": "hi"}) + "\n", encoding="utf-8")
    config = {"model": {"path": str(server.roots / "model")}, "data": {"train": str(data)}}
    queued = api.post("/v1/jobs", json={"config": config, "kind": "validate"})
    assert queued.status_code == 201, queued.text
    data.unlink()
    data.symlink_to(secret)  # after the check, before any worker reads it

    worker = subprocess.run(
        [sys.executable, "-m", "tunelab", "worker", "--max-jobs", "1", "--poll", "0.2"],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    job = api.get(f"/v1/jobs/{queued.json()['id']}").json()
    assert job["status"] == "failed" and "data.train" in job["error"] and "outside" in job["error"], job
    events = api.get(f"/v1/jobs/{job['id']}/events").text
    assert "1234" not in events and "1234" not in job["error"]  # nothing of the file reaches the client


def test_the_quickstarts_own_model_and_data_may_be_used_over_the_api(api: httpx.Client, server: Server) -> None:
    # What `tunelab quickstart` leaves in the home: a newcomer's first API job trains on it without setting
    # TUNELAB_API_ROOTS (issue 22 item 17); the refusal for anything else lists that folder among the allowed.
    quick = server.home / "quickstart"
    (quick / "data").mkdir(parents=True, exist_ok=True)
    (quick / "data" / "train.jsonl").write_text(json.dumps({"text": "hi"}) + "\n", encoding="utf-8")
    config = {"model": {"path": str(quick / "model")}, "data": {"train": str(quick / "data" / "train.jsonl")}}
    queued = api.post("/v1/jobs", json={"config": config, "kind": "validate"})
    assert queued.status_code == 201, queued.text
    api.post(f"/v1/jobs/{queued.json()['id']}/cancel")

    outside = {"model": {"path": "/opt/elsewhere/model"}, "data": {"train": str(quick / "data" / "train.jsonl")}}
    refused = api.post("/v1/jobs", json={"config": outside, "kind": "validate"})
    assert refused.status_code == 422 and str(quick) in refused.json()["hint"], refused.text
