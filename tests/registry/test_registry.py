"""Behaviour of the run registry on real SQLite files."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.orm import Session

from tunelab.errors import NotFoundError, StateError
from tunelab.registry import db, repo
from tunelab.registry.db import make_engine, migrate, open_registry, session_scope
from tunelab.registry.tables import Base

TABLES = {
    "models",
    "datasets",
    "runs",
    "metrics",
    "artifacts",
    "jobs",
    "events",
    "api_keys",
    "secrets",
    "alembic_version",
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    db.close_registries()
    yield
    db.close_registries()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNELAB_DB_URL", raising=False)
    return open_registry()


def _new_run(engine: Engine, run_id: str | None = None, **kw) -> str:
    with session_scope(engine) as s:
        return repo.create_run(s, run_id=run_id or repo.new_run_id(), config={"lr": 1e-4}, output_dir="/out", **kw)


def test_first_open_creates_db_and_second_open_is_noop(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (tmp_path / "home" / "tunelab.db").is_file()
    assert set(inspect(engine).get_table_names()) >= TABLES
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000

    assert open_registry() is engine  # cached per URL

    # A new process (fresh cache) must not run any migration: spy on alembic.
    db.close_registries()
    calls = []
    monkeypatch.setattr(alembic_command, "upgrade", lambda *a, **k: calls.append(a))  # db imports it when migrating
    again = open_registry(f"sqlite:///{tmp_path / 'home' / 'tunelab.db'}")
    assert calls == []
    migrate(again)
    assert calls == []


def test_migration_matches_orm_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_db_from_newer_tunelab_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    open_registry(url)
    db.close_registries()
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    eng.dispose()
    with pytest.raises(StateError, match="9999"):
        open_registry(url)


def test_concurrent_first_open_of_fresh_db(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race' / 'r.db'}"
    engines = [make_engine(url) for _ in range(4)]
    errors: list[BaseException] = []

    def go(e: Engine) -> None:
        try:
            migrate(e)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engines[0].connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    for e in engines:
        e.dispose()


def test_run_lifecycle_and_summary_json(engine: Engine) -> None:
    with session_scope(engine) as s:
        model_id = repo.upsert_model(s, path="/models/llama", architecture="llama")
        assert repo.upsert_model(s, path="/models/llama", num_params=1_000) == model_id
        ds1 = repo.upsert_dataset(s, path="d.jsonl", content_hash="aa", format="chat", num_train=9)
        assert repo.upsert_dataset(s, path="d.jsonl", content_hash="aa") == ds1
        assert repo.upsert_dataset(s, path="d.jsonl", content_hash="bb") != ds1
        run_id = repo.create_run(
            s,
            run_id="abcd1234",
            config={"lr": 0.001, "lora": {"r": 8}},
            output_dir=Path("/o"),
            name="first",
            model_id=model_id,
            dataset_id=ds1,
        )
    start = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
    with session_scope(engine) as s:
        repo.update_run(
            s,
            run_id,
            status="running",
            backend="torch",
            device="cuda:0",
            backend_reason="cuda available",
            chat_template="tokenizer",
            started_at=start,
            total_steps=100,
        )
        repo.add_metrics(s, run_id=run_id, step=10, values={"train_loss": 2.0, "lr": 1e-4})
        repo.add_metrics(s, run_id=run_id, step=20, values={"train_loss": float("nan")})
    with session_scope(engine) as s:
        repo.update_run(
            s,
            run_id,
            status="completed",
            step=100,
            finished_at=start + timedelta(seconds=90.5),
            final_metrics={"val_loss": 1.5},
            peak_memory_bytes=2**33,
        )
        summary = repo.run_summary(s, run_id)

    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["id"] == "abcd1234" and summary["status"] == "completed"
    assert summary["config"] == {"lr": 0.001, "lora": {"r": 8}}
    assert summary["output_dir"] == "/o" and summary["chat_template"] == "tokenizer"
    assert (summary["step"], summary["total_steps"]) == (100, 100)
    assert summary["started_at"] == "2025-01-01T12:00:00+00:00"
    assert summary["duration_s"] == 90.5
    assert summary["model"] == {
        "path": "/models/llama",
        "architecture": "llama",
        "num_params": 1000,
    }
    assert summary["dataset"]["num_train"] == 9 and summary["dataset"]["format"] == "chat"
    assert summary["metrics"] == {
        "train_loss": None,
        "val_loss": None,
        "tokens_per_sec": None,
        "lr": 1e-4,
    }
    assert summary["final_metrics"] == {"val_loss": 1.5}
    assert summary["peak_memory_bytes"] == 2**33
    assert summary["artifacts"] == {"adapter": None, "checkpoints": []}

    with session_scope(engine) as s:
        row = repo.get_run(s, run_id)
    assert row.started_at == start and row.started_at.tzinfo is not None
    assert row.created_at.tzinfo is not None


def test_run_errors(engine: Engine) -> None:
    run_id = _new_run(engine, "deadbeef")
    with session_scope(engine) as s:
        with pytest.raises(ValueError, match="bogus"):
            repo.update_run(s, run_id, bogus=1)
        with pytest.raises(ValueError):
            repo.update_run(s, run_id, status="exploded")
        with pytest.raises(NotFoundError, match="no run with id nope; `tunelab runs list`"):
            repo.get_run(s, "nope")
        with pytest.raises(NotFoundError):
            repo.update_run(s, "nope", step=1)
        with pytest.raises(StateError):
            repo.create_run(s, run_id=run_id, config={}, output_dir="/x")


def test_failed_session_rolls_back(engine: Engine) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        repo.create_run(s, run_id="rolled00", config={}, output_dir="/x")
        raise RuntimeError
    with session_scope(engine) as s:
        assert repo.list_runs(s) == []


def test_an_interrupt_after_the_commit_landed_goes_up_as_itself_and_the_rows_stay(engine: Engine) -> None:
    """SIGTERM's handler raises KeyboardInterrupt wherever the main thread is: here in SQLAlchemy's after-commit
    hooks, once the commit has landed (the CLI must then exit 130, not fail on a rollback it can't do)."""

    def interrupt(session: Session) -> None:
        raise KeyboardInterrupt

    event.listen(Session, "after_commit", interrupt, once=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            _new_run(engine)
    finally:
        if event.contains(Session, "after_commit", interrupt):
            event.remove(Session, "after_commit", interrupt)
    with session_scope(engine) as s:
        assert [r.id for r in repo.list_runs(s)] != []  # the committed run is there


def test_prefix_resolution(engine: Engine) -> None:
    for rid in ("abc11111", "abc22222", "fff00000"):
        _new_run(engine, rid)
    with session_scope(engine) as s:
        assert repo.resolve_run_id(s, "fff00000") == "fff00000"
        assert repo.resolve_run_id(s, "fff") == "fff00000"
        assert repo.resolve_run_id(s, "abc1") == "abc11111"
        with pytest.raises(NotFoundError, match=r"ambiguous.*abc\d{5}.*abc\d{5}"):
            repo.resolve_run_id(s, "abc")
        with pytest.raises(NotFoundError, match="no run with id 999"):
            repo.resolve_run_id(s, "999")
        with pytest.raises(NotFoundError):
            repo.resolve_run_id(s, "ff")  # too short to be a prefix
        with pytest.raises(NotFoundError):
            repo.resolve_run_id(s, "ab%")  # LIKE wildcards are literal


def test_list_runs_newest_first_and_by_status(engine: Engine) -> None:
    ids = [_new_run(engine) for _ in range(3)]
    with session_scope(engine) as s:
        repo.update_run(s, ids[0], status="failed", error="boom")
        assert [r.id for r in repo.list_runs(s)] == ids[::-1]
        assert [r.id for r in repo.list_runs(s, status="failed")] == [ids[0]]
        assert len(repo.list_runs(s, limit=2)) == 2


def test_latest_metrics_takes_highest_step_per_name(engine: Engine) -> None:
    run_id = _new_run(engine)
    other = _new_run(engine)
    with session_scope(engine) as s:
        repo.add_metrics(s, run_id=run_id, step=50, values={"train_loss": 1.0, "val_loss": 3.0})
        repo.add_metrics(s, run_id=run_id, step=10, values={"train_loss": 9.0})
        repo.add_metrics(s, run_id=run_id, step=100, values={"train_loss": 0.7})
        repo.add_metrics(s, run_id=run_id, step=100, values={"train_loss": 0.5})  # re-logged
        repo.add_metrics(s, run_id=other, step=999, values={"train_loss": 42.0})
    with session_scope(engine) as s:
        assert repo.latest_metrics(s, run_id) == {"train_loss": 0.5, "val_loss": 3.0}
        history = repo.metric_history(s, run_id)
    assert [h["step"] for h in history] == [10, 50, 50, 100, 100]
    assert history[0] == {"step": 10, "name": "train_loss", "value": 9.0}


def test_artifacts_idempotent_and_grouped(engine: Engine) -> None:
    run_id = _new_run(engine)
    with session_scope(engine) as s:
        for step in (1000, 200, 30):
            repo.add_artifact(s, run_id=run_id, kind="checkpoint", path=f"/o/checkpoint-{step}")
        repo.add_artifact(s, run_id=run_id, kind="checkpoint", path="/o/checkpoint-200")
        repo.add_artifact(s, run_id=run_id, kind="adapter", path="/o/adapter")
        repo.add_artifact(s, run_id=run_id, kind="adapter", path="/o/adapter", meta={"rank": 8})
        repo.add_artifact(s, run_id=run_id, kind="tensorboard", path="/o/tb")
        repo.add_artifact(s, run_id=run_id, kind="checkpoint", path="/o/best", meta={"step": 5})
    with session_scope(engine) as s:
        rows = repo.list_artifacts(s, run_id)
        assert len(rows) == 6
        assert [r.meta for r in rows if r.kind == "adapter"] == [{"rank": 8}]
        arts = repo.run_summary(s, run_id)["artifacts"]
    assert arts == {
        "adapter": "/o/adapter",
        "tensorboard": "/o/tb",
        "checkpoints": ["/o/best", "/o/checkpoint-30", "/o/checkpoint-200", "/o/checkpoint-1000"],
    }
    with session_scope(engine) as s:
        repo.remove_artifact(s, run_id=run_id, kind="checkpoint", path="/o/checkpoint-30")
        repo.remove_artifact(s, run_id=run_id, kind="checkpoint", path="/o/never-there")
        assert len(repo.list_artifacts(s, run_id)) == 5
        repo.delete_run(s, run_id)
    with session_scope(engine) as s:
        assert repo.list_artifacts(s, run_id) == []
        with pytest.raises(NotFoundError):
            repo.get_run(s, run_id)


def test_two_engines_on_one_file_can_both_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = open_registry(url)
    second = make_engine(url)  # what another process would build
    run_id = _new_run(first)
    errors: list[BaseException] = []

    def writer(e: Engine, name: str) -> None:
        try:
            for step in range(40):
                with session_scope(e) as s:
                    repo.add_metrics(s, run_id=run_id, step=step, values={name: float(step)})
                    repo.update_run(s, run_id, step=step)
                    repo.upsert_model(s, path="/shared/model")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(e, n)) for e, n in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope(second) as s:
        assert repo.latest_metrics(s, run_id) == {"a": 39.0, "b": 39.0}
        assert len(repo.metric_history(s, run_id)) == 80
    second.dispose()
