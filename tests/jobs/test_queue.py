"""The queue's rules, on SQLite and on a real PostgreSQL server: claim order, leases, takeover, cancel."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from tests.jobs.conftest import write_data

from tunelab import services
from tunelab.config.load import validate_config
from tunelab.errors import ConfigError, StateError
from tunelab.jobs import queue
from tunelab.registry import jobs_repo, repo
from tunelab.registry.db import open_registry, session_scope


def _cfg(tmp_path: Path, **extra: object):
    data = write_data(tmp_path / "data")
    return validate_config({"model": {"path": str(tmp_path / "model")}, "data": {"train": str(data)}, **extra})


def _submit(tmp_path: Path, kind: str = "validate", priority: int = 0) -> str:
    return services.submit_job(_cfg(tmp_path), kind=kind, priority=priority)["id"]


def test_claims_follow_priority_then_age_and_nothing_twice(registry_url: str, tmp_path: Path) -> None:
    low, high, low2 = (_submit(tmp_path, priority=p) for p in (0, 5, 0))
    order = [queue.claim(f"w{i}", stale_after=60) for i in range(3)]
    assert [job.id for job in order if job] == [high, low, low2]
    assert queue.claim("w9", stale_after=60) is None
    shown = services.show_job(high)
    assert shown["status"] == "running" and shown["worker_id"] == "w0" and shown["attempts"] == 1


def test_train_job_gets_a_queued_run_and_a_status_event(registry_url: str, tmp_path: Path) -> None:
    job = services.submit_job(_cfg(tmp_path, output_dir=str(tmp_path / "out")), kind="train")
    assert job["status"] == "queued" and job["run_id"]
    assert services.show_run(job["run_id"])["status"] == "queued"
    assert not (tmp_path / "out").exists()  # nothing is written until a worker runs the job
    events = services.run_events(job["run_id"])
    assert [(e["type"], e["status"]) for e in events] == [("status", "queued")]
    with pytest.raises(ConfigError, match="job kind"):
        services.submit_job(_cfg(tmp_path), kind="bake")


def test_heartbeat_reports_cancel_and_lost_lease(registry_url: str, tmp_path: Path) -> None:
    job_id = _submit(tmp_path)
    assert queue.claim("w1", stale_after=60) is not None
    assert queue.heartbeat(job_id, "w1") == "ok"
    assert queue.heartbeat(job_id, "someone-else") == "lost"
    services.cancel_job(job_id)
    assert queue.heartbeat(job_id, "w1") == "cancel"
    assert queue.finish(job_id, "w1", "cancelled")
    assert services.show_job(job_id)["status"] == "cancelled"
    assert not queue.finish(job_id, "w1", "completed"), "a final job can't be finished again"


def test_silent_worker_loses_the_job_to_the_next_claim(registry_url: str, tmp_path: Path) -> None:
    job_id = _submit(tmp_path)
    assert queue.claim("dead", stale_after=60) is not None
    assert queue.claim("alive", stale_after=60) is None, "a fresh lease is respected"
    time.sleep(1.2)
    taken = queue.claim("alive", stale_after=1.0)
    assert taken is not None and taken.id == job_id and taken.attempts == 2
    assert queue.heartbeat(job_id, "dead") == "lost"
    assert not queue.finish(job_id, "dead", "completed"), "the old holder can't overwrite the new one's result"
    assert queue.finish(job_id, "alive", "completed")
    statuses = [e["status"] for e in services.job_events(job_id) if e["type"] == "status"]
    assert statuses == ["queued", "running", "running", "completed"]


def test_a_job_that_keeps_killing_its_worker_is_failed(registry_url: str, tmp_path: Path) -> None:
    job_id = _submit(tmp_path)
    with session_scope(open_registry()) as s:
        jobs_repo.get_job(s, job_id).max_attempts = 1
    assert queue.claim("w1", stale_after=60) is not None
    time.sleep(0.6)
    assert queue.claim("w2", stale_after=0.5) is None
    job = services.show_job(job_id)
    assert job["status"] == "failed" and "gave up after 1 attempts" in job["error"]


def test_cancel_queued_is_immediate_and_final_jobs_refuse(registry_url: str, tmp_path: Path) -> None:
    job = services.submit_job(_cfg(tmp_path, output_dir=str(tmp_path / "out")), kind="train")
    assert services.cancel_job(job["id"][:5])["status"] == "cancelled"
    assert services.show_run(job["run_id"])["status"] == "cancelled"
    assert queue.claim("w1", stale_after=60) is None
    with pytest.raises(StateError, match="already cancelled"):
        services.cancel_job(job["id"])


def test_concurrent_claims_in_threads_never_share_a_job(registry_url: str, tmp_path: Path) -> None:
    ids = {_submit(tmp_path) for _ in range(20)}
    got: list[str] = []
    lock = threading.Lock()

    def drain(name: str) -> None:
        while (job := queue.claim(name, stale_after=60)) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == sorted(ids)


def test_postgres_claim_skips_rows_locked_by_another_worker(registry_url: str, tmp_path: Path) -> None:
    if not registry_url.startswith("postgresql"):
        pytest.skip("FOR UPDATE SKIP LOCKED is the PostgreSQL claim; SQLite serialises claims with its write lock")
    first, second = _submit(tmp_path), _submit(tmp_path)
    with session_scope(open_registry()) as holding:
        held = jobs_repo.claim_job(holding, worker_id="slow", stale_before=datetime.now(timezone.utc))
        assert held is not None and held.id == first
        started = time.monotonic()
        other = queue.claim("fast", stale_after=60)  # its own transaction, while "slow" still holds the row lock
        assert other is not None and other.id == second
        assert time.monotonic() - started < 5, "the claim skipped the locked row instead of waiting for it"
    assert services.show_job(first)["worker_id"] == "slow"


def test_job_whose_run_already_completed_is_not_trained_again(registry_url: str, tmp_path: Path) -> None:
    job = services.submit_job(_cfg(tmp_path, output_dir=str(tmp_path / "out")), kind="train")
    with session_scope(open_registry()) as s:
        repo.update_run(s, job["run_id"], status="completed")
    # e.g. the worker died between the end of training and recording the job's end
    assert services.run_job(job["id"]) == "completed"


def test_handing_a_job_back_does_not_use_up_its_attempts(registry_url: str, tmp_path: Path) -> None:
    """A worker that stops gracefully (Ctrl-C) hands its job back; doing so more often than max_attempts
    must not fail the job, while a worker that dies still counts (test_a_job_that_keeps_killing...)."""
    job_id = _submit(tmp_path)
    for i in range(5):
        claimed = queue.claim(f"w{i}", stale_after=60)
        assert claimed is not None and claimed.id == job_id and claimed.attempts == 1
        assert queue.finish(job_id, f"w{i}", "queued")
    assert services.show_job(job_id)["status"] == "queued"
