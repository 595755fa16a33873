"""Relative paths in a job resolve inside the server's allowed folders, and the job keeps the path that was checked."""

from __future__ import annotations

import json

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
