"""Fixtures for queue and worker tests: a registry on SQLite or on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.conftest import base_config, chat_data, e2e_model  # noqa: F401  (fixtures reused here)
from tests.jobs.postgres import PostgresUnavailable, postgres_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One throwaway PostgreSQL server for the session (skipped, with the reason, where it can't start)."""
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL not available: {exc}")


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """TUNELAB_DB_URL for this test: the default SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{os.environ['TUNELAB_HOME']}/tunelab.db"
    base = request.getfixturevalue("postgres_url")
    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    import sqlalchemy as sa

    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    url = base.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("TUNELAB_DB_URL", url)
    return url


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen]]:
    """Worker processes a test starts; any still alive at the end are killed (each leads its own session)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def write_data(folder: Path, n: int = 10) -> Path:
    """A small valid chat dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = folder / "train.jsonl"
    path.write_text((json.dumps(row) + "\n") * n, encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_DB_URL"}
    if os.environ.get("TUNELAB_DB_URL"):
        env["TUNELAB_DB_URL"] = os.environ["TUNELAB_DB_URL"]
    return {**env, **extra}


def start_worker(*args: str, log: Path) -> subprocess.Popen:
    """A real `tunelab worker` process (fast heartbeats so takeovers happen within seconds)."""
    fast = ["--heartbeat", "0.3", "--stale-after", "3", "--poll", "0.2"]
    cmd = [sys.executable, "-m", "tunelab", "worker", *fast, *args]
    handle = log.open("ab")
    return subprocess.Popen(cmd, env=cli_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sweep_config(tmp_path: Path, model: Path, data: Path, **train: object) -> Path:
    """A small sweep's base config (3 steps of 4 rows unless ``train`` says otherwise), written to a file."""
    raw = base_config(model, data, tmp_path / "unused", **{"steps": 3, "batch_size": 4, **train})
    raw.pop("output_dir")  # each trial gets its own run folder
    raw["data"]["max_seq_len"] = 64
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def two_workers(tmp_path: Path, workers: list) -> None:
    """Two workers that each leave when the queue is empty; returns when both have."""
    for i in (1, 2):
        workers.append(start_worker("--exit-when-idle", log=tmp_path / f"w{i}.log"))
    for w in workers:
        w.wait(timeout=420)
