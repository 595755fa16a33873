"""How progress leaves the trainer: callbacks, and the file writers every run gets.

The loop calls these hooks and knows nothing of terminals, databases or
TensorBoard; the service layer decides which callbacks a run has.

A step of a small model takes milliseconds, so a callback that writes per step
(a file append, a database commit) costs as much as the step.  Writers therefore
buffer and write every :data:`FLUSH_EVERY_S` seconds; the loop calls ``flush``
before every checkpoint and when it ends, so a checkpoint never covers a step
whose metrics were not written, and a crash loses at most the rows a resume
logs again anyway (the steps after the last checkpoint).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tunelab.train.backoff import Backoff


class Callback(Protocol):
    """Hooks the loop calls; every method is optional in practice (see :class:`BaseCallback`)."""

    def on_start(self, *, step: int, total_steps: int) -> None: ...
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None: ...
    def on_backoff(self, backoff: Backoff) -> None: ...
    def flush(self) -> None: ...
    def on_end(self, *, step: int, status: str) -> None: ...


FLUSH_EVERY_S = 2.0
"""How long buffered metrics may wait before they are written (the dashboard and `runs show` lag by this much)."""


class Due:
    """True at the first call, then once every ``every_s`` seconds: when a buffering callback writes.

    The first step is written at once, so a watcher (the dashboard, `runs show`) sees a run start training.
    """

    def __init__(self, every_s: float = FLUSH_EVERY_S) -> None:
        self.every_s = every_s
        self._last = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True


class BaseCallback:
    """No-op implementations so a callback only writes the hooks it needs.

    ``every_rank``: with several processes, only rank 0 reports progress, so callbacks
    reach rank 0 alone, unless they set this (one that controls its own process, such
    as the CLI's Ctrl-C switch, must know on every rank when training starts).
    """

    every_rank = False

    def on_start(self, *, step: int, total_steps: int) -> None:
        pass

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_message(self, text: str) -> None:
        pass

    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Answers to the run's sample prompts at ``step`` (``prompt``, ``answer``); by default ignored."""

    def on_backoff(self, backoff: Backoff) -> None:
        """An out-of-memory step is retried on smaller pieces; by default, say so as a message."""
        self.on_message(
            f"step {backoff.step} ran out of memory ({backoff.reason}); retrying it with micro-batch "
            f"{backoff.micro_batch_size} × grad_accum {backoff.grad_accum} (same effective batch)"
        )

    def flush(self) -> None:
        """Write out whatever is buffered: the loop calls this before a checkpoint and when it ends."""

    def on_end(self, *, step: int, status: str) -> None:
        pass


class CallbackList(BaseCallback):
    """Fan one hook call out to many callbacks."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)

    def on_start(self, *, step: int, total_steps: int) -> None:
        for cb in self.callbacks:
            cb.on_start(step=step, total_steps=total_steps)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_metrics(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def on_message(self, text: str) -> None:
        for cb in self.callbacks:
            cb.on_message(text)

    def on_backoff(self, backoff: Backoff) -> None:
        for cb in self.callbacks:
            cb.on_backoff(backoff)

    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_samples"):  # a plain object with some of the hooks is a callback too
                cb.on_samples(step, samples)

    def flush(self) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "flush"):  # a plain object with some of the hooks is a callback too
                cb.flush()

    def on_end(self, *, step: int, status: str) -> None:
        for cb in self.callbacks:
            cb.on_end(step=step, status=status)


class MetricsFile(BaseCallback):
    """Append metrics to ``metrics.jsonl``; on resume, drop rows past the checkpoint (they will be redone).

    Rows are buffered and appended every ``every_s`` seconds, at ``flush`` and at the end.
    """

    def __init__(self, path: Path, every_s: float = FLUSH_EVERY_S) -> None:
        self.path = path
        self._due = Due(every_s)
        self._pending: list[str] = []

    def on_start(self, *, step: int, total_steps: int) -> None:
        self._pending.clear()
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._pending.append(json.dumps({"step": step, **metrics}) + "\n")
        if self._due():
            self.flush()

    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """A row of its own: ``{"step": N, "samples": [{"prompt", "answer"}, …]}``."""
        self._pending.append(json.dumps({"step": step, "samples": samples}, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if not self._pending:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(self._pending))
        self._pending.clear()

    def on_end(self, *, step: int, status: str) -> None:
        self.flush()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0
