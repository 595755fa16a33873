"""Atomic, prunable checkpoints: ``OUTPUT_DIR/checkpoints/step-N/``.

A checkpoint is written into a hidden temp folder, flushed to disk, and only
then renamed into place, so a crash (even SIGKILL) leaves either the old set
of checkpoints or the new one, never a half-written ``step-N``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.backends.base import Backend
from tunelab.distributed.group import SOLO, Group

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything besides the backend's tensors needed to continue a run exactly."""

    step: int = 0
    cursor: int = 0  # micro-batches consumed; the data order is a function of (seed, epoch)
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    global_batch: int = 0  # rows per global micro-batch (batch_size × processes); 0 = older checkpoint
    micro_parts: int = 1  # pieces each micro-batch runs as, after out-of-memory back-offs (tunelab.train.backoff)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def save_checkpoint(root: Path, backend: Backend, state: TrainerState, *, keep: int, group: Group = SOLO) -> Path:
    """Write ``root/step-N`` atomically and delete all but the newest ``keep`` checkpoints.

    A backend whose weights are sharded over the processes (``collective_saves``:
    FSDP) is called on every rank, each writing its shards into rank 0's temp
    folder; rank 0 alone then adds the trainer state and renames the folder.
    """
    collective = bool(getattr(backend, "collective_saves", False)) and group.world > 1
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp-{group.broadcast(os.getpid()) if collective else os.getpid()}"
    if group.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if collective:
        group.barrier()  # the stale folder is gone before anyone writes into it
    backend.save_checkpoint(tmp)
    if collective:
        group.barrier()  # every shard is written
        if group.rank != 0:
            return final
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        stale = root / f".step-{state.step}.old-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp folders are ignored)."""
    steps = list_checkpoints(root)
    return steps[-1] if steps else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))


def prune(root: Path, keep: int) -> None:
    """Remove old checkpoints and temp folders left by crashed writers."""
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():
        if child.name.startswith(".step-") and f"-{os.getpid()}" not in child.name:
            shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms can't open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
