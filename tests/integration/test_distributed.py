"""Data parallel on torch/gloo: 2 processes with batch B train exactly as 1 process with batch 2B.

Every run goes through the real CLI, once under a plain ``torchrun`` and once with
``--nproc 2`` (torchrun underneath), in fp32 with dropout 0, so the loss curves of the
two layouts must agree to rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tests.integration.runs import (
    assert_close,
    cpu_config,
    curve,
    finish,
    listed_runs,
    ranks_cli,
    stop_after_first_step,
)

STEPS = 40
BATCH = 4  # per process; the single-process reference uses 2 × BATCH
TOL = 1e-4
MLX_STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """One process, micro-batch 2 × BATCH: the output folder of the run every layout must match."""
    root = tmp_path_factory.mktemp("reference")
    finish(ranks_cli("train", str(cpu_config(root, e2e_model, chat_data, 2 * BATCH, steps=STEPS)), home=root / "home"))
    return root / "out"


@pytest.fixture(scope="module")
def mlx_reference(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """One MLX process, micro-batch 2 × BATCH, MLX_STEPS steps: the output folder both ring layouts must match
    (trained once for the module; each ring test used to train the same run for itself)."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    root = tmp_path_factory.mktemp("mlx-reference")
    cfg = cpu_config(root, e2e_model, chat_data, 2 * BATCH, backend="mlx", steps=MLX_STEPS)
    finish(ranks_cli("train", str(cfg), home=root / "home"))
    return root / "out"


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    cfg = cpu_config(tmp_path, e2e_model, chat_data, BATCH, steps=STEPS)
    out = finish(ranks_cli("train", str(cfg), home=tmp_path / "home", nproc=2))
    assert "completed" in out  # rank 0 reports; the run is recorded once
    assert_close(curve(tmp_path / "out", "train_loss"), curve(reference, "train_loss"), range(1, STEPS + 1), TOL)
    assert_close(curve(tmp_path / "out", "val_loss"), curve(reference, "val_loss"), range(STEPS, STEPS + 1), TOL)
    left = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert max(float(abs(left[k] - right[k]).max()) for k in left) < TOL
    assert [r["status"] for r in listed_runs(tmp_path / "home")] == ["completed"]


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out"
    proc = ranks_cli(
        "train", str(cpu_config(tmp_path, e2e_model, chat_data, BATCH, steps=STEPS)), "--nproc", "2", home=home
    )
    err = stop_after_first_step(proc, out)
    runs = listed_runs(home)
    assert runs[0]["status"] == "cancelled", err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < STEPS
    state = json.loads((out / "checkpoints" / f"step-{saved[-1]}" / "trainer_state.json").read_text())
    assert state["global_batch"] == 2 * BATCH  # one process will run each global batch as two pieces
    finish(ranks_cli("train", "--resume", runs[0]["id"], home=home))  # one process
    assert_close(curve(out, "train_loss"), curve(reference, "train_loss"), range(1, STEPS + 1), TOL)
    assert_close(curve(out, "val_loss"), curve(reference, "val_loss"), range(STEPS, STEPS + 1), TOL)
    assert listed_runs(home)[0]["status"] == "completed"


@pytest.mark.slow
@pytest.mark.xdist_group("mlx-ring")  # mlx.launch's ring listens on fixed ports (32323…): one ring at a time
def test_mlx_ring_two_processes_match_one_with_twice_the_batch(
    mlx_reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    two, steps = tmp_path / "two", MLX_STEPS
    two.mkdir()
    cfg = cpu_config(two, e2e_model, chat_data, BATCH, backend="mlx", steps=steps)
    out = finish(ranks_cli("train", str(cfg), "--nproc", "2", home=two / "home"))  # mlx.launch, ring backend
    assert [r["status"] for r in listed_runs(two / "home")] == ["completed"], out  # not stopped early
    assert_close(curve(two / "out", "train_loss"), curve(mlx_reference, "train_loss"), range(1, steps + 1), TOL)
    assert_close(curve(two / "out", "val_loss"), curve(mlx_reference, "val_loss"), range(steps, steps + 1), TOL)
    assert [r["backend"] for r in listed_runs(two / "home")] == ["mlx"]


@pytest.mark.slow
@pytest.mark.xdist_group("mlx-ring")
def test_mlx_checkpoint_of_two_ring_processes_resumes_on_one(
    mlx_reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    two, steps = tmp_path / "two", MLX_STEPS
    two.mkdir()
    home, out = two / "home", two / "out"
    proc = ranks_cli(
        "train",
        str(cpu_config(two, e2e_model, chat_data, BATCH, backend="mlx", steps=steps)),
        "--nproc",
        "2",
        home=home,
    )
    err = stop_after_first_step(proc, out)
    runs = listed_runs(home)
    assert runs[0]["status"] == "cancelled", err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < steps
    finish(ranks_cli("train", "--resume", runs[0]["id"], home=home))  # one process, no ring
    assert_close(curve(out, "train_loss"), curve(mlx_reference, "train_loss"), range(1, steps + 1), TOL)
    assert_close(curve(out, "val_loss"), curve(mlx_reference, "val_loss"), range(steps, steps + 1), TOL)
    assert listed_runs(home)[0]["status"] == "completed"


@pytest.mark.slow
def test_a_user_error_on_rank_0_stops_every_rank_with_its_message(
    e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    cfg = cpu_config(tmp_path, e2e_model, chat_data, BATCH, steps=STEPS)
    (tmp_path / "out" / "adapter").mkdir(parents=True)  # another run's result is already there
    proc = ranks_cli("train", str(cfg), "--nproc", "2", home=tmp_path / "home")
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
