"""torch's intra-op threads on a CPU, fitted to the cores the rest of the machine leaves free.

torch starts one intra-op thread per core; each op splits its work across them and waits for the
last.  When another process keeps a core busy, the thread on that core is descheduled and every op
waits for it, so a small model's step collapses.  Measured on this project's 2-core machine (a
2-layer hidden-64 Llama, LoRA, batch 16, ``bench/small_steps_cpu.py``): beside one busy process
11,892 tokens/s with 2 threads vs 21,187 with 1; quiet, 2 threads 22,261 vs 18,623.  So every few
seconds the step looks at how much CPU time other processes took since the last look (the machine's
busy time in ``/proc/stat`` minus this process's own) and uses the cores left, at least one and at
most what torch started with.  ``OMP_NUM_THREADS`` (or ``torch.set_num_threads`` before training)
keeps a fixed count; machines where ``/proc/stat`` doesn't describe this process's cores (another OS,
a container that sees its host's CPUs, a narrowed CPU affinity) keep torch's own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
INTERVAL_S = 2.0
# What torch had before tunelab first changed the count in this process, and what tunelab last set:
# a later run in the same process (the service's worker, a test session) finding the count tunelab
# left starts again from the original, instead of reading a lowered count as the user's choice.
_original: int | None = None
_last_set: int | None = None


def threads_for(cores: int, most: int, others_busy: float) -> int:
    """Intra-op threads for ``cores`` when other processes keep ``others_busy`` cores busy on average."""
    free = cores - max(0.0, others_busy)
    return max(1, min(most, int(free + 0.5)))


def _machine_busy_s() -> float:
    """Seconds of CPU time all processes have used since boot (user, nice, system, irq, softirq, steal)."""
    ticks = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]  # not idle (3) or iowait (4)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system


def _describes_this_process() -> bool:
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return False
    listed = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return listed == os.cpu_count() == len(os.sched_getaffinity(0))


class CpuThreads:
    """Call :meth:`tick` once per step; it adjusts ``torch.set_num_threads`` at most every ``INTERVAL_S``."""

    def __init__(self) -> None:
        self.most = torch.get_num_threads()
        if _original is not None and self.most == _last_set:  # left so by an earlier run here, not by the user
            self.most = _original
            torch.set_num_threads(_original)
        self.cores = os.cpu_count() or 1
        fixed = "OMP_NUM_THREADS" in os.environ or self.most != self.cores  # the user chose a count
        self.enabled = not fixed and self.cores > 1 and _describes_this_process()
        self._last = self._sample() if self.enabled else (0.0, 0.0, 0.0)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        return time.monotonic(), _machine_busy_s(), _own_busy_s()

    def tick(self) -> None:
        if not self.enabled or time.monotonic() - self._last[0] < INTERVAL_S:
            return
        now = self._sample()
        wall = now[0] - self._last[0]
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        want = threads_for(self.cores, self.most, others)
        if want != torch.get_num_threads():
            log.info("cpu threads: %d (other processes kept %.1f of %d cores busy)", want, others, self.cores)
            self.apply(want)

    def apply(self, count: int) -> None:
        """Set torch's intra-op threads to ``count``, remembering torch's own count for later runs here."""
        global _original, _last_set
        if _original is None:
            _original = self.most
        _last_set = count
        torch.set_num_threads(count)
