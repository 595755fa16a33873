"""A job on several processes: the worker starts torchrun (or mlx.launch) with one rank per process.

The ranks run ``tunelab jobs run-rank JOB_ID`` — the same ``services.run_job``
as a one-process child, so rank 0 alone writes the registry (records, metrics,
checkpoints) as with ``tunelab train --nproc``.  The worker never signals the
ranks: a cancel (or the worker stopping) creates a *stop file* every rank
polls once per step, so all of them checkpoint at the same step and exit
``EXIT_STOPPED`` without torchrun's 30 s kill timer running.  A rank exits at
once when its launcher or the worker disappears, so a job taken over by
another worker never has two trainers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tunelab.errors import ConfigError

STOP_FILE_ENV = "TUNELAB_JOB_STOP_FILE"
WORKER_PID_ENV = "TUNELAB_JOB_WORKER_PID"


def parse_nproc(text: str | int, *, flag: str = "--nproc") -> int:
    """``N`` (1 or more) or ``auto`` (stored as 0: every process its worker offers)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number of processes or auto (got {text!r})") from None
    if value < 1:
        raise ConfigError(f"{flag} must be 1 or more, or auto (got {value})")
    return value


def cuda_gpu_count() -> int:
    """CUDA GPUs this machine offers, without importing torch (``CUDA_VISIBLE_DEVICES`` first, then nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def offered_nproc(text: str) -> int:
    """What ``tunelab worker --nproc N|auto`` offers: N, or one per CUDA GPU (1 without any)."""
    value = parse_nproc(text)
    return value if value > 0 else max(1, cuda_gpu_count())


def job_nproc(asked: int, offered: int) -> int:
    """Processes a job runs on: what it asked for, or (``auto``) all the worker offers."""
    return asked if asked > 0 else offered


def rank_command(nproc: int, job_id: str, run_id: str | None, *, backend: str) -> list[str]:
    """torchrun's (or, for ``backend: mlx``, mlx.launch's) command line running the job's ranks."""
    from tunelab.distributed.launch import mlx_launch_command, torchrun_command

    args = ["jobs", "run-rank", job_id, *([run_id] if run_id else [])]
    if backend == "mlx":
        return mlx_launch_command(nproc, args)
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"this job asks for {nproc} processes (torchrun), and torch is not installed")
    return torchrun_command(nproc, args)


class LaunchedJob:
    """The ranks of one job under their launcher; shaped like the one-process child for the worker."""

    def __init__(self, nproc: int, job_id: str, run_id: str | None, *, backend: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"tunelab-job-{job_id}-"))
        self.stop_file = self._dir / "stop"
        env = {**os.environ, STOP_FILE_ENV: str(self.stop_file), WORKER_PID_ENV: str(os.getpid())}
        # N processes share the cores: one thread each unless the user chose otherwise (as --nproc does).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        command = rank_command(nproc, job_id, run_id, backend=backend)
        # A session of its own: the worker's Ctrl-C must not reach the ranks; they stop by the stop file.
        self._proc = subprocess.Popen(command, env=env, start_new_session=True)

    def request_stop(self) -> None:
        """Every rank checkpoints and exits after the step it is on."""
        self.stop_file.touch()

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)

    def kill(self) -> None:
        """Kill the launcher at once; its ranks see it gone and exit (they watch their parent)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll()

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
