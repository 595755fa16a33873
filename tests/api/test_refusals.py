"""Hostile or odd input gets a 4xx (or a WebSocket close) that says what to change, never a 500 or a traceback;
keys stay out of the server's log, and each key's last use is recorded (issue 22 items 8, 9, 12, 17)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.api.conftest import Server, start_server, stop_server
from tests.conftest import run_cli
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server logging every request (``info``), with uploads up to 1 MiB."""
    server, proc = start_server(tmp_path_factory.mktemp("refusals"), log_level="info", TUNELAB_UPLOAD_LIMIT_MB="1")
    try:
        yield server
    finally:
        stop_server(proc)


@pytest.fixture
def client(srv: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    monkeypatch.setenv("TUNELAB_HOME", str(srv.home))  # this process reads the server's registry
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.key}"}, timeout=60) as c:
        yield c


def _job(client: httpx.Client, srv: Server, **paths: str) -> httpx.Response:
    data = srv.roots / "train.jsonl"
    data.write_text(json.dumps(GOOD_ROW) + "\n", encoding="utf-8")
    config: dict = {"model": {"path": str(srv.roots / "model")}, "data": {"train": str(data)}}
    for key, value in paths.items():
        section, _, name = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[name] = value
    return client.post("/v1/jobs", json={"config": config, "kind": "validate"})


def test_path_fields_no_file_system_can_hold_are_422_naming_the_key(client: httpx.Client, srv: Server) -> None:
    inside = str(srv.roots)
    for key in ("model.path", "data.train", "data.valid", "output_dir"):
        for value, says in ((f"{inside}/a\x00b", "NUL byte"), (f"{inside}/{'a' * 5000}", "255 bytes"),
                            ("a" * 5000, "255 bytes")):  # fmt: skip
            response = _job(client, srv, **{key: value})
            assert response.status_code == 422, (key, value[:40], response.text)
            detail = response.json()["detail"]
            assert detail.startswith(key) and says in detail, detail


def test_refusals_name_the_allowed_folders_and_give_api_advice(client: httpx.Client, srv: Server) -> None:
    outside = _job(client, srv, **{"model.path": "/etc"})
    assert outside.status_code == 422
    assert str(srv.roots) in outside.json()["hint"] and "TUNELAB_API_ROOTS" in outside.json()["hint"]
    bad_lr = client.post("/v1/jobs", json={"config": {"model": {"path": "m"}, "data": {"train": "d"},
                                                      "train": {"lr": -1}}})  # fmt: skip
    assert bad_lr.status_code == 422 and "train.lr" in bad_lr.json()["detail"]
    assert "override" not in bad_lr.text and '"config" object' in bad_lr.json()["hint"]
    unknown = client.get("/v1/runs/nope")
    assert unknown.status_code == 404 and "GET /v1/runs" in unknown.json()["detail"]
    assert "tunelab runs list" not in unknown.text


def test_bad_uploads_are_422_naming_the_users_file(client: httpx.Client, srv: Server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ("mine.jsonl", deep + "\n", "mine.jsonl:1: nested too deeply"),
        ("mine.json", deep, "mine.json: nested too deeply"),
        ("rows.jsonl", '{"text": ' + "[" * 3000 + "]" * 3000 + "}\n", "rows.jsonl:1: nested too deeply"),
        ("../dir/bad.jsonl", '{"text": \n', "bad.jsonl:1: not valid JSON"),
    ]
    for name, body, says in cases:
        response = client.post("/v1/datasets", files={"file": (name, body.encode(), "application/json")})
        assert response.status_code == 422, (name, response.text)
        # A JSONL file's bad lines come grouped (every one listed); the first is quoted whole in the hint.
        body = response.json()
        assert (body["detail"].startswith(says) or says in body["hint"]) and ".incoming" not in response.text, body
    wide = client.post("/v1/datasets", files={"file": ("wide.csv", b"text\n" + b"x" * 140_000 + b"\n", "text/csv")})
    assert wide.status_code == 201, wide.text  # a field over csv's own 131,072-character limit is just a record
    stored = wide.json()
    assert stored["splits"]["train"]["path"] == stored["path"], "the answer names the stored file, not the staged one"


def test_websocket_after_must_be_an_event_id_and_closes_naming_it(srv: Server) -> None:
    url = f"{srv.url.replace('http', 'ws')}/v1/runs/any"  # ``after`` is checked before the run is looked up
    for after in ("abc", str(2**70), "-1", "1e3"):
        code, reason = _close_of(f"{url}/events?after={after}", additional_headers=_bearer(srv))
        assert code == 4400 and reason.startswith("after:"), (after, code, reason)
    code, reason = _close_of(f"{url}/events", additional_headers=_bearer(srv))
    assert code == 4404 and "no run" in reason


def test_chunked_json_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield b'{"config": {"x": "'
        for _ in range(200):
            yield b"a" * 10_000
        yield b'"}}'

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["detail"]


def test_websocket_keys_never_reach_the_log_and_may_come_as_a_subprotocol(srv: Server) -> None:
    url = f"{srv.url.replace('http', 'ws')}/v1/runs/nope/events"
    by_query = _close_of(f"{url}?api_key={srv.key}")
    by_subprotocol = _close_of(url, subprotocols=["tunelab.bearer", srv.key])
    assert by_query[0] == by_subprotocol[0] == 4404, "the key was accepted (the run is what is missing)"
    httpx.get(f"{srv.url}/v1/jobs?api_key={srv.key}", headers=_bearer(srv), timeout=10)
    log = srv.log.read_text(encoding="utf-8", errors="replace")
    assert "api_key=[redacted]" in log and srv.key not in log


def test_last_use_of_a_key_is_recorded_once_a_minute(client: httpx.Client, srv: Server) -> None:
    made = _run_cli(srv, "auth", "create-key", "--name", "counted")
    key = made.split()[-1]
    assert _last_used(srv, "counted") is None
    for _ in range(3):
        assert httpx.get(f"{srv.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    first = _last_used(srv, "counted")
    assert first is not None
    httpx.get(f"{srv.url}/v1/runs", headers={"Authorization": f"Bearer {key}"})
    assert _last_used(srv, "counted") == first, "not rewritten on every request"


def test_job_events_carry_the_message_not_the_traceback(
    client: httpx.Client, srv: Server, capfd: pytest.CaptureFixture[str]
) -> None:
    from tunelab.jobs.child import _run  # the worker's child records a job's failure here

    job = _job(client, srv).json()

    def buggy(job_id: str, **_: object) -> str:
        raise RuntimeError("boom")

    _run(buggy, job["id"], None, lambda: False, record_errors=True)
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    errors = [e for e in events if e.get("level") == "error"]
    assert errors and errors[0]["text"].startswith("RuntimeError: boom"), events
    assert "Traceback" not in json.dumps(events) and 'File "' not in json.dumps(events)
    assert "Traceback" in capfd.readouterr().err, "the traceback goes to the worker's own log (stderr)"


def test_a_client_that_leaves_mid_upload_leaves_no_traceback_in_the_log(srv: Server) -> None:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n'
        yield (json.dumps(GOOD_ROW) + "\n").encode() * 50
        raise ConnectionAbortedError("the client gives up")

    headers = {**_bearer(srv), "content-type": "multipart/form-data; boundary=b"}
    with pytest.raises((httpx.HTTPError, ConnectionAbortedError)):
        httpx.post(f"{srv.url}/v1/datasets", content=body(), headers=headers, timeout=10)
    assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    log = srv.log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def _close_of(url: str, **kwargs: Any) -> tuple[int | None, str | None]:
    """Connect, wait for the server to close the socket, and return its close code and reason."""
    with connect(url, open_timeout=10, **kwargs) as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    return ws.close_code, ws.close_reason


def _bearer(srv: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.key}"}


def _run_cli(srv: Server, *args: str) -> str:
    done = run_cli(*args, env=srv.env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def _last_used(srv: Server, name: str) -> str | None:
    keys = json.loads(_run_cli(srv, "auth", "list", "--json"))
    return next(k["last_used_at"] for k in keys if k["name"] == name)
