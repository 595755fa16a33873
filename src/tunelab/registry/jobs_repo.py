"""Queries for the job queue and the event log (jobs, events).

Like :mod:`tunelab.registry.repo`, callers own the session.  The claim is the
one place where concurrency matters: on PostgreSQL the candidate row is locked
with ``FOR UPDATE SKIP LOCKED`` so workers on several machines each take a
different job; on SQLite the transaction starts with ``BEGIN IMMEDIATE`` so the
read and the update happen under the single write lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.orm import Session

from tunelab.errors import NotFoundError, StateError
from tunelab.registry.repo import MIN_PREFIX_LEN, _iso, _json_safe
from tunelab.registry.tables import EventRow, JobRow, utcnow
from tunelab.vocab import ACTIVE_STATUSES, FINAL_STATUSES, RUN_OWNING_KINDS

EVENT_TYPES = frozenset({"metric", "log", "status", "samples"})  # samples: train.sample_every's answers


def new_job_id() -> str:
    """A short random id, like run ids."""
    return "j" + uuid.uuid4().hex[:9]


def create_job(
    session: Session,
    *,
    job_id: str,
    kind: str,
    config: dict[str, Any],
    run_id: str | None = None,
    priority: int = 0,
    max_attempts: int = 3,
    nproc: int = 1,
    allowed_roots: list[str] | None = None,
) -> JobRow:
    """Queue a new job (``nproc`` processes; 0 = every one its worker offers; ``allowed_roots``: over the API)."""
    row = JobRow(
        id=job_id,
        kind=kind,
        status="queued",
        run_id=run_id,
        config=config,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        nproc=nproc,
        allowed_roots=allowed_roots,
        cancel_requested=0,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def get_job(session: Session, job_id: str) -> JobRow:
    """The job with exactly this id, or a NotFoundError."""
    row = session.get(JobRow, job_id)
    if row is None:
        raise NotFoundError(f"no job with id {job_id}; `tunelab jobs list` shows the jobs")
    return row


def resolve_job_id(session: Session, text: str) -> str:
    """A full job id from an id or a unique prefix of at least 3 characters."""
    if session.get(JobRow, text) is not None:
        return text
    if len(text) < MIN_PREFIX_LEN:
        raise NotFoundError(f"no job with id {text}; give at least {MIN_PREFIX_LEN} characters of an id")
    like = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    ids = list(session.scalars(select(JobRow.id).where(JobRow.id.like(like, escape="\\")).limit(2)))
    if not ids:
        raise NotFoundError(f"no job with id {text}; `tunelab jobs list` shows the jobs")
    if len(ids) > 1:
        raise StateError(f"job id prefix {text!r} matches several jobs; type more of it")
    return ids[0]


def list_jobs(session: Session, *, status: str | None = None, limit: int = 200) -> list[JobRow]:
    """Newest jobs first."""
    stmt = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(JobRow.status == status)
    return list(session.scalars(stmt))


def claim_job(
    session: Session, *, worker_id: str, stale_before: datetime, max_nproc: int | None = None
) -> JobRow | None:
    """Atomically take the most urgent job: queued, or running under a worker silent since ``stale_before``.

    ``max_nproc`` (the processes the worker offers) skips jobs that ask for more.

    Must be the first statement of its session (SQLite takes the write lock here).
    """
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
    free = or_(
        JobRow.status == "queued",
        and_(JobRow.status == "running", JobRow.heartbeat_at < stale_before),
    )
    if max_nproc is not None:
        free = and_(free, JobRow.nproc <= max_nproc)
    stmt = (
        select(JobRow)
        .where(free)
        .order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    row = session.scalars(stmt).first()
    if row is None:
        return None
    now = utcnow()
    row.status = "running"
    row.worker_id = worker_id
    row.heartbeat_at = now
    row.attempts = row.attempts + 1
    row.started_at = row.started_at or now
    session.flush()
    return row


def heartbeat(session: Session, *, job_id: str, worker_id: str) -> str:
    """Refresh the lease: ``"ok"``, ``"cancel"`` (someone asked to cancel) or ``"lost"`` (another worker has it)."""
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.worker_id == worker_id, JobRow.status == "running")
        .values(heartbeat_at=utcnow())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return "lost"
    cancel = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
    return "cancel" if cancel else "ok"


def release_job(session: Session, *, job_id: str, worker_id: str | None, status: str, error: str | None = None) -> bool:
    """Move a held job to ``status`` (final, or back to queued); False when ``worker_id`` no longer holds it."""
    values: dict[str, Any] = {"status": status}
    if status in FINAL_STATUSES:
        values["finished_at"] = utcnow()
    else:
        # Handed back by a worker that is stopping (Ctrl-C, a service manager): the job was not abandoned,
        # so the claim is not counted against its max_attempts (only dead workers' jobs are).
        values.update(
            worker_id=None, heartbeat_at=None, attempts=case((JobRow.attempts > 0, JobRow.attempts - 1), else_=0)
        )
    if error is not None:
        values["error"] = error
    stmt = update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(ACTIVE_STATUSES))
    if worker_id is not None:
        stmt = stmt.where(JobRow.worker_id == worker_id)
    return session.execute(stmt.values(**values)).rowcount == 1  # type: ignore[attr-defined]


def request_cancel(session: Session, job_id: str) -> JobRow:
    """Flag a job for cancelling; a queued one is cancelled at once, a running one by its worker."""
    row = get_job(session, job_id)
    if row.status in FINAL_STATUSES:
        raise StateError(f"job {job_id} is already {row.status}")
    row.cancel_requested = 1
    if row.status == "queued":
        row.status, row.finished_at = "cancelled", utcnow()
    session.flush()
    return row


def set_job_error(session: Session, job_id: str, error: str) -> None:
    """Remember why a job failed (written by the child process that saw the error)."""
    session.execute(update(JobRow).where(JobRow.id == job_id).values(error=error))


def add_event(
    session: Session, *, type: str, data: dict[str, Any], job_id: str | None = None, run_id: str | None = None
) -> None:
    """Append one event; ``type`` is metric | log | status."""
    if type not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {sorted(EVENT_TYPES)}, not {type!r}")
    session.add(EventRow(job_id=job_id, run_id=run_id, type=type, data=_json_safe(data), created_at=utcnow()))
    session.flush()


def add_events(
    session: Session,
    events: Sequence[tuple[str, dict[str, Any]]],
    *,
    job_id: str | None = None,
    run_id: str | None = None,
) -> None:
    """Append ``(type, data)`` events in order with one statement (a training run's buffered batch)."""
    for type, _ in events:
        if type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {sorted(EVENT_TYPES)}, not {type!r}")
    if not events:
        return
    now = utcnow()
    rows = [
        {"job_id": job_id, "run_id": run_id, "type": type, "data": _json_safe(data), "created_at": now}
        for type, data in events
    ]
    session.execute(insert(EventRow), rows)  # one executemany: the ids follow the list's order


def events_after(
    session: Session,
    *,
    run_id: str | None = None,
    job_id: str | None = None,
    after: int = 0,
    limit: int = 500,
    types: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Events of a run or a job with ``id > after``, oldest first, as public JSON.

    ``types`` keeps only those event types: a long run logs a metric event per step, which would
    otherwise fill ``limit`` before its later logs or samples.
    """
    stmt = select(EventRow).where(EventRow.id > after).order_by(EventRow.id).limit(limit)
    if types is not None:
        stmt = stmt.where(EventRow.type.in_(list(types)))
    if run_id is not None:
        stmt = stmt.where(EventRow.run_id == run_id)
    if job_id is not None:
        stmt = stmt.where(EventRow.job_id == job_id)
    return [event_public(e) for e in session.scalars(stmt)]


def event_public(row: EventRow) -> dict[str, Any]:
    # The fixed keys come last so a metric can never shadow them.
    return {
        **row.data,
        "id": row.id,
        "type": row.type,
        "job_id": row.job_id,
        "run_id": row.run_id,
        "time": _iso(row.created_at),
    }


def count_jobs(session: Session, status: str) -> int:
    return int(session.scalar(select(func.count()).select_from(JobRow).where(JobRow.status == status)) or 0)


def job_public(row: JobRow) -> dict[str, Any]:
    """A job as plain JSON types (what `jobs show --json` and the API return)."""
    return {
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "run_id": row.run_id,
        "priority": row.priority,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "nproc": row.nproc,
        "worker_id": row.worker_id,
        "heartbeat_at": _iso(row.heartbeat_at),
        "cancel_requested": bool(row.cancel_requested),
        "error": row.error,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "config": row.config,
    }


def job_for_run(session: Session, run_id: str) -> JobRow | None:
    """The newest job that trains this run, if it was queued as one (an eval job of the run is not)."""
    stmt = (
        select(JobRow)
        .where(JobRow.run_id == run_id, JobRow.kind.in_(RUN_OWNING_KINDS))
        .order_by(JobRow.created_at.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()
