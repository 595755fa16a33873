"""What runs inside a job's child process.

The worker starts this through a ``forkserver`` that has already imported
tunelab, so a child starts in milliseconds and a crash in training (even a
segfault) only ends the child.  If the worker itself dies, the child exits at
once (it watches the worker's sentinel): a job must never have two trainers
writing one output folder after another worker takes it over.

What a job *does* is handed in as ``work`` (the services' ``run_job``): the
queue machinery runs use cases without importing them.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.jobs.events import EventCallback
from tunelab.jobs.processes import process_exists
from tunelab.settings import quiet_libraries
from tunelab.train.callbacks import BaseCallback

EXIT_STOPPED = 75
"""The child stopped early on request (cancel, or the worker shutting down) after saving a checkpoint."""
EXIT_FAILED = 1
EXIT_ORPHANED = 70

Work = Callable[..., str]
"""``work(job_id, callbacks=..., should_stop=...)`` does a claimed job; returns ``completed`` or ``stopped``."""


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the worker's end of the sentinel pipe closes, i.e. the worker is gone
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="tunelab-parent-watch", daemon=True).start()


def main(work: Work, job_id: str, run_id: str | None, stop: Any) -> None:
    """Run one job; the exit code tells the worker how it ended (0, EXIT_STOPPED or EXIT_FAILED)."""
    quiet_libraries()
    _exit_with_parent()
    os._exit(_run(work, job_id, run_id, stop.is_set, record_errors=True))


def rank_main(work: Work, job_id: str, run_id: str | None) -> None:
    """One rank of a job the worker launched on several processes (see ``tunelab.jobs.ranks``)."""
    from tunelab.distributed.group import rank_from_env
    from tunelab.jobs.ranks import STOP_FILE_ENV, WORKER_PID_ENV

    quiet_libraries()
    _exit_with_launcher(int(os.environ[WORKER_PID_ENV]))
    stop_file = Path(os.environ[STOP_FILE_ENV])
    # Only rank 0 writes to the registry, a failure's reason included.
    os._exit(_run(work, job_id, run_id, stop_file.exists, record_errors=rank_from_env() == 0))


def _exit_with_launcher(worker_pid: int) -> None:
    """Exit when the launcher (our parent) or the worker is gone: its job may be another worker's by now."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher and process_exists(worker_pid):
            time.sleep(0.5)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="tunelab-launcher-watch", daemon=True).start()


def _run(work: Work, job_id: str, run_id: str | None, should_stop: Callable[[], bool], *, record_errors: bool) -> int:
    from tunelab.registry import jobs_repo
    from tunelab.registry.db import open_registry, session_scope

    callbacks: Sequence[BaseCallback] = [EventCallback(job_id, run_id)]
    try:
        status = work(job_id, callbacks=callbacks, should_stop=should_stop)
    except BaseException as exc:
        if record_errors:
            # Events and the job's error reach API clients: the message only. A bug's traceback (server
            # paths and all) goes to this process's stderr, which is the worker's own log.
            if isinstance(exc, TunelabError):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {exc} (a bug in tunelab: the worker's log has the traceback)"
                traceback.print_exc()
            with session_scope(open_registry()) as s:
                jobs_repo.set_job_error(s, job_id, reason)
                jobs_repo.add_event(
                    s, type="log", data={"text": reason, "level": "error"}, job_id=job_id, run_id=run_id
                )
        return EXIT_FAILED
    return 0 if status == "completed" else EXIT_STOPPED
