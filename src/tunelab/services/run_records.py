"""A run's progress mirrored into the registry: metrics rows, the current step, checkpoints, back-offs.

A registry write is a database transaction with a commit to disk; one per step
costs a small model as much as the step itself.  Metrics are therefore kept in
memory and written in one transaction every few seconds, and whenever the loop
flushes (before every checkpoint, and when it ends however it ends).  Each row
keeps the time its step logged it.  A crash loses only rows of steps after the
last checkpoint, which a resume trains and logs again (``on_start`` deletes any
that were written).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.registry.tables import utcnow
from tunelab.train.backoff import Backoff
from tunelab.train.callbacks import FLUSH_EVERY_S, BaseCallback, Due
from tunelab.train.checkpoint import list_checkpoints


class RegistryCallback(BaseCallback):
    """Mirror metrics and checkpoints into the registry, metrics in batches."""

    def __init__(self, run_id: str, every_s: float = FLUSH_EVERY_S) -> None:
        self.run_id = run_id
        self._due = Due(every_s)
        self._pending: list[tuple[int, dict[str, float], datetime]] = []

    def on_start(self, *, step: int, total_steps: int) -> None:
        self._pending.clear()
        with session_scope(open_registry()) as s:
            repo.delete_metrics_after(s, run_id=self.run_id, step=step)
            repo.update_run(s, self.run_id, step=step, total_steps=total_steps)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._pending.append((step, metrics, utcnow()))
        if self._due():
            self.flush()

    def flush(self) -> None:
        """One transaction for every buffered step, and the run's step set to the newest of them."""
        if not self._pending:
            return
        with session_scope(open_registry()) as s:
            repo.add_metric_steps(s, run_id=self.run_id, steps=self._pending)
            repo.update_run(s, self.run_id, step=self._pending[-1][0])
        self._pending.clear()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        with session_scope(open_registry()) as s:
            live = {str(p) for p in list_checkpoints(path.parent)}
            for row in repo.list_artifacts(s, self.run_id):
                if row.kind == "checkpoint" and row.path not in live:
                    repo.remove_artifact(s, run_id=self.run_id, kind="checkpoint", path=row.path)
            repo.add_artifact(s, run_id=self.run_id, kind="checkpoint", path=str(path), meta={"step": step})

    def on_backoff(self, backoff: Backoff) -> None:
        with session_scope(open_registry()) as s:
            done = list(repo.get_run(s, self.run_id).memory_backoffs or [])
            repo.update_run(s, self.run_id, memory_backoffs=[*done, asdict(backoff)])

    def on_end(self, *, step: int, status: str) -> None:
        self.flush()
