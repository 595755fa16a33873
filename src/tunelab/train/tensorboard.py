"""TensorBoard event files written with the `tensorboard` package alone (no torch or TF needed).

Events are built and handed to the writer in batches (every few seconds, at
``flush`` before a checkpoint and at the end), and the writer is flushed then,
so a small model's steps don't each pay for protobufs and a queue hand-off.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunelab.train.callbacks import FLUSH_EVERY_S, BaseCallback, Due


class TensorBoardCallback(BaseCallback):
    """One scalar series per metric under ``OUTPUT_DIR/tensorboard``."""

    def __init__(self, logdir: Path, every_s: float = FLUSH_EVERY_S) -> None:
        self.logdir = logdir
        self._writer: Any = None
        self._due = Due(every_s)
        self._pending: list[tuple[float, int, dict[str, float]]] = []

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
        self._pending.append((time.time(), step, metrics))
        if self._due():
            self.flush()

    def on_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """The sample answers as one Markdown table in TensorBoard's Text tab, at their step."""
        if self._writer is None:
            return
        import numpy as np
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text import metadata
        from tensorboard.util import tensor_util

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        table = "| prompt | answer |\n|---|---|\n" + "".join(
            f"| {cell(s['prompt'])} | {cell(s['answer'])} |\n" for s in samples
        )
        value = summary_pb2.Summary.Value(
            tag="samples",
            metadata=metadata.create_summary_metadata(display_name=None, description=None),
            tensor=tensor_util.make_tensor_proto(np.array(table, dtype=object)),
        )
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value]))
        self._writer.add_event(event)

    def flush(self) -> None:
        if self._writer is None or not self._pending:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        for wall_time, step, metrics in self._pending:
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
            self._writer.add_event(
                event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=values))
            )
        self._pending.clear()
        self._writer.flush()

    def on_end(self, *, step: int, status: str) -> None:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None
