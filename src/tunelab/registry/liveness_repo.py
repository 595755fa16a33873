"""Which process owns a run, and marking the runs whose process is gone.

Kept apart from :mod:`tunelab.registry.repo` (already the size a module should
stay under); the same rules apply: callers own the session, functions only flush.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from tunelab.registry.tables import RunRow, utcnow


def running_on(session: Session, host: str) -> list[RunRow]:
    """Runs recorded as ``running`` by a process on ``host`` (runs of other hosts can't be checked from here)."""
    stmt = select(RunRow).where(RunRow.status == "running", RunRow.owner_host == host, RunRow.owner_pid.is_not(None))
    return list(session.scalars(stmt))


def fail_orphan(session: Session, *, run_id: str, owner_pid: int, error: str) -> bool:
    """Mark a run ``failed`` if it is still ``running`` under ``owner_pid``; False when that changed meanwhile.

    One conditional UPDATE, so a run that finished, or was resumed by another process, in between is left alone.
    """
    stmt = (
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.status == "running", RunRow.owner_pid == owner_pid)
        .values(status="failed", error=error, finished_at=utcnow())
    )
    result = cast(CursorResult[Any], session.execute(stmt))
    return result.rowcount == 1
