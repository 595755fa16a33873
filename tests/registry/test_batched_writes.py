"""A training run's buffered metrics and events reach the registry in one statement per flush, unchanged."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from tunelab.registry import db, jobs_repo, repo
from tunelab.registry.db import open_registry, session_scope


@pytest.fixture
def run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNELAB_DB_URL", raising=False)
    db.close_registries()
    with session_scope(open_registry()) as s:
        repo.create_run(s, run_id="r1", config={}, output_dir=str(tmp_path / "out"))
    yield "r1"
    db.close_registries()


def test_many_steps_of_metrics_keep_their_steps_times_and_non_finite_as_null(run_id: str) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    steps = [(i, {"train_loss": 1.0 / i, "grad_norm": math.nan if i == 2 else float(i)}, t0 + timedelta(seconds=i))
             for i in (1, 2, 3)]  # fmt: skip
    with session_scope(open_registry()) as s:
        repo.add_metric_steps(s, run_id=run_id, steps=steps)
        repo.add_metric_steps(s, run_id=run_id, steps=[])
    with session_scope(open_registry()) as s:
        history = repo.metric_history(s, run_id)
        assert repo.latest_metrics(s, run_id)["train_loss"] == pytest.approx(1 / 3)
        times = [
            t for (t,) in s.execute(text("SELECT created_at FROM metrics WHERE name = 'train_loss' ORDER BY step"))
        ]
    assert [p["step"] for p in history if p["name"] == "train_loss"] == [1, 2, 3]
    assert [p["value"] for p in history if p["name"] == "grad_norm"] == [1.0, None, 3.0]
    assert [datetime.fromisoformat(str(t)).replace(tzinfo=timezone.utc) for t in times] == [at for *_, at in steps]


def test_a_batch_of_events_keeps_its_order_and_refuses_an_unknown_type(run_id: str) -> None:
    batch = [("status", {"status": "running"}), *(("metric", {"step": i, "loss": math.inf}) for i in (1, 2)),
             ("log", {"text": "checkpoint saved at step 2"})]  # fmt: skip
    with session_scope(open_registry()) as s:
        jobs_repo.add_events(s, batch, run_id=run_id)
        with pytest.raises(ValueError, match="event type"):
            jobs_repo.add_events(s, [("metric", {}), ("nonsense", {})], run_id=run_id)
    with session_scope(open_registry()) as s:
        events = jobs_repo.events_after(s, run_id=run_id)
    fixed = ("id", "type", "job_id", "run_id", "time")
    assert [(e["type"], {k: v for k, v in e.items() if k not in fixed}) for e in events] == [
        ("status", {"status": "running"}),
        ("metric", {"step": 1, "loss": None}),
        ("metric", {"step": 2, "loss": None}),
        ("log", {"text": "checkpoint saved at step 2"}),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
