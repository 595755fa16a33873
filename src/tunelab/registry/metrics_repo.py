"""Per-step metrics of runs: written in batches by the training process, read by every interface."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from tunelab.registry.tables import MetricRow, utcnow

# Always present in run_summary()["metrics"] so consumers needn't test for keys.
CORE_METRICS = ("train_loss", "val_loss", "tokens_per_sec")


def finite(value: float | None) -> float | None:
    """``value``, or None when it is NaN or infinite."""
    # NaN/inf are not valid JSON and SQLite stores NaN as NULL anyway, so the
    # registry uses NULL/None for "not a finite number" everywhere.
    if value is None or not math.isfinite(value):
        return None
    return value


def add_metrics(
    session: Session, *, run_id: str, step: int, values: dict[str, float], at: datetime | None = None
) -> None:
    """Log scalars for one step; non-finite values are stored as NULL.

    ``at``: when the step logged them (rows written in a batch keep their own times), default now.
    """
    if not values:
        return
    now = at or utcnow()
    add_metric_steps(session, run_id=run_id, steps=[(step, values, now)])


def add_metric_steps(session: Session, *, run_id: str, steps: Sequence[tuple[int, dict[str, float], datetime]]) -> None:
    """Log the scalars of many steps, ``(step, values, logged at)`` each, with one statement."""
    rows = [
        {"run_id": run_id, "step": int(step), "name": name, "value": finite(float(v)), "created_at": at}
        for step, values, at in steps
        for name, v in values.items()
    ]
    if rows:
        session.execute(insert(MetricRow), rows)


def latest_metrics(session: Session, run_id: str) -> dict[str, float | None]:
    """For each metric name, its value at the highest step (last write wins on ties)."""
    # Max step per name, joined back to its rows: uses the (run_id, step) index
    # and is about twice as fast on SQLite as a row_number() window.
    top = (
        select(MetricRow.name, func.max(MetricRow.step).label("step"))
        .where(MetricRow.run_id == run_id)
        .group_by(MetricRow.name)
        .subquery()
    )
    stmt = (
        select(MetricRow.name, MetricRow.value)
        .join(top, (MetricRow.name == top.c.name) & (MetricRow.step == top.c.step))
        .where(MetricRow.run_id == run_id)
        .order_by(MetricRow.id)  # a step logged twice: the later row overwrites below
    )
    return {name: value for name, value in session.execute(stmt)}


def metric_history(session: Session, run_id: str) -> list[dict[str, Any]]:
    """All logged points as ``{"step", "name", "value"}``, in step order (for plots/exports)."""
    stmt = (
        select(MetricRow.step, MetricRow.name, MetricRow.value)
        .where(MetricRow.run_id == run_id)
        .order_by(MetricRow.step, MetricRow.id)
    )
    return [{"step": s, "name": n, "value": v} for s, n, v in session.execute(stmt)]


def delete_metrics_after(session: Session, *, run_id: str, step: int) -> None:
    """Forget metrics logged after ``step``: a resumed run redoes those steps and logs them again."""

    session.execute(delete(MetricRow).where(MetricRow.run_id == run_id, MetricRow.step > step))
