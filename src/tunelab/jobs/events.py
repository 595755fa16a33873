"""A run's progress as ``metric``, ``log`` and ``status`` events: what `jobs logs` and the WebSocket replay.

Every run writes them, whether a worker trains it for a job or `tunelab train`
runs it in the foreground, so a client watching ``/v1/runs/ID/events`` sees the
same stream for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.train.callbacks import FLUSH_EVERY_S, BaseCallback, Due


class EventCallback(BaseCallback):
    """Training progress as events of a job (``job_id``) and/or a run.

    Metric events are buffered and written in one transaction every few seconds
    (a commit per step would cost a small model as much as its step); a log
    event is written at once, after the metrics before it, so order is kept.
    A job's status events come from the queue as it moves the job; a run with no
    job (``job_id=None``) gets its ``running`` and final status from here.
    """

    def __init__(self, job_id: str | None, run_id: str | None, every_s: float = FLUSH_EVERY_S) -> None:
        self.job_id, self.run_id = job_id, run_id
        self._due = Due(every_s)
        self._pending: list[tuple[str, dict[str, Any]]] = []

    def on_start(self, *, step: int, total_steps: int) -> None:
        if self.job_id is None:
            self._pending.append(("status", {"status": "running"}))
            self.flush()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._pending.append(("metric", {"step": step, **metrics}))
        if self._due():
            self.flush()

    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self._pending.append(("samples", {"step": step, "samples": samples}))
        self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._log(f"checkpoint saved at step {step}")

    def on_message(self, text: str) -> None:
        self._log(text)

    def on_end(self, *, step: int, status: str) -> None:
        if self.job_id is None:
            self._pending.append(("status", {"status": status}))
        self.flush()

    def _log(self, text: str) -> None:
        self._pending.append(("log", {"text": text}))
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        from tunelab.registry import jobs_repo
        from tunelab.registry.db import open_registry, session_scope

        with session_scope(open_registry()) as s:
            jobs_repo.add_events(s, self._pending, job_id=self.job_id, run_id=self.run_id)
        self._pending.clear()
