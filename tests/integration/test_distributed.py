"""Data parallel on torch/gloo: 2 processes with batch B train exactly as 1 process with batch 2B.

Every run goes through the real CLI, once under a plain ``torchrun`` and once with
``--nproc 2`` (torchrun underneath), in fp32 with dropout 0, so the loss curves of the
two layouts must agree to rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from tests.integration.conftest import base_config

STEPS = 40
BATCH = 4  # per process; the single-process reference uses 2 × BATCH
TOL = 1e-4


def _cli(*args: str, home: Path, torchrun: int = 0) -> subprocess.Popen:
    """``tunelab ARGS``, or with ``torchrun`` N: ``torchrun --nproc-per-node N -m tunelab ARGS`` as a cluster would."""
    env = {**os.environ, "TUNELAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("TUNELAB_DB_URL", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else []
    return subprocess.Popen(
        [sys.executable, *launcher, "-m", "tunelab", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{out}\n{err}"
    return out


def _stop_after_first_step(proc: subprocess.Popen, out: Path) -> str:
    """SIGTERM the run once its first step is logged (as Ctrl-C: every rank stops at the same step and
    rank 0 checkpoints); return its stderr."""
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text(encoding="utf-8"):
        assert proc.poll() is None, f"run ended before its first step: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the first step"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    return err


def _config(tmp: Path, model: Path, data: Path, batch: int, backend: str = "torch", steps: int = STEPS) -> Path:
    raw = base_config(model, data, tmp / "out", steps=steps, batch_size=batch, save_every=10)
    raw["method"]["dropout"] = 0.0
    raw["model"]["dtype"] = "float32"
    raw["device"] = "cpu"
    raw["backend"] = backend
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _curve(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def _assert_close(left: dict[int, float], right: dict[int, float], steps: range) -> None:
    for step in steps:
        assert abs(left[step] - right[step]) < TOL, (step, left[step], right[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """One process, micro-batch 2 × BATCH: the output folder of the run every layout must match."""
    root = tmp_path_factory.mktemp("reference")
    _finish(_cli("train", str(_config(root, e2e_model, chat_data, 2 * BATCH)), home=root / "home"))
    return root / "out"


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, e2e_model, chat_data, BATCH)
    out = _finish(_cli("train", str(cfg), home=tmp_path / "home", torchrun=2))
    assert "completed" in out  # rank 0 reports; the run is recorded once
    _assert_close(_curve(tmp_path / "out", "train_loss"), _curve(reference, "train_loss"), range(1, STEPS + 1))
    _assert_close(_curve(tmp_path / "out", "val_loss"), _curve(reference, "val_loss"), range(STEPS, STEPS + 1))
    left = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert max(float(abs(left[k] - right[k]).max()) for k in left) < TOL
    assert [r["status"] for r in _runs(tmp_path / "home")] == ["completed"]


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out"
    proc = _cli("train", str(_config(tmp_path, e2e_model, chat_data, BATCH)), "--nproc", "2", home=home)
    err = _stop_after_first_step(proc, out)
    runs = _runs(home)
    assert runs[0]["status"] == "cancelled", err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < STEPS
    state = json.loads((out / "checkpoints" / f"step-{saved[-1]}" / "trainer_state.json").read_text())
    assert state["global_batch"] == 2 * BATCH  # one process will run each global batch as two pieces
    _finish(_cli("train", "--resume", runs[0]["id"], home=home))  # one process
    _assert_close(_curve(out, "train_loss"), _curve(reference, "train_loss"), range(1, STEPS + 1))
    _assert_close(_curve(out, "val_loss"), _curve(reference, "val_loss"), range(STEPS, STEPS + 1))
    assert _runs(home)[0]["status"] == "completed"


def _runs(home: Path) -> list[dict]:
    listed = subprocess.run(
        [sys.executable, "-m", "tunelab", "runs", "list", "--json"],
        env={**os.environ, "TUNELAB_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(listed.stdout)


@pytest.mark.slow
def test_mlx_ring_two_processes_match_one_with_twice_the_batch(
    e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    steps = 12
    _finish(_cli("train", str(_config(one, e2e_model, chat_data, 2 * BATCH, "mlx", steps)), home=one / "home"))
    cfg = _config(two, e2e_model, chat_data, BATCH, "mlx", steps)
    _finish(_cli("train", str(cfg), "--nproc", "2", home=two / "home"))  # mlx.launch, ring backend
    _assert_close(_curve(two / "out", "train_loss"), _curve(one / "out", "train_loss"), range(1, steps + 1))
    _assert_close(_curve(two / "out", "val_loss"), _curve(one / "out", "val_loss"), range(steps, steps + 1))
    assert [r["backend"] for r in _runs(two / "home")] == ["mlx"]


@pytest.mark.slow
def test_mlx_checkpoint_of_two_ring_processes_resumes_on_one(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    steps = 12
    _finish(_cli("train", str(_config(one, e2e_model, chat_data, 2 * BATCH, "mlx", steps)), home=one / "home"))
    home, out = two / "home", two / "out"
    proc = _cli("train", str(_config(two, e2e_model, chat_data, BATCH, "mlx", steps)), "--nproc", "2", home=home)
    err = _stop_after_first_step(proc, out)
    runs = _runs(home)
    assert runs[0]["status"] == "cancelled", err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < steps
    _finish(_cli("train", "--resume", runs[0]["id"], home=home))  # one process, no ring
    _assert_close(_curve(out, "train_loss"), _curve(one / "out", "train_loss"), range(1, steps + 1))
    _assert_close(_curve(out, "val_loss"), _curve(one / "out", "val_loss"), range(steps, steps + 1))
    assert _runs(home)[0]["status"] == "completed"


@pytest.mark.slow
def test_a_user_error_on_rank_0_stops_every_rank_with_its_message(
    e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, e2e_model, chat_data, BATCH)
    (tmp_path / "out" / "adapter").mkdir(parents=True)  # another run's result is already there
    proc = _cli("train", str(cfg), "--nproc", "2", home=tmp_path / "home")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7  # StateError's exit code, passed on by the launcher
    assert "already holds a run" in err
    assert "Traceback" not in err


def test_each_rank_takes_its_rows_in_pieces_of_batch_size() -> None:
    from tunelab.distributed.sharding import DataParallel

    class Rank:  # a group of 2 seen from one rank; local() does no communication
        def __init__(self, rank: int) -> None:
            self.rank, self.world = rank, 2

    lengths = [5, 3, 4, 2, 6, 1]
    mask = np.array([[1] * n + [0] * (6 - n) for n in lengths])
    batch = {"input_ids": np.arange(36).reshape(6, 6), "attention_mask": mask, "labels": mask.copy()}
    pieces = DataParallel(Rank(1), rows=2).local(batch)  # type: ignore[arg-type]
    assert [p["input_ids"][:, 0].tolist() for p in pieces] == [[6, 18], [30]]  # rows 1, 3, 5
    assert [p["input_ids"].shape[1] for p in pieces] == [3, 1]  # padding only this rank had is cut
    whole = DataParallel(rows=6).local(batch)
    assert whole[0] is batch  # one process, one piece: the batch as it was


def test_what_several_processes_cannot_do_yet_is_refused_with_the_fix() -> None:
    from tunelab.distributed.sharding import check_parallel
    from tunelab.errors import ConfigError

    check_parallel("fsdp", "mlx", 1)  # one process: nothing to refuse
    check_parallel("fsdp", "torch", 2)  # FSDP2 on torch (tests/integration/test_fsdp.py)
    with pytest.raises(ConfigError, match=r"train\.parallel: ddp"):
        check_parallel("fsdp", "mlx", 2, mlx_launch=True)
    with pytest.raises(ConfigError, match="backend: torch"):
        check_parallel("auto", "mlx", 2)
    with pytest.raises(ConfigError, match="backend: mlx"):
        check_parallel("auto", "torch", 2, mlx_launch=True)
