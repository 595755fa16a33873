"""Every query the registry makes.

Callers own the session (see :func:`tunelab.registry.db.session_scope`) and so
decide where transactions end; functions here only flush.  Upserts are single
``INSERT … ON CONFLICT`` statements so that two processes registering the same
model or artifact at once can't trip over each other's unique constraints.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tunelab.errors import NotFoundError, StateError

# Metrics live in metrics_repo; callers keep reaching them as repo.add_metrics and so on.
from tunelab.registry.metrics_repo import CORE_METRICS, finite
from tunelab.registry.metrics_repo import add_metric_steps as add_metric_steps
from tunelab.registry.metrics_repo import add_metrics as add_metrics
from tunelab.registry.metrics_repo import delete_metrics_after as delete_metrics_after
from tunelab.registry.metrics_repo import latest_metrics as latest_metrics
from tunelab.registry.metrics_repo import metric_history as metric_history
from tunelab.registry.tables import (
    ArtifactRow,
    DatasetRow,
    MetricRow,
    ModelRow,
    RunRow,
    utcnow,
)
from tunelab.vocab import RUN_STATUSES

MIN_PREFIX_LEN = 3
_UPDATABLE_RUN_FIELDS = frozenset(c.key for c in RunRow.__table__.columns) - {"id"}
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def _not_found(run_id: str) -> NotFoundError:
    return NotFoundError(f"no run with id {run_id}; `tunelab runs list` shows the runs")


def _upsert_insert(session: Session, table: Any) -> sqlite.Insert | postgresql.Insert:
    """A dialect-specific INSERT that supports ``on_conflict_*``."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"the tunelab registry supports sqlite and postgresql, not {name}")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def new_run_id() -> str:
    """A short random id: 8 hex chars is easy to type and prefix-match."""
    return uuid.uuid4().hex[:8]


def upsert_model(
    session: Session,
    *,
    path: str | os.PathLike[str],
    architecture: str | None = None,
    num_params: int | None = None,
) -> int:
    """The id of the model at ``path``, creating it; known fields are filled, never blanked."""
    ins = _upsert_insert(session, ModelRow).values(
        path=str(path), architecture=architecture, num_params=num_params, created_at=utcnow()
    )
    stmt = ins.on_conflict_do_update(
        index_elements=[ModelRow.path],
        set_={
            "architecture": func.coalesce(ins.excluded.architecture, ModelRow.architecture),
            "num_params": func.coalesce(ins.excluded.num_params, ModelRow.num_params),
        },
    ).returning(ModelRow.id)
    return int(session.execute(stmt).scalar_one())


def upsert_dataset(
    session: Session,
    *,
    path: str | os.PathLike[str],
    content_hash: str,
    format: str | None = None,
    num_train: int | None = None,
    num_valid: int | None = None,
    cache_key: str | None = None,
    stats: dict[str, Any] | None = None,
) -> int:
    """The id of this (path, content) pair; edited files get a new row so old runs stay exact."""
    ins = _upsert_insert(session, DatasetRow).values(
        path=str(path),
        content_hash=content_hash,
        format=format,
        num_train=num_train,
        num_valid=num_valid,
        cache_key=cache_key,
        stats=_json_safe(stats) if stats is not None else None,
        created_at=utcnow(),
    )
    stmt = ins.on_conflict_do_update(
        index_elements=[DatasetRow.path, DatasetRow.content_hash],
        set_={
            "format": func.coalesce(ins.excluded.format, DatasetRow.format),
            "num_train": func.coalesce(ins.excluded.num_train, DatasetRow.num_train),
            "num_valid": func.coalesce(ins.excluded.num_valid, DatasetRow.num_valid),
            "cache_key": func.coalesce(ins.excluded.cache_key, DatasetRow.cache_key),
            "stats": func.coalesce(ins.excluded.stats, DatasetRow.stats),
        },
    ).returning(DatasetRow.id)
    return int(session.execute(stmt).scalar_one())


def create_run(
    session: Session,
    *,
    run_id: str,
    config: dict[str, Any],
    output_dir: str | os.PathLike[str],
    name: str | None = None,
    status: str = "queued",
    model_id: int | None = None,
    dataset_id: int | None = None,
) -> str:
    """Register a new run and return its id; an id already taken is a StateError."""
    _check_status(status)
    if session.get(RunRow, run_id) is not None:
        raise StateError(f"a run with id {run_id} already exists")
    session.add(
        RunRow(
            id=run_id,
            name=name,
            status=status,
            config=config,
            output_dir=str(output_dir),
            model_id=model_id,
            dataset_id=dataset_id,
            step=0,
            created_at=utcnow(),
        )
    )
    session.flush()
    return run_id


def _check_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(RUN_STATUSES)}")


def update_run(session: Session, run_id: str, **fields: Any) -> None:
    """Set columns of a run; unknown column names are a programming error (ValueError)."""
    unknown = set(fields) - _UPDATABLE_RUN_FIELDS
    if unknown:
        raise ValueError(f"not updatable run fields: {', '.join(sorted(unknown))}")
    if "status" in fields:
        _check_status(fields["status"])
    if "output_dir" in fields:
        fields["output_dir"] = str(fields["output_dir"])
    if not fields:
        get_run(session, run_id)
        return
    # A bulk UPDATE avoids loading the row, which matters for per-step progress writes.
    stmt = update(RunRow).where(RunRow.id == run_id).values(**fields)
    result = cast(CursorResult[Any], session.execute(stmt))
    if result.rowcount == 0:
        raise _not_found(run_id)


def get_run(session: Session, run_id: str) -> RunRow:
    """The run with exactly this id."""
    row = session.get(RunRow, run_id)
    if row is None:
        raise _not_found(run_id)
    return row


def resolve_run_id(session: Session, text: str) -> str:
    """Turn what a user typed (a full id or a unique prefix) into a run id."""
    text = text.strip()
    if session.get(RunRow, text) is not None:
        return text
    if len(text) < MIN_PREFIX_LEN:
        raise NotFoundError(
            f"no run with id {text}; `tunelab runs list` shows the runs",
            hint=f"an id prefix needs at least {MIN_PREFIX_LEN} characters",
        )
    # Fetch one more than we show so we know whether the list was cut.
    shown = 10
    matches = list(
        session.scalars(
            select(RunRow.id)
            .where(RunRow.id.startswith(text, autoescape=True))
            .order_by(RunRow.created_at.desc(), RunRow.id)
            .limit(shown + 1)
        )
    )
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise _not_found(text)
    listed = ", ".join(matches[:shown]) + (", …" if len(matches) > shown else "")
    raise NotFoundError(
        f"run id prefix {text!r} is ambiguous; it matches {listed}",
        hint="type more characters of the id",
    )


def list_runs(session: Session, *, status: str | None = None, limit: int = 200) -> list[RunRow]:
    """Runs, newest first, optionally only those with ``status``."""
    stmt = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
    if status is not None:
        _check_status(status)
        stmt = stmt.where(RunRow.status == status)
    return list(session.scalars(stmt))


def delete_run(session: Session, run_id: str) -> None:
    """Remove a run with its metrics and artifact records (files on disk are left alone)."""
    get_run(session, run_id)
    # Explicit deletes rather than relying on ON DELETE CASCADE, which SQLite
    # only honours when the connection enabled foreign keys.
    session.execute(delete(MetricRow).where(MetricRow.run_id == run_id))
    session.execute(delete(ArtifactRow).where(ArtifactRow.run_id == run_id))
    session.execute(delete(RunRow).where(RunRow.id == run_id))


def add_artifact(
    session: Session,
    *,
    run_id: str,
    kind: str,
    path: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Record an artifact; recording it again is a no-op except that new ``meta`` replaces old."""
    stmt = _upsert_insert(session, ArtifactRow).values(
        run_id=run_id, kind=kind, path=str(path), meta=meta, created_at=utcnow()
    )
    keys = [ArtifactRow.run_id, ArtifactRow.kind, ArtifactRow.path]
    if meta is None:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    else:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={"meta": stmt.excluded.meta})
    session.execute(stmt)


def remove_artifact(session: Session, *, run_id: str, kind: str, path: str | os.PathLike[str]) -> None:
    """Forget an artifact (e.g. a pruned checkpoint); absent ones are ignored."""
    session.execute(
        delete(ArtifactRow).where(ArtifactRow.run_id == run_id, ArtifactRow.kind == kind, ArtifactRow.path == str(path))
    )


def list_artifacts(session: Session, run_id: str) -> list[ArtifactRow]:
    """A run's artifacts in the order they were recorded."""
    stmt = select(ArtifactRow).where(ArtifactRow.run_id == run_id).order_by(ArtifactRow.id)
    return list(session.scalars(stmt))


def _checkpoint_step(row: ArtifactRow) -> int:
    """Step of a checkpoint: ``meta["step"]``, else the last number in its file name."""
    if row.meta and isinstance(row.meta.get("step"), int):
        return int(row.meta["step"])
    match = _LAST_INT.search(os.path.basename(row.path.rstrip("/\\")))
    return int(match.group(1)) if match else -1


def _group_artifacts(rows: list[ArtifactRow]) -> dict[str, Any]:
    grouped: dict[str, Any] = {"adapter": None, "checkpoints": []}
    checkpoints = []
    for row in rows:  # recorded order, so a later record of a kind wins
        if row.kind == "checkpoint":
            checkpoints.append(row)
        else:
            grouped[row.kind] = row.path
    checkpoints.sort(key=lambda r: (_checkpoint_step(r), r.id))
    grouped["checkpoints"] = [r.path for r in checkpoints]
    return grouped


def _duration_s(run: RunRow) -> float | None:
    if run.started_at is None:
        return None
    if run.finished_at is not None:
        end = run.finished_at
    elif run.status == "running":
        end = utcnow()  # live elapsed time for a run in progress
    else:
        return None
    return round((end - run.started_at).total_seconds(), 3)


def run_summary(session: Session, run_id: str) -> dict[str, Any]:
    """Everything known about a run as plain JSON types: the `runs show --json` contract."""
    run = get_run(session, run_id)
    model = session.get(ModelRow, run.model_id) if run.model_id is not None else None
    dataset = session.get(DatasetRow, run.dataset_id) if run.dataset_id is not None else None
    metrics: dict[str, float | None] = dict.fromkeys(CORE_METRICS)
    metrics.update(latest_metrics(session, run.id))
    artifacts = list_artifacts(session, run.id)
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "backend": run.backend,
        "device": run.device,
        "backend_reason": run.backend_reason,
        "config": run.config,
        "output_dir": run.output_dir,
        "chat_template": run.chat_template,
        "step": run.step,
        "total_steps": run.total_steps,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "duration_s": _duration_s(run),
        "error": run.error,
        "model": None
        if model is None
        else {
            "path": model.path,
            "architecture": model.architecture,
            "num_params": model.num_params,
        },
        "dataset": None
        if dataset is None
        else {
            "path": dataset.path,
            "content_hash": dataset.content_hash,
            "format": dataset.format,
            "num_train": dataset.num_train,
            "num_valid": dataset.num_valid,
            "cache_key": dataset.cache_key,
            "stats": _json_safe(dataset.stats),
        },
        "metrics": metrics,
        "final_metrics": _json_safe(run.final_metrics),
        "peak_memory_bytes": run.peak_memory_bytes,
        "estimated_memory_bytes": run.estimated_memory_bytes,
        "memory_backoffs": run.memory_backoffs or [],
        "artifacts": _group_artifacts(artifacts),
        "artifact_list": [
            {"kind": a.kind, "path": a.path, "meta": a.meta, "created_at": _iso(a.created_at)} for a in artifacts
        ],
    }
