"""Atomic, prunable checkpoints: ``OUTPUT_DIR/checkpoints/step-N/``.

A checkpoint is written into a hidden temp folder, flushed to disk, and only
then renamed into place, so a crash (even SIGKILL) leaves either the old set
of checkpoints or the new one, never a half-written ``step-N``.  The last file
written before the rename is a manifest of every file's size and sha256
(:mod:`tunelab.train.manifest`), so a checkpoint damaged afterwards is noticed
on resume and the newest intact one is used instead.  A write that fails (a
full disk) removes its temp folder and says how much room the checkpoint needs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.backends.base import Backend
from tunelab.distributed.group import SOLO, Group
from tunelab.errors import StateError, StorageError, TunelabError
from tunelab.train.manifest import folder_bytes, verify, write_manifest

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
    sampler_rng: dict[str, Any] | None = None  # GRPO: the sampling stream's numpy bit-generator state

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def save_checkpoint(root: Path, backend: Backend, state: TrainerState, *, keep: int, group: Group = SOLO) -> Path:
    """Write ``root/step-N`` atomically and delete all but the newest ``keep`` checkpoints.

    A backend whose weights are sharded over the processes (``collective_saves``:
    FSDP) is called on every rank, each writing its shards into rank 0's temp
    folder; rank 0 alone then adds the trainer state and the manifest, and renames the folder.
    A failed write (a full disk) removes the temp folder and raises :class:`StorageError`.
    """
    collective = bool(getattr(backend, "collective_saves", False)) and group.world > 1
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp-{group.broadcast(os.getpid()) if collective else os.getpid()}"
    if group.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if collective:
        group.barrier()  # the stale folder is gone before anyone writes into it
    try:
        backend.save_checkpoint(tmp)
        if collective:
            group.barrier()  # every shard is written
            if group.rank != 0:
                return final
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        write_manifest(tmp)  # hashes and fsyncs every file; last, so its presence means the rest is complete
    except Exception as exc:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint would keep the disk full
        error = _write_failure(exc, root, final.name, written)
        if error is None:
            raise
        raise error from exc
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        stale = root / f".step-{state.step}.old-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (for this file system, or the process's file-size limit: ulimit -f)",
}
_OS_ERROR = re.compile(r"os error (\d+)")


def _write_failure(exc: Exception, root: Path, name: str, written: int) -> StorageError | None:
    """A :class:`StorageError` saying where, why and how much room is needed; None when not a write error.

    Loaders report a full disk in their own words (torch: ``inline_container.cc … unexpected pos``,
    safetensors: ``os error 28``, MLX: ``Unable to write``), so the free space decides when no errno is given.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    match = _OS_ERROR.search(str(exc))
    code = code if code is not None else int(match.group(1)) if match else None
    previous = latest_checkpoint(root)
    needed = folder_bytes(previous) if previous is not None else 0
    free = shutil.disk_usage(root).free
    if code in _FULL:
        why = _FULL[code]
    elif isinstance(exc, OSError | RuntimeError) or free < max(needed, written):
        why = f"no space left on device ({exc})" if free < max(needed, written) else f"the write failed ({exc})"
    else:
        return None  # not a write failure: a bug, shown as one
    size = f"~{_mb(needed)} MB" if needed else f"more than the {_mb(written)} MB written before it failed"
    kept = f"the run keeps {previous.name}" if previous is not None else "the run has no checkpoint yet"
    return StorageError(
        f"could not write checkpoint {name} at {root}: {why}; it needs {size} and {_mb(free)} MB are free there",
        hint=f"{kept}: free some space (or lower train.keep_checkpoints), then continue with `tunelab train --resume`",
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}" if size < 10e6 else f"{size / 1e6:.0f}"


@dataclass
class Resumed:
    """Where a resumed run continues from: the checkpoint loaded (None: the start) and those skipped, and why."""

    path: Path | None = None
    state: TrainerState = field(default_factory=TrainerState)
    skipped: list[str] = field(default_factory=list)


def resume_checkpoint(root: Path, load: Callable[[Path], None], *, tidy: bool = True) -> Resumed:
    """Load the newest checkpoint under ``root`` that verifies and loads, trying older ones in turn.

    ``load`` fills the backend from a folder.  With ``tidy`` (rank 0 only) stale temp folders are removed
    and a skipped checkpoint is renamed ``step-N.damaged``, so it is neither pruned in place of a good one
    nor tried again.  Checkpoints exist but none can be used: a :class:`StateError` naming each reason.
    """
    if tidy:
        remove_temps(root)
    resumed = Resumed()
    candidates = _step_dirs(root)
    for path in reversed(candidates):
        problem = _usable(path, load)
        if problem is None:
            resumed.path, resumed.state = path, read_state(path)
            return resumed
        note = f"skipped checkpoint {path.name}: {problem}"
        if tidy:
            aside = path.with_name(f"{path.name}.damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            note += f" (moved to {aside.name})"
        resumed.skipped.append(note)
    if candidates:
        raise StateError(
            f"no checkpoint in {root} can be resumed from: " + "; ".join(resumed.skipped),
            hint=f"to train this run again from the start, remove {root}",
        )
    return resumed


def _usable(path: Path, load: Callable[[Path], None]) -> str | None:
    """Why the checkpoint can't be resumed from, or None once it is loaded."""
    problem = verify(path)
    if problem is not None:
        return problem
    try:
        read_state(path)
        load(path)
    except TunelabError:  # the checkpoint is fine but doesn't fit this config: an older one won't either
        raise
    except Exception as exc:  # a loader's complaint about a damaged file (or a refused pickle)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"it could not be loaded ({type(exc).__name__}: {first})"
    return None


def remove_temps(root: Path) -> None:
    """Remove the temp folders of writers that crashed or ran out of space (their space is wasted)."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step-"):
                shutil.rmtree(child, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp folders are ignored)."""
    steps = list_checkpoints(root)
    return steps[-1] if steps else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [path for path in _step_dirs(root) if (path / STATE_FILE).is_file()]


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step-N`` folder, oldest first (complete or damaged)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def read_state(checkpoint: Path) -> TrainerState:
    """The trainer state saved with a checkpoint (a damaged file raises: :func:`resume_checkpoint` skips it)."""
    data = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        raise ValueError(f"{STATE_FILE} holds no trainer state")
    return TrainerState.from_dict(data)


def prune(root: Path, keep: int) -> None:
    """Remove old checkpoints and temp folders left by crashed writers."""
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():
        if child.name.startswith(".step-") and f"-{os.getpid()}" not in child.name:
            shutil.rmtree(child, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms can't open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
