"""What the host was doing while the GPU had no kernel running: step_profile.py's two timelines, read together.

    python3 bench/gpu_gaps.py $OUT/kernels_qlora_gc.csv.gz --steps 3
    python3 bench/gpu_gaps.py kernels_qlora_gc.csv.gz --host host_qlora_gc.csv.gz --min-us 100 --top 25

``step_profile.py`` writes every GPU kernel, copy and fill of its profiled steps (``kernels_<row>.csv.gz``)
and the host's ops, CUDA calls and, with ``--stack``, Python functions on the same clock
(``host_<row>.csv.gz``, found beside the first by name).  A step that waits on its host shows as time with
no kernel running on any stream.  This prints how much there was, in gaps of what size, the kernels on
either side of the longest ones, and, over every gap of at least ``--min-us``, which host events ran on the
training thread meanwhile: by the innermost event (exclusive: where the host's time went) and by every
enclosing one (inclusive: which part of the step it was in, e.g. ``_CheckpointedLayerBackward`` or the
optimizer's step).  Copies are not counted as work: the multiprocessors idle during one.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import gzip
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

NO_OP = "(no op recorded)"
# The host event kinds that say what the training thread was doing (CUDA calls are leaves inside them).
HOST_KINDS = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")


@dataclass(frozen=True)
class Segment:
    """A stretch of one host thread's time, and the events open over it, outermost first."""

    start: float
    end: float
    stack: tuple[str, ...]


def read_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:  # type: ignore[operator]
        return list(csv.DictReader(f))


def busy_intervals(kernels: Iterable[dict[str, str]], kind: str = "kernel") -> list[tuple[float, float]]:
    """The union of the runs of every event of ``kind`` (kernels: copies and fills left out), in order."""
    spans = sorted(
        (float(r["start_us"]), float(r["start_us"]) + float(r["dur_us"])) for r in kernels if r["kind"] == kind
    )
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def gaps(busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches between busy intervals, in order."""
    return [(a[1], b[0]) for a, b in itertools.pairwise(busy) if b[0] > a[1]]


def overlaps(spans: list[tuple[float, float]], others: list[tuple[float, float]]) -> Iterator[tuple[int, int, float]]:
    """``(i, j, µs)`` for each span ``i`` and interval ``j`` of ``others`` that overlap, and for how long.

    Both lists are in time order, each without overlaps of its own, so one sweep finds every pair: an
    interval that ends before a span starts can't overlap a later span.
    """
    first = 0
    for i, (a, b) in enumerate(spans):
        while first < len(others) and others[first][1] <= a:
            first += 1
        j = first
        while j < len(others) and others[j][0] < b:
            length = min(b, others[j][1]) - max(a, others[j][0])
            if length > 0:
                yield i, j, length
            j += 1


def training_thread(host: Iterable[dict[str, str]]) -> str:
    """The thread that launched the most kernels: the one the step's Python runs on."""
    launches = collections.Counter(r["thread"] for r in host if "Launch" in r["name"] or "launch" in r["name"])
    if not launches:
        raise SystemExit("the host timeline has no kernel launches to tell the training thread by")
    return launches.most_common(1)[0][0]


def segments(events: Iterable[tuple[float, float, str]]) -> Iterator[Segment]:
    """One thread's timeline cut where an event opens or closes, each piece with the events open over it.

    ``events`` are (start, end, name), properly nested as a profiler records them; a child that outlasts
    its parent (rounding) is cut at the parent's end.  Time with no event open is :data:`NO_OP`.
    """
    ordered = sorted(events, key=lambda e: (e[0], -e[1]))
    if not ordered:
        return
    stack: list[tuple[float, str]] = []  # (end, name), outermost first
    now = ordered[0][0]
    for start, end, name in [*ordered, (math.inf, math.inf, "")]:
        while stack and stack[-1][0] <= start:
            closing = stack[-1][0]
            if closing > now:
                yield Segment(now, closing, tuple(n for _, n in stack))
                now = closing
            stack.pop()
        if start == math.inf:
            return
        if start > now:
            yield Segment(now, start, tuple(n for _, n in stack) or (NO_OP,))
            now = start
        stack.append((min(end, stack[-1][0]) if stack else end, name))


def attribute(
    idle: list[tuple[float, float]], pieces: list[Segment]
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Idle GPU time by the host's innermost event (exclusive) and by every event open (inclusive), in µs."""
    exclusive: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    covered = [0.0] * len(idle)
    for i, j, length in overlaps(idle, [(piece.start, piece.end) for piece in pieces]):
        covered[i] += length
        exclusive[pieces[j].stack[-1]] += length
        for name in set(pieces[j].stack):
            inclusive[name] += length
    for (g0, g1), done in zip(idle, covered, strict=True):
        if g1 - g0 > done:
            exclusive[NO_OP] += g1 - g0 - done
    return exclusive, inclusive


def report(
    kernels: list[dict[str, str]], host: list[dict[str, str]] | None, min_us: float, steps: int, top: int
) -> str:
    busy = busy_intervals(kernels)
    if not busy:
        return "no GPU kernels in the timeline"
    idle = gaps(busy)
    span = busy[-1][1] - busy[0][0]
    total = sum(b - a for a, b in idle)
    lines = [f"{span / 1e3 / steps:.1f} ms of timeline a step, {total / 1e3 / steps:.1f} ms with no kernel running "
             f"({100 * total / span:.1f}%), in {len(idle)} gaps"]  # fmt: skip
    for low, high in ((0, 10), (10, 50), (50, 100), (100, 1000), (1000, math.inf)):
        chosen = [b - a for a, b in idle if low <= b - a < high]
        label = f"{low}-{high} µs" if high != math.inf else f"≥ {low} µs"
        lines.append(f"  gaps of {label:>12}: {len(chosen) / steps:7.1f} a step, {sum(chosen) / 1e3 / steps:6.2f} ms")
    names = sorted((float(r["start_us"]), r["name"]) for r in kernels if r["kind"] == "kernel")
    starts = [t for t, _ in names]
    lines.append(f"the {min(top, 10)} longest gaps (µs from the first kernel: before -> after):")
    for a, b in sorted(idle, key=lambda g: g[0] - g[1])[: min(top, 10)]:
        after = bisect.bisect_left(starts, b)
        before = names[after - 1][1] if after > 0 else "-"
        following = names[after][1] if after < len(names) else "-"
        lines.append(f"  {b - a:8.0f} at {a - busy[0][0]:10.0f}: {before[:60]} -> {following[:60]}")
    if host is None:
        return "\n".join(lines)
    thread = training_thread(host)
    events = [
        (float(r["start_us"]), float(r["start_us"]) + float(r["dur_us"]), r["name"])
        for r in host
        if r["thread"] == thread and r["kind"] in HOST_KINDS
    ]
    wide = [g for g in idle if g[1] - g[0] >= min_us]
    # A gap a copy fills may be the compute stream waiting for it (a layer's input coming back), not the host.
    copying = sum(length for *_, length in overlaps(wide, busy_intervals(kernels, "gpu_memcpy")))
    exclusive, inclusive = attribute(wide, list(segments(events)))
    counted = sum(b - a for a, b in wide)
    lines.append(
        f"gaps of ≥ {min_us:.0f} µs: {counted / 1e3 / steps:.1f} ms a step, a copy running in "
        f"{copying / 1e3 / steps:.1f} ms of it; the training thread meanwhile"
    )
    for title, table in (("innermost event (exclusive)", exclusive), ("every open event (inclusive)", inclusive)):
        lines.append(f"  by {title}:")
        for name, us in table.most_common(top):
            lines.append(f"    {us / 1e3 / steps:7.2f} ms a step  {100 * us / counted:5.1f}%  {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", type=Path, help="kernels_<row>.csv.gz from step_profile.py")
    p.add_argument("--host", type=Path, help="host_<row>.csv.gz (default: beside the kernels' file, if there)")
    p.add_argument("--steps", type=int, default=1, help="profiled steps in the timeline (step_profile's --span)")
    p.add_argument("--min-us", type=float, default=50.0, help="gaps at least this long are attributed")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    host_path = args.host or args.kernels.with_name(args.kernels.name.replace("kernels_", "host_"))
    host = read_rows(host_path) if host_path.exists() and host_path != args.kernels else None
    print(report(read_rows(args.kernels), host, args.min_us, max(args.steps, 1), args.top))


if __name__ == "__main__":
    main()
