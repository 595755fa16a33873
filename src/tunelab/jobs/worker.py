"""`tunelab worker`: claim jobs one at a time and run each in a child process (or N ranks, see ranks.py).

The worker holds a job's lease by heart-beating while its child trains, turns
a cancel request into a clean stop (the child checkpoints and exits), and on
its own SIGTERM/Ctrl-C stops the child the same way and puts the job back in
the queue for another worker to resume.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import OperationalError

from tunelab.errors import TunelabError
from tunelab.jobs import queue
from tunelab.jobs.child import EXIT_STOPPED, Work
from tunelab.jobs.ranks import LaunchedJob, job_nproc
from tunelab.registry.db import session_scope
from tunelab.vocab import RUN_OWNING_KINDS


@dataclass(frozen=True)
class WorkerOptions:
    """How often to beat, when a silent worker counts as dead, how long to wait for work."""

    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    poll_s: float = 1.0
    max_jobs: int | None = None  # stop after this many jobs (None: run until stopped)
    exit_when_idle: bool = False
    nproc: int = 1  # processes this machine offers a job (torchrun / mlx.launch ranks); one job at a time


def new_worker_id() -> str:
    """host:pid:random — readable in `jobs list` and unique across machines."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:4]}"


def _context() -> Any:
    # forkserver: children start from a clean, single-threaded process that has
    # already imported tunelab, so they are fast and never inherit our threads.
    if sys.platform != "win32" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tunelab.services", "tunelab.jobs.child"])
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class _Stop:
    """Ask a running job to checkpoint and stop (``request``); calling it says whether that was asked."""

    request: Callable[[], None]
    requested: Callable[[], bool]

    def __call__(self) -> bool:
        return self.requested()


class Worker:
    """One worker: one job at a time (one per device)."""

    def __init__(
        self, options: WorkerOptions, *, work: Work, worker_id: str | None = None, say: Callable[[str], None] = print
    ):
        self.options = options
        self.work = work  # what a job does (services.run_job), run in the child
        self.worker_id = worker_id or new_worker_id()
        self.say = say
        self.stopping = False
        self._ctx = _context()

    def request_stop(self, *_: Any) -> None:
        """Finish (checkpoint) the current job, hand it back to the queue, and exit."""
        self.stopping = True

    def run(self) -> int:
        """Claim and run jobs until stopped; returns how many jobs it ran."""
        done = 0
        self.say(f"worker {self.worker_id} waiting for jobs")
        while not self.stopping and (self.options.max_jobs is None or done < self.options.max_jobs):
            try:
                job = queue.claim(self.worker_id, stale_after=self.options.stale_after_s, max_nproc=self.options.nproc)
            except OperationalError as exc:  # the DB restarting or unreachable for a moment: wait, don't die
                self.say(f"registry unavailable ({type(exc.orig).__name__}); retrying")
                time.sleep(max(self.options.poll_s, 1.0))
                continue
            if job is None:
                if self.options.exit_when_idle:
                    break
                time.sleep(self.options.poll_s)
                continue
            self.run_job(job)
            done += 1
        return done

    def run_job(self, job: queue.Claimed) -> str:
        """Run a claimed job in a child process (or its ranks, for several) to its end; returns its new status."""
        nproc = job_nproc(job.nproc, self.options.nproc) if job.kind == "train" else 1
        note = f" (attempt {job.attempts}, resuming)" if job.attempts > 1 else ""
        on = f" on {nproc} processes" if nproc > 1 else ""
        self.say(f"job {job.id} ({job.kind}{f', run {job.run_id}' if job.run_id else ''}) started{on}{note}")
        try:
            proc, stop = self._start(job, nproc)
        except (TunelabError, OSError) as exc:  # e.g. torch or mlx.launch missing on this machine
            queue.finish(job.id, self.worker_id, "failed", error=str(exc))
            self.say(f"job {job.id} failed: {exc}")
            return "failed"
        try:
            lost = self._supervise(job.id, proc, stop)
            stop_requested = stop()
        finally:
            if isinstance(proc, LaunchedJob):
                proc.cleanup()
        if lost:
            self.say(f"job {job.id}: lease lost to another worker; stopped our copy")
            return "lost"
        status, error = self._outcome(job.id, proc.exitcode, stop_requested)
        queue.finish(job.id, self.worker_id, status, error=error)
        if status == "failed" and error is None:
            error = self._job(job.id).error  # written by the child (rank 0) that saw the exception
        self.say(f"job {job.id} {status}" + (f": {error}" if error else ""))
        return status

    def _start(self, job: queue.Claimed, nproc: int) -> tuple[Any, _Stop]:
        """The job's process: a forkserver child, or torchrun / mlx.launch with ``nproc`` ranks."""
        from tunelab.jobs import child

        if nproc > 1:
            backend = str(job.config.get("backend") or "torch")
            ranks = LaunchedJob(nproc, job.id, job.run_id, backend=backend)
            return ranks, _Stop(ranks.request_stop, ranks.stop_requested)
        event = self._ctx.Event()
        run_id = job.run_id if job.kind in RUN_OWNING_KINDS else None  # an eval job's events are its own
        proc = self._ctx.Process(
            target=child.main, args=(self.work, job.id, run_id, event), name=f"tunelab-job-{job.id}"
        )
        proc.start()
        return proc, _Stop(event.set, event.is_set)

    def _supervise(self, job_id: str, proc: Any, stop: _Stop) -> bool:
        """Beat while the child runs; returns True when the lease was lost (the child was killed)."""
        while proc.is_alive():
            proc.join(self.options.heartbeat_s)
            try:
                state = queue.heartbeat(job_id, self.worker_id)
            except OperationalError:
                continue  # a missed beat; the lease only lapses after stale_after of them
            if state == "lost":
                proc.kill()
                proc.join()
                return True
            if (state == "cancel" or self.stopping) and not stop():
                stop.request()
        return False

    def _outcome(self, job_id: str, code: int | None, stop_requested: bool) -> tuple[str, str | None]:
        if code == 0:
            return "completed", None
        if code == EXIT_STOPPED:
            # Our own shutdown hands the job back; a user's cancel ends it.
            return ("queued", None) if self.stopping and not self._cancel_requested(job_id) else ("cancelled", None)
        return "failed", None if code == 1 else f"the job's process died (exit code {code})"

    def _cancel_requested(self, job_id: str) -> bool:
        return bool(self._job(job_id).cancel_requested)

    def _job(self, job_id: str) -> Any:
        from tunelab.registry import jobs_repo
        from tunelab.registry.db import open_registry

        with session_scope(open_registry()) as s:
            return jobs_repo.get_job(s, job_id)


def run_worker(options: WorkerOptions, *, work: Work, say: Callable[[str], None] = print) -> int:
    """Run a worker in this process until SIGTERM/Ctrl-C (or the options say stop); returns jobs run."""
    worker = Worker(options, work=work, say=say)
    previous = {sig: signal.signal(sig, worker.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return worker.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
