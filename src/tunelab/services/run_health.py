"""What is gone from under a run: the process training it, or the folder holding its results.

A SIGKILLed or crashed `tunelab train` can't record its own end.
A run records the pid and host of the process training it when it starts.  When
runs are listed, shown or resumed, a ``running`` run on this host whose process
no longer exists is marked ``failed`` with the reason and the resume hint (jobs
have the same through their workers' heartbeats).  A run whose process still
exists, or that runs on another host, is never touched.

A run's folder deleted or moved after it finished leaves the registry pointing at
nothing: `runs show` lists what is gone, and export/generate say so instead of
failing somewhere inside a loader.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from tunelab.errors import StateError
from tunelab.jobs.processes import process_exists
from tunelab.registry import liveness_repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services.views import RunView


def owner() -> dict[str, int | str]:
    """The run columns naming this process as the run's owner."""
    return {"owner_pid": os.getpid(), "owner_host": socket.gethostname()}


def fail_orphaned_runs() -> list[str]:
    """Mark the ``running`` runs of this host whose process is gone as ``failed``; returns their ids."""
    marked = []
    with session_scope(open_registry()) as s:
        for run in liveness_repo.running_on(s, socket.gethostname()):
            pid = run.owner_pid
            if pid is None or process_exists(pid):
                continue
            error = (
                f"its process ({pid} on {run.owner_host}) ended without recording how the run finished "
                f"(killed, or out of memory); continue it with `tunelab train --resume {run.id}`"
            )
            if liveness_repo.fail_orphan(s, run_id=run.id, owner_pid=pid, error=error):
                marked.append(run.id)
    return marked


def refuse_if_training(run_id: str, pid: int | None, host: str | None) -> None:
    """A run still trained by a live process here must not be resumed by a second one (they'd share checkpoints)."""
    if pid is not None and host == socket.gethostname() and pid != os.getpid() and process_exists(pid):
        raise StateError(
            f"run {run_id} is still training (process {pid} on {host})",
            hint=f"stop it first (Ctrl-C where it runs, or kill {pid}), then resume it",
        )


def missing_files(summary: RunView | dict[str, Any]) -> list[str]:
    """The run's folder and recorded results that are no longer on disk (deleted or moved)."""
    output_dir = Path(summary["output_dir"])
    if not output_dir.is_dir():
        return [str(output_dir)]
    results = [summary["artifacts"].get(kind) for kind in ("adapter", "model")]
    return [path for path in results if path and not Path(path).exists()]


def require_files(summary: RunView | dict[str, Any], use: str) -> None:
    """Refuse to ``use`` (export, generate with) a run whose folder or result is gone, saying which."""
    gone = missing_files(summary)
    if gone:
        run_id = summary["id"]
        raise StateError(
            f"can't {use} run {run_id}: {gone[0]} is gone (deleted or moved since the run wrote it)",
            hint=f"put it back where it was; `tunelab runs show {run_id}` lists what the run recorded",
        )
