"""Queries for sweeps: the sweep row, its trials (jobs with ``sweep_id``) and the Optuna storage beside it.

Callers own the session, as in :mod:`tunelab.registry.repo`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from tunelab.errors import NotFoundError, StateError
from tunelab.registry.repo import MIN_PREFIX_LEN, _iso
from tunelab.registry.tables import JobRow, RunRow, SweepRow, utcnow

OPTUNA_SCHEMA = "optuna"


def new_sweep_id() -> str:
    """A short random id (``s`` + 9 hex digits), like job ids."""
    return "s" + uuid.uuid4().hex[:9]


def create_sweep(session: Session, **fields: Any) -> SweepRow:
    """Record a sweep (id, search, metric, direction, space, config, trials, name, study)."""
    row = SweepRow(created_at=utcnow(), **fields)
    session.add(row)
    session.flush()
    return row


def get_sweep(session: Session, sweep_id: str) -> SweepRow:
    row = session.get(SweepRow, sweep_id)
    if row is None:
        raise NotFoundError(f"no sweep with id {sweep_id}; `tunelab sweep list` shows the sweeps")
    return row


def resolve_sweep_id(session: Session, text: str) -> str:
    """A full sweep id from an id or a unique prefix of at least 3 characters."""
    text = text.strip()
    if session.get(SweepRow, text) is not None:
        return text
    if len(text) < MIN_PREFIX_LEN:
        raise NotFoundError(f"no sweep with id {text}; give at least {MIN_PREFIX_LEN} characters of an id")
    like = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    ids = list(session.scalars(select(SweepRow.id).where(SweepRow.id.like(like, escape="\\")).limit(2)))
    if not ids:
        raise NotFoundError(f"no sweep with id {text}; `tunelab sweep list` shows the sweeps")
    if len(ids) > 1:
        raise StateError(f"sweep id prefix {text!r} matches several sweeps; type more of it")
    return ids[0]


def list_sweeps(session: Session, *, limit: int = 100) -> list[SweepRow]:
    """Newest sweeps first."""
    return list(session.scalars(select(SweepRow).order_by(SweepRow.created_at.desc()).limit(limit)))


def trial_jobs(session: Session, sweep_id: str) -> list[JobRow]:
    """A sweep's jobs in the order they were queued."""
    stmt = select(JobRow).where(JobRow.sweep_id == sweep_id).order_by(JobRow.created_at, JobRow.id)
    return list(session.scalars(stmt))


def join_sweep(session: Session, *, job_id: str, run_id: str | None, sweep_id: str, trial: int | None) -> None:
    """Mark a queued job (and its run) as a trial of ``sweep_id``."""
    session.execute(update(JobRow).where(JobRow.id == job_id).values(sweep_id=sweep_id, trial=trial))
    if run_id is not None:
        session.execute(update(RunRow).where(RunRow.id == run_id).values(sweep_id=sweep_id))


def set_trial(session: Session, *, job_id: str, trial: int, config: dict[str, Any]) -> None:
    """An Optuna trial's number and the config its sampled values give, on the job and its run."""
    job = session.get(JobRow, job_id)
    if job is None:
        raise NotFoundError(f"no job with id {job_id}")
    job.trial, job.config = trial, config
    if job.run_id is not None:
        session.execute(update(RunRow).where(RunRow.id == job.run_id).values(config=config))
    session.flush()


def sweep_public(row: SweepRow) -> dict[str, Any]:
    """A sweep as plain JSON types (without its trials)."""
    return {
        "id": row.id,
        "name": row.name,
        "search": row.search,
        "metric": row.metric,
        "direction": row.direction,
        "space": row.space,
        "trials": row.trials,
        "study": row.study,
        "created_at": _iso(row.created_at),
        "config": row.config,
    }


def optuna_storage_url(engine: Engine) -> str:
    """Where a sweep's Optuna study lives, next to tunelab's own tables.

    Optuna's RDB storage records its schema revision in ``alembic_version``, the table tunelab's own
    migrations use, so the two can't share one namespace: on PostgreSQL the study gets schema
    ``optuna`` of tunelab's database (made here); SQLite has no schemas, so it gets the file
    ``<registry>-optuna.db`` beside the registry's.
    """
    url = engine.url
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "tunelab.db")
        return str(url.set(database=str(path.with_name(f"{path.stem}-optuna{path.suffix or '.db'}"))))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}")
    query = {**url.query, "options": f"-csearch_path={OPTUNA_SCHEMA}"}
    return make_url(url.render_as_string(hide_password=False)).set(query=query).render_as_string(hide_password=False)


def public_url(url: str) -> str:
    """A storage URL fit to print: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)
