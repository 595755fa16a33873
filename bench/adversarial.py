"""An adversarial pass over the interfaces users touch: bad inputs through the real CLI and a real API server.

Each case is something a user (or a hostile client) can do.  The script runs it
and records what came back: the exit code or HTTP status, whether a traceback
reached the user, and the first line of the message.  It prints a Markdown
table and the totals (tracebacks shown, 5xx answers, cases that exited 0 when
they should have been refused), for issue 22's before/after table.

    python bench/adversarial.py [--keep DIR]

Everything runs on loopback in a temporary home, with a tiny model built on the
spot; it takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Outcome:
    case: str
    via: str
    code: int
    traceback: bool
    message: str

    @property
    def refused(self) -> bool:
        return self.code != 0 if self.via == "cli" else 400 <= self.code < 500


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_DB_URL"}
    return {**env, "TUNELAB_HOME": str(home), "COLUMNS": "200", **extra}


def _cli(home: Path, *args: str, **extra: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", *args], env=_env(home, **extra), capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def _first_line(text: str) -> str:
    """tunelab's ``error:`` line, or the text inside Typer's usage box (a missing argument), else the last line."""
    lines = [line.strip().strip("│").strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("╭", "╰"))]
    picked = next((line for line in lines if line.lower().startswith("error")), None)
    if picked is None and "Usage:" in text:
        picked = "usage error: " + lines[-1]
    return (picked or (lines[-1] if lines else ""))[:110]


def _setup(root: Path) -> dict[str, Path]:
    """A tiny model, a clean chat file and the bad files the cases use."""
    from tunelab.tiny import make_tiny_checkpoint

    rows = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"number {i}"}]}
        for i in range(24)
    ]
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in rows for m in r["messages"]] * 4
    model = make_tiny_checkpoint(root / "model", texts, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64)  # fmt: skip
    files = {"good": good, "model": model}
    files["latin1"] = root / "latin1.jsonl"
    files["latin1"].write_bytes(b'{"text": "caf\xe9"}\n')
    files["broken"] = root / "broken.jsonl"
    files["broken"].write_text('{"messages": [\nnot json\n[1, 2]\n', encoding="utf-8")
    files["huge"] = root / "huge.jsonl"
    files["huge"].write_text(json.dumps({"text": "x" * (3 * 2**20)}) + "\n", encoding="utf-8")
    files["empty"] = root / "empty.jsonl"
    files["empty"].write_text("", encoding="utf-8")
    files["deep"] = root / "deep.jsonl"
    files["deep"].write_text('{"text": ' + "[" * 5000 + "]" * 5000 + "}\n", encoding="utf-8")
    return files


def _config(root: Path, name: str, files: dict[str, Path], **over: Any) -> Path:
    raw: dict[str, Any] = {
        "model": {"path": str(files["model"])},
        "data": {"train": str(files["good"]), "max_seq_len": 64},
        "method": {"name": "lora", "rank": 4},
        "train": {"steps": 2, "batch_size": 4},
        "output_dir": str(root / "runs" / name),
        "tensorboard": False,
    }
    for key, value in over.items():
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def cli_cases(root: Path, home: Path, files: dict[str, Path]) -> list[Outcome]:
    bomb = root / "bomb.yaml"
    levels = "abcdefghi"  # each level lists the one before nine times: 9**9 items once expanded
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in itertools.pairwise(levels)]
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cases: list[tuple[str, list[str], dict[str, str]]] = [
        ("config file missing", ["train", str(root / "nope.yaml")], {}),
        ("unknown config key", ["train", str(_config(root, "k", files, **{"train.lrr": 1}))], {}),
        ("learning rate out of range", ["train", str(_config(root, "lr", files, **{"train.lr": -1}))], {}),
        ("override without a value", ["train", str(_config(root, "o", files)), "train.lr"], {}),
        ("YAML alias bomb", ["train", str(bomb)], {}),
        ("model folder missing", ["train", str(_config(root, "m", files, **{"model.path": str(root / "gone")}))], {}),
        (
            "data file missing",
            ["train", str(_config(root, "d", files, **{"data.train": str(root / "gone.jsonl")}))],
            {},
        ),
        ("data not UTF-8", ["data", "validate", str(files["latin1"])], {}),
        ("broken JSON lines", ["data", "validate", str(files["broken"])], {}),
        ("record over the size limit", ["data", "validate", str(files["huge"])], {"TUNELAB_MAX_RECORD_MB": "1"}),
        ("empty data file", ["data", "validate", str(files["empty"])], {}),
        ("record nested 5,000 deep", ["data", "validate", str(files["deep"])], {}),
        (
            "train on broken JSON",
            ["train", str(_config(root, "b", files, **{"data.train": str(files["broken"])}))],
            {},
        ),
        ("--nproc 0", ["train", str(_config(root, "n", files)), "--nproc", "0"], {}),
        ("resume an unknown run", ["train", "--resume", "zzzz9999"], {}),
        ("show an unknown run", ["runs", "show", "zzzz9999"], {}),
        ("export an unknown run", ["export", "zzzz9999", "--to", "gguf", "--out", str(root / "x")], {}),
        ("export to an unknown target", ["export", "zzzz9999", "--to", "tflite", "--out", str(root / "x")], {}),
        ("chat with an unknown run", ["chat", "zzzz9999"], {}),
        ("jobs cancel unknown", ["jobs", "cancel", "jzzzz"], {}),
        ("estimate without a config", ["estimate"], {}),
        ("database URL unreachable", ["runs", "list"], {"TUNELAB_DB_URL": "postgresql+psycopg://x@127.0.0.1:1/db"}),
    ]
    out = []
    for name, args, extra in cases:
        code, text = _cli(home, *args, **extra)
        out.append(Outcome(name, "cli", code, "Traceback" in text, _first_line(text)))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api_cases(root: Path, home: Path, files: dict[str, Path]) -> tuple[list[Outcome], str]:
    made = subprocess.run([sys.executable, "-m", "tunelab", "auth", "create-key", "--name", "adv"],
                          env=_env(home), capture_output=True, text=True, check=True)  # fmt: skip
    key = made.stdout.split()[-1]
    port = _free_port()
    log = root / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--log-level", "warning"],
            env=_env(home, TUNELAB_API_ROOTS=str(root)), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url)
        auth = {"Authorization": f"Bearer {key}"}
        good_cfg = {"model": {"path": str(files["model"])}, "data": {"train": str(files["good"])}}
        deep = "[" * 100_000 + "]" * 100_000
        hi = [{"role": "user", "content": "hi"}]
        jobs = "/v1/jobs"
        cases: list[tuple[str, str, str, dict[str, Any]]] = [
            ("no API key", "GET", "/v1/runs", {"headers": {"Authorization": ""}}),
            ("wrong API key", "GET", "/v1/runs", {"headers": {"Authorization": "Bearer nope"}}),
            ("unknown run", "GET", "/v1/runs/nope", {}),
            ("job body not JSON", "POST", jobs, {"content": b"{oops", "headers": {"content-type": "application/json"}}),
            ("job config wrong type", "POST", jobs, {"json": {"config": "train.yaml"}}),
            ("job path outside roots", "POST", jobs, {"json": {"config": {**good_cfg, "model": {"path": "/etc"}}}}),
            ("job path with ..", "POST", jobs, {"json": {"config": {**good_cfg, "data": {"train": "../../x"}}}}),
            ("job lr out of range", "POST", jobs, {"json": {"config": {**good_cfg, "train": {"lr": -1}}}}),
            ("unknown job kind", "POST", jobs, {"json": {"config": good_cfg, "kind": "mine"}}),
            ("cancel unknown job", "POST", "/v1/jobs/jnope/cancel", {}),
            ("upload not UTF-8", "POST", "/v1/datasets", {"files": {"file": ("a.jsonl", b'{"text": "caf\xe9"}\n')}}),
            ("upload nested 100k deep", "POST", "/v1/datasets", {"files": {"file": ("d.json", deep.encode())}}),
            ("upload with ../ name", "POST", "/v1/datasets", {"files": {"file": ("../../x.jsonl", b"{oops\n")}}),
            ("upload unknown type", "POST", "/v1/datasets", {"files": {"file": ("x.exe", b"MZ")}}),
            ("chat unknown model", "POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": hi}}),
            ("chat no messages", "POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": []}}),
            ("chat max_tokens -5", "POST", "/v1/chat/completions",
             {"json": {"model": "nope", "max_tokens": -5, "messages": hi}}),
            ("runs limit=abc", "GET", "/v1/runs?limit=abc", {}),
            ("events after=-1", "GET", "/v1/jobs/jnope/events?after=-1", {}),
        ]  # fmt: skip
        out = []
        with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
            for name, method, path, kwargs in cases:
                response = client.request(method, path, **kwargs)
                text = response.text
                detail = ""
                try:
                    body = response.json()
                    detail = str(body.get("detail", body))[:110] if isinstance(body, dict) else text[:110]
                except ValueError:
                    detail = text[:110]
                out.append(Outcome(name, "api", response.status_code, "Traceback" in text, detail))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return out, log.read_text(encoding="utf-8", errors="replace")


def _wait(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("tunelab serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="tunelab-adversarial-"))
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home"
    try:
        files = _setup(root)
        outcomes = cli_cases(root, home, files)
        api, server_log = api_cases(root, home, files)
        outcomes += api
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("| via | input | exit / status | traceback | what the user reads |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        said = " ".join(o.message.replace("|", "/").split())
        print(f"| {o.via} | {o.case} | {o.code} | {'YES' if o.traceback else 'no'} | {said} |")
    print()
    print(f"cases: {len(outcomes)}; refused with a message: {sum(o.refused for o in outcomes)}; "
          f"tracebacks shown: {sum(o.traceback for o in outcomes)}; "
          f"5xx answers: {sum(o.via == 'api' and o.code >= 500 for o in outcomes)}; "
          f"tracebacks in the server log: {server_log.count('Traceback')}")  # fmt: skip


if __name__ == "__main__":
    main()
