"""bench/gpu_gaps.py reads step_profile.py's two timelines together: idle GPU time, and what the training
thread's host events were meanwhile, exclusive (innermost) and inclusive (every open event)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _gaps_module() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_gaps", ROOT / "bench" / "gpu_gaps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_gaps"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


KERNELS = [  # (start, dur, stream, kind, name): two gaps of kernels, 800 and 200 µs; a copy is not work
    (0, 100, 7, "kernel", "k1"),
    (100, 100, 7, "kernel", "k2"),
    (200, 700, 20, "gpu_memcpy", "Memcpy HtoD"),
    (1000, 100, 7, "kernel", "k3"),
    (1050, 250, 21, "kernel", "k4"),
    (1500, 100, 7, "kernel", "k5"),
]
HOST = [  # (start, dur, thread, kind, name)
    (150, 1550, "T1", "user_annotation", "step"),
    (180, 1020, "T1", "cpu_op", "_CheckpointedLayerBackward"),
    (300, 300, "T1", "cpu_op", "TorchDynamo Cache Lookup"),
    (950, 10, "T1", "cuda_runtime", "cudaLaunchKernel"),
    (1250, 350, "T1", "cpu_op", "Optimizer.step"),
    (1490, 5, "T1", "cuda_runtime", "cudaLaunchKernel"),
    (1300, 50, "T2", "cuda_runtime", "cudaLaunchKernel"),  # another thread, fewer launches: not the trainer's
    (1300, 300, "T2", "cpu_op", "loader work"),
]


def _write(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> Path:
    with gzip.open(path, "wt", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)
    return path


def test_idle_time_is_attributed_to_the_training_threads_innermost_and_open_events() -> None:
    gaps = _gaps_module()
    kernels = [dict(zip(("start_us", "dur_us", "stream", "kind", "name"), map(str, r), strict=True)) for r in KERNELS]
    host = [dict(zip(("start_us", "dur_us", "thread", "kind", "name"), map(str, r), strict=True)) for r in HOST]
    idle = gaps.gaps(gaps.busy_intervals(kernels))
    assert idle == [(200.0, 1000.0), (1300.0, 1500.0)]
    assert gaps.training_thread(host) == "T1"
    events = [(float(r["start_us"]), float(r["start_us"]) + float(r["dur_us"]), r["name"]) for r in host[:6]]
    exclusive, inclusive = gaps.attribute(idle, list(gaps.segments(events)))
    assert exclusive == {
        "_CheckpointedLayerBackward": 490.0,
        "TorchDynamo Cache Lookup": 300.0,
        "cudaLaunchKernel": 15.0,
        "Optimizer.step": 195.0,
    }
    assert inclusive["step"] == 1000.0 and inclusive["_CheckpointedLayerBackward"] == 800.0
    assert inclusive["Optimizer.step"] == 200.0


def test_a_child_outlasting_its_parent_is_cut_and_uncovered_time_counts_as_no_op() -> None:
    gaps = _gaps_module()
    pieces = list(gaps.segments([(0.0, 10.0, "parent"), (5.0, 12.0, "child"), (20.0, 30.0, "later")]))
    assert [(p.start, p.end, p.stack) for p in pieces] == [
        (0.0, 5.0, ("parent",)),
        (5.0, 10.0, ("parent", "child")),
        (10.0, 20.0, (gaps.NO_OP,)),
        (20.0, 30.0, ("later",)),
    ]
    exclusive, _ = gaps.attribute([(25.0, 40.0)], pieces)
    assert exclusive == {"later": 5.0, gaps.NO_OP: 10.0}


def test_the_script_reads_both_files_from_step_profile(tmp_path: Path) -> None:
    kernels = _write(tmp_path / "kernels_row.csv.gz", ["start_us", "dur_us", "stream", "kind", "name"], KERNELS)
    _write(tmp_path / "host_row.csv.gz", ["start_us", "dur_us", "thread", "kind", "name"], HOST)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_gaps.py"), str(kernels), "--min-us", "100"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    assert "1.6 ms of timeline a step, 1.0 ms with no kernel running (62.5%), in 2 gaps" in out
    assert "800 at        200: k2 -> k3" in out
    assert "gaps of ≥ 100 µs: 1.0 ms a step, a copy running in 0.7 ms of it" in out  # the copy of 200-900
    assert "0.49 ms a step   49.0%  _CheckpointedLayerBackward" in out
