"""Upgrading a registry keeps every row: a migration that recreates a table must not cascade-delete its children.

SQLite's batch migrations copy a table, drop the old one and rename the copy; with foreign keys on,
the drop deletes every metric, artifact, job and event of every run (found when 0008 added a foreign
key to ``runs`` and ``jobs``: an upgraded registry kept its runs and lost everything else).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import text

from tunelab.registry import repo
from tunelab.registry.db import _alembic_config, close_registries, make_engine, open_registry, session_scope

OLDEST_WITH_JOBS = "0003"  # the queue's tables exist from here on


def _filler(kind: str) -> Any:
    kind = kind.upper()
    if "INT" in kind:
        return 1
    if "JSON" in kind:
        return json.dumps({"model": {"path": "m"}, "data": {"train": "d"}})
    if "FLOAT" in kind or "REAL" in kind:
        return 1.0
    if "BOOL" in kind:
        return 0
    if "DATETIME" in kind or "TIMESTAMP" in kind:
        return "2026-12-01 10:00:00.000000"
    return "x"


def _insert(conn: Any, table: str, **given: Any) -> None:
    """A row with ``given`` values and something valid in every other NOT NULL column without a default."""
    columns = conn.exec_driver_sql(f"PRAGMA table_info({table})").fetchall()
    values = dict(given)
    for _cid, name, kind, notnull, default, pk in columns:
        if name not in values and notnull and default is None and not pk:
            values[name] = _filler(kind)
    names = ", ".join(values)
    marks = ", ".join(f":{k}" for k in values)
    conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({marks})"), values)


def test_an_old_registry_keeps_its_metrics_artifacts_jobs_and_events_after_the_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(_alembic_config(conn), OLDEST_WITH_JOBS)
        conn.commit()
    with engine.connect() as conn:
        _insert(conn, "runs", id="r1", status="completed", output_dir=str(tmp_path / "run"))
        _insert(conn, "metrics", run_id="r1", step=3, name="train_loss", value=1.5)
        _insert(conn, "artifacts", run_id="r1", kind="adapter", path=str(tmp_path / "run" / "adapter"))
        _insert(conn, "jobs", id="j1", run_id="r1", status="completed", kind="train")
        _insert(conn, "events", job_id="j1", run_id="r1", type="log", data=json.dumps({"text": "hi"}))
        conn.commit()
    engine.dispose()

    close_registries()
    upgraded = open_registry(url)  # migrates to the newest revision, as any command would
    with upgraded.connect() as conn:
        counts = {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("metrics", "artifacts", "jobs", "events")
        }
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1, "foreign keys are back on after the upgrade"
    assert counts == {"metrics": 1, "artifacts": 1, "jobs": 1, "events": 1}, counts
    with session_scope(upgraded) as s:
        assert repo.list_artifacts(s, "r1")[0].kind == "adapter"
    close_registries()
