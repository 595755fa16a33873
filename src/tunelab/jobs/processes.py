"""Whether a process on this machine is still alive: one check for every place that asks.

A job's rank processes watch their worker with it, the run-health sweep asks it
of a run's recorded owner, and the upload sweep of an upload's writer.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a live process here (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): the signal check is all there is
        return True
    return state not in ("Z", "X")
