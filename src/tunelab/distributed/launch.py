"""``tunelab train --nproc N``: run the same command as N local processes (torchrun or mlx.launch).

torchrun itself (``python -m torch.distributed.run``) is started as a child,
rather than spawning workers with ``torch.multiprocessing``: it sets the
environment contract clusters use (``RANK``, ``WORLD_SIZE``, a free rendezvous
port with ``--standalone``), and when one worker fails it stops the others
instead of leaving them waiting in a collective; a signal it gets is passed on
to the workers, whose graceful stop (checkpoint, then exit) then works as with
one process.  So ``--nproc`` and a plain
``torchrun … -m tunelab train`` are the very same code path, and this
process, which never imports torch, stays a thin parent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tunelab.errors import ConfigError


def torchrun_command(nproc: int, tunelab_args: Sequence[str]) -> list[str]:
    """The command line that runs ``tunelab <tunelab_args>`` as ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "tunelab.distributed.torchrun_main",  # torchrun itself, minus its traceback around a worker's error
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tunelab",
        *tunelab_args,
    ]


def mlx_launch_command(nproc: int, tunelab_args: Sequence[str]) -> list[str]:
    """The ``mlx.launch`` command line (ring backend, this machine) for ``nproc`` MLX processes."""
    script = Path(sys.executable).with_name("mlx.launch")
    found = str(script) if script.is_file() else shutil.which("mlx.launch")
    if found is None:
        raise ConfigError("--nproc with backend: mlx runs mlx.launch, which is not installed", hint="pip install mlx")
    # mlx.launch relays the ranks' output through pipes and dies on a signal, which would cut the
    # ranks off mid-checkpoint: it starts with Ctrl-C and SIGTERM ignored (inherited across exec),
    # and each rank, which installs its own graceful-stop handlers, gets the signal directly.
    return [sys.executable, "-c", _IGNORE_STOP_SIGNALS, found, "-n", str(nproc), "--backend", "ring",
            sys.executable, "-m", "tunelab", *tunelab_args]  # fmt: skip


_IGNORE_STOP_SIGNALS = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
)


def launch(nproc: int, tunelab_args: Sequence[str], *, backend: str = "torch") -> int:
    """Run ``tunelab <tunelab_args>`` on ``nproc`` local processes; returns the launcher's exit code.

    ``backend: mlx`` runs ``mlx.launch`` (its ring backend); anything else torchrun.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be 1 or more (got {nproc})")
    if "WORLD_SIZE" in os.environ or "MLX_RANK" in os.environ:
        raise ConfigError("--nproc was given inside a launched worker", hint="use either a launcher or --nproc")
    if backend == "mlx":
        command = mlx_launch_command(nproc, tunelab_args)
    elif importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "--nproc runs the processes with torchrun, and torch is not installed", hint="pip install torch"
        )
    else:
        command = torchrun_command(nproc, tunelab_args)
    env = dict(os.environ)
    # N processes share the cores: one thread each unless the user chose otherwise.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The launcher gets a session of its own and every Ctrl-C or SIGTERM from here, exactly once:
    # it passes the signal to the workers, whose graceful stop checkpoints and ends the run.
    proc = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        if backend == "mlx":
            # mlx.launch (ignoring it) does not pass signals on: every process of its session gets it.
            _signal_group(proc.pid, signum)
        else:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        if backend == "mlx":
            _wait_for_group(proc.pid)  # ranks still checkpointing after the launcher itself ended
        return code
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, signum)


def _wait_for_group(pgid: int, timeout: float = 600.0) -> None:
    """Return once no process of the launcher's session is left (or after ``timeout`` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
