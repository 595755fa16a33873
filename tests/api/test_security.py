"""Hostile inputs: keys, uploads (names, sizes, multipart, content types), paths in configs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import UPLOAD_LIMIT_MB, Server
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/jabc"),
    ("POST", "/v1/jobs/jabc/cancel"),
    ("GET", "/v1/jobs/jabc/events"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/abc"),
    ("GET", "/v1/runs/abc/metrics"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
]


def _jsonl(n: int = 3) -> bytes:
    return (json.dumps(GOOD_ROW) + "\n").encode() * n


def test_every_route_but_health_needs_a_valid_key(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    revoked = server.env()
    import subprocess
    import sys

    made = subprocess.run(
        [sys.executable, "-m", "tunelab", "auth", "create-key", "--name", "temp"],
        env=revoked, capture_output=True, text=True, check=True,
    )  # fmt: skip
    temp_key = made.stdout.split()[-1]
    assert httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {temp_key}"}).status_code == 200
    subprocess.run([sys.executable, "-m", "tunelab", "auth", "revoke", "temp"], env=revoked, check=True)
    bad_headers = [
        {},
        {"Authorization": "Bearer tl_not-a-real-key"},
        {"Authorization": f"Basic {server.key}"},
        {"Authorization": f"Bearer {server.key}x"},
        {"Authorization": f"Bearer {temp_key}"},  # revoked
        {"Authorization": "Bearer " + "A" * 5000},
    ]
    for method, path in ROUTES:
        for headers in bad_headers:
            response = httpx.request(method, server.url + path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers.get("Authorization", "")[:30])
            assert response.headers.get("www-authenticate") == "Bearer"
    listed = subprocess.run(
        [sys.executable, "-m", "tunelab", "auth", "list", "--json"], env=revoked, capture_output=True, text=True
    )
    assert temp_key not in listed.stdout and server.key not in listed.stdout, "keys are never stored or shown again"


def test_websocket_needs_a_key(server: Server) -> None:
    ws_url = server.url.replace("http", "ws") + "/v1/runs/abc/events"
    for headers in ({}, {"Authorization": "Bearer tl_wrong"}):
        with pytest.raises(InvalidStatus) as caught, connect(ws_url, additional_headers=headers, open_timeout=10):
            pass
        assert caught.value.response.status_code == 403


def test_upload_never_uses_the_clients_name_as_a_path(api: httpx.Client, server: Server) -> None:
    for name in ("../../escape.jsonl", "/etc/cron.d/x.jsonl", "..\\..\\win.jsonl", "a/../../b.jsonl", "é\x00.jsonl"):
        response = api.post("/v1/datasets", files={"file": (name, _jsonl(), "application/octet-stream")})
        assert response.status_code == 201, response.text
        stored = Path(response.json()["path"])
        assert stored.parent == server.home / "datasets" and stored.suffix == ".jsonl"
        assert response.json()["splits"]["train"]["records"] == 3
    assert not list(server.home.parent.glob("**/escape.jsonl")) and not Path("/etc/cron.d/x.jsonl").exists()


def test_upload_rejects_wrong_types_bad_data_and_malformed_bodies(api: httpx.Client, server: Server) -> None:
    before = set(os.listdir(server.home / "datasets")) if (server.home / "datasets").exists() else set()
    partial = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\npartial'
    multipart_xx = {"content-type": "multipart/form-data; boundary=xx"}
    cases = [
        ({"files": {"file": ("run.sh", b"echo hi", "text/plain")}}, 422, "upload a .jsonl"),
        ({"files": {"file": ("bad.jsonl", b'{"messages": 3}\n', "application/json")}}, 422, ":1:"),
        ({"files": {"file": ("empty.jsonl", b"", "application/json")}}, 422, "empty"),
        ({"files": {"other": ("d.jsonl", _jsonl(), "application/json")}}, 422, "field named 'file'"),
        ({"json": {"file": "x"}}, 415, "multipart"),
        # Malformed or truncated multipart: a 4xx, never a stored file or a 500.
        ({"content": b"data", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
        ({"content": b"--xx\r\ngarbage", "headers": multipart_xx}, 422, ""),
        ({"content": partial, "headers": multipart_xx}, 422, ""),
    ]
    for kwargs, status, text in cases:
        response = api.post("/v1/datasets", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert text in response.text
    after = set(os.listdir(server.home / "datasets")) if (server.home / "datasets").exists() else set()
    assert after == before, "rejected uploads leave no files behind"


def test_oversize_bodies_get_413_with_or_without_content_length(api: httpx.Client, server: Server) -> None:
    big = _jsonl(int(UPLOAD_LIMIT_MB * 2**20 / len(_jsonl(1))) + 50)
    response = api.post("/v1/datasets", files={"file": ("big.jsonl", big, "application/json")})
    assert response.status_code == 413, response.text

    def chunks():  # no Content-Length: the limit must hold while streaming
        boundary = b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n'
        yield boundary
        for _ in range(100):
            yield big[:20_000]
        yield b"\r\n--b--\r\n"

    streamed = api.post("/v1/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413, streamed.text
    huge_json = api.post("/v1/jobs", content=b'{"config": {"x": "' + b"a" * (2 << 20) + b'"}}',
                         headers={"content-type": "application/json"})  # fmt: skip
    assert huge_json.status_code == 413
    # A Content-Length that is no number (httpx won't send one: use a raw socket).
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: -5\r\n\r\n{}".encode()
        )
        assert sock.recv(200).split(b" ")[1] in (b"400", b"413")
    assert not list((server.home / "datasets").glob("*")) or all(
        p.stat().st_size < UPLOAD_LIMIT_MB * 2**20 for p in (server.home / "datasets").iterdir()
    )


def test_config_paths_must_stay_inside_the_allowed_roots(api: httpx.Client, server: Server, tmp_path: Path) -> None:
    data = server.roots / "train.jsonl"
    data.write_bytes(_jsonl())
    (server.roots / "sneaky").symlink_to(tmp_path)  # a link inside the root pointing out of it
    model = str(server.roots / "model")
    cases = {
        "model.path": {"model": {"path": "/etc"}, "data": {"train": str(data)}},
        "data.train": {"model": {"path": model}, "data": {"train": f"{server.roots}/../../etc/passwd"}},
        "data.valid": {
            "model": {"path": model},
            "data": {"train": str(data), "valid": f"{server.roots}/sneaky/v.jsonl"},
        },
        "output_dir": {"model": {"path": model}, "data": {"train": str(data)}, "output_dir": "/tmp/elsewhere"},
    }
    for key, config in cases.items():
        response = api.post("/v1/jobs", json={"config": config, "kind": "validate"})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(key), response.text
    hub = api.post("/v1/jobs", json={"config": {"model": {"path": "org/model"}, "data": {"train": str(data)}}})
    assert hub.status_code == 422 and "model.path" in hub.text, "no hub downloads through the API"
    ok = api.post(
        "/v1/jobs", json={"config": {"model": {"path": model}, "data": {"train": str(data)}}, "kind": "validate"}
    )
    assert ok.status_code == 201 and ok.json()["status"] == "queued"
    api.post(f"/v1/jobs/{ok.json()['id']}/cancel")


def test_bad_configs_and_unknown_ids(api: httpx.Client, server: Server) -> None:
    bad = api.post("/v1/jobs", json={"config": {"model": {"path": "x"}, "data": {"train": "y"}, "train": {"lr": -1}}})
    assert bad.status_code == 422 and "train.lr" in bad.json()["detail"]
    typo = api.post("/v1/jobs", json={"config": {"modle": {}}})
    assert typo.status_code == 422 and "modle" in typo.json()["detail"]
    assert api.post("/v1/jobs", json={"config": {}, "extra": 1}).status_code == 422
    assert api.get("/v1/jobs/jdoesnotexist").status_code == 404
    assert api.get("/v1/runs/nope").status_code == 404
    assert api.get("/v1/runs", params={"status": "weird"}).status_code == 422
    chat = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    assert api.post("/v1/chat/completions", json=chat).status_code == 404


def test_cli_as_client_reports_bad_keys_and_dead_servers_without_tracebacks(server: Server) -> None:
    import subprocess
    import sys

    def jobs_list(url: str, key: str) -> subprocess.CompletedProcess:
        env = server.env(TUNELAB_API_KEY=key)
        cmd = [sys.executable, "-m", "tunelab", "jobs", "list", "--server", url]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    refused = jobs_list(server.url, "tl_wrong")
    assert refused.returncode != 0 and "refused the API key" in refused.stderr and "Traceback" not in refused.stderr
    dead = jobs_list("http://127.0.0.1:9", server.key)
    assert dead.returncode != 0 and "cannot reach" in dead.stderr and "Traceback" not in dead.stderr
    ok = jobs_list(server.url, server.key)
    assert ok.returncode == 0, ok.stderr
    bad_limit = subprocess.run(
        [sys.executable, "-m", "tunelab", "serve"], env=server.env(TUNELAB_UPLOAD_LIMIT_MB="lots"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad_limit.returncode == 2 and "TUNELAB_UPLOAD_LIMIT_MB" in bad_limit.stderr
