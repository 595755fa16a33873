"""The queue's state changes: claim, heartbeat, release, cancel — each one short transaction.

A job is held by a worker through a lease: ``worker_id`` plus a ``heartbeat_at``
the worker refreshes every few seconds.  A job whose worker has been silent for
longer than ``stale_after`` is free again; the next claim takes it over and, as
training always resumes from the run's newest checkpoint, continues rather than
restarts it.  Every change of status is also written as a ``status`` event, so
`jobs logs` and the WebSocket see the whole story.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from tunelab.registry import jobs_repo, repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.registry.tables import utcnow
from tunelab.vocab import ACTIVE_STATUSES, RUN_OWNING_KINDS


@dataclass(frozen=True)
class Claimed:
    """What a worker needs to run a job it now holds."""

    id: str
    kind: str
    run_id: str | None
    attempts: int
    max_attempts: int
    config: dict[str, Any]
    nproc: int = 1  # processes asked for; 0 = every one the worker offers


def claim(
    worker_id: str, *, stale_after: float, max_nproc: int | None = None, engine: Engine | None = None
) -> Claimed | None:
    """Take the next job (or one abandoned by a dead worker); None when there is nothing to do.

    ``max_nproc`` is how many processes the worker offers: jobs asking for more wait for a bigger worker.

    A job abandoned more often than its ``max_attempts`` is failed instead of
    being taken again, so a job that kills its worker can't loop forever.
    """
    engine = engine or open_registry()
    while True:
        with session_scope(engine) as s:
            stale_before = utcnow() - timedelta(seconds=stale_after)
            row = jobs_repo.claim_job(s, worker_id=worker_id, stale_before=stale_before, max_nproc=max_nproc)
            if row is None:
                return None
            job = Claimed(row.id, row.kind, row.run_id, row.attempts, row.max_attempts, dict(row.config), row.nproc)
            give_up = _abandoned_reason(row.attempts, row.max_attempts, bool(row.cancel_requested))
            if give_up is None:
                status = {"status": "running", "attempt": job.attempts, "worker": worker_id}
                jobs_repo.add_event(s, type="status", data=status, job_id=job.id, run_id=_owned(job.kind, job.run_id))
                return job
            final, reason = give_up
            jobs_repo.release_job(s, job_id=job.id, worker_id=worker_id, status=final, error=reason)
            _mark(s, job.id, _owned(job.kind, job.run_id), final, reason)


def _abandoned_reason(attempts: int, max_attempts: int, cancel: bool) -> tuple[str, str] | None:
    if cancel:  # cancelled while its worker was dead: nobody is left to stop, so just record it
        return "cancelled", "cancelled while its worker was not responding"
    if attempts > max_attempts:
        return "failed", f"gave up after {max_attempts} attempts (its worker stopped responding each time)"
    return None


def heartbeat(job_id: str, worker_id: str, *, engine: Engine | None = None) -> str:
    """Renew the lease; returns ``"ok"``, ``"cancel"`` or ``"lost"``."""
    with session_scope(engine or open_registry()) as s:
        return jobs_repo.heartbeat(s, job_id=job_id, worker_id=worker_id)


def finish(job_id: str, worker_id: str, status: str, *, error: str | None = None, engine: Engine | None = None) -> bool:
    """Record how a held job ended (``queued`` puts it back for another worker); False if the lease was lost."""
    with session_scope(engine or open_registry()) as s:
        row = jobs_repo.get_job(s, job_id)
        if not jobs_repo.release_job(s, job_id=job_id, worker_id=worker_id, status=status, error=error):
            return False
        _mark(s, job_id, _owned(row.kind, row.run_id), status, error or row.error)
        return True


def _owned(kind: str, run_id: str | None) -> str | None:
    """The run whose status and event stream follow this job: a training job's run; none for an eval job's."""
    return run_id if kind in RUN_OWNING_KINDS else None


def _mark(s: Any, job_id: str, run_id: str | None, status: str, error: str | None) -> None:
    data: dict[str, Any] = {"status": status}
    if error:
        data["error"] = error
    jobs_repo.add_event(s, type="status", data=data, job_id=job_id, run_id=run_id)
    if run_id is None:
        return
    run = repo.get_run(s, run_id)
    if status == "queued":  # handed back by a stopping worker: the run waits for the next one
        repo.update_run(s, run_id, status="queued")
        return
    if run.status in ACTIVE_STATUSES:  # the child normally records the run's end itself
        repo.update_run(s, run_id, status=status, finished_at=utcnow(), error=error)


def cancel(job_id: str, *, engine: Engine | None = None) -> dict[str, Any]:
    """Cancel a queued job now, or ask the worker of a running one to stop it at the next step."""
    with session_scope(engine or open_registry()) as s:
        job_id = jobs_repo.resolve_job_id(s, job_id)
        row = jobs_repo.request_cancel(s, job_id)
        if row.status == "cancelled":
            _mark(s, job_id, _owned(row.kind, row.run_id), "cancelled", None)
        else:
            text = {"text": "cancel requested"}
            jobs_repo.add_event(s, type="log", data=text, job_id=job_id, run_id=_owned(row.kind, row.run_id))
        return jobs_repo.job_public(row)
