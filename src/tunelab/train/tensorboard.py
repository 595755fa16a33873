"""TensorBoard event files written with the `tensorboard` package alone (no torch or TF needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab.train.callbacks import BaseCallback


class TensorBoardCallback(BaseCallback):
    """One scalar series per metric under ``OUTPUT_DIR/tensorboard``."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._writer: Any = None

    def on_start(self, *, step: int, total_steps: int) -> None:
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:  # optional: metrics.jsonl and the registry still have everything
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)

    def on_end(self, *, step: int, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
