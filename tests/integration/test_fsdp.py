"""FSDP2 on torch/gloo: 2 sharded processes with batch B train exactly as 1 process with batch 2B.

``train.parallel: fsdp`` shards the frozen base and the LoRA adapters over the
processes; its checkpoints are DCP folders (each rank writes its shards) that a
single process, without FSDP, resumes from.  Runs go through the real CLI under
torchrun, in fp32 with dropout 0, as in ``test_distributed.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
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

STEPS = 12
BATCH = 4  # per process; the single-process reference uses 2 × BATCH
TOL = 1e-4


def _fsdp_config(tmp: Path, model: Path, data: Path, batch: int) -> Path:
    path = cpu_config(tmp, model, data, batch, steps=STEPS)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["train"]["parallel"] = "fsdp"
    raw["train"]["save_every"] = 4
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """One process (no FSDP), micro-batch 2 × BATCH: the run both sharded layouts must match."""
    root = tmp_path_factory.mktemp("fsdp-reference")
    finish(ranks_cli("train", str(_fsdp_config(root, e2e_model, chat_data, 2 * BATCH)), home=root / "home"))
    return root / "out"


@pytest.mark.slow
def test_fsdp_two_processes_match_one_with_twice_the_batch(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    cfg = _fsdp_config(tmp_path, e2e_model, chat_data, BATCH)
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["train"]["eval_batch_size"] = 5  # 5 validation batches: rank 1 runs a no-loss one to keep step
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    finish(ranks_cli("train", str(cfg), home=tmp_path / "home", nproc=2))
    out = tmp_path / "out"
    assert_close(curve(out, "train_loss"), curve(reference, "train_loss"), range(1, STEPS + 1), TOL)
    assert_close(curve(out, "val_loss"), curve(reference, "val_loss"), range(STEPS, STEPS + 1), TOL)
    assert (out / "checkpoints" / "step-8" / "__1_0.distcp").is_file()  # rank 1 wrote its shards (DCP)
    # The gathered adapter has the one-process layout: same files, names, shapes, and values.
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(
        p.name for p in (reference / "adapter").iterdir()
    )
    left = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert sorted(left) == sorted(right)
    assert max(float(np.abs(left[k] - right[k]).max()) for k in left) < TOL
    _loads_with_peft(e2e_model, out / "adapter")
    assert [r["status"] for r in listed_runs(tmp_path / "home")] == ["completed"]


def _loads_with_peft(model: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model))
    tuned = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)  # trained weights, not PEFT's zero init


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_on_one(
    reference: Path, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    proc = ranks_cli("train", str(_fsdp_config(tmp_path, e2e_model, chat_data, BATCH)), "--nproc", "2", home=home)
    err = stop_after_first_step(proc, out)  # every rank stops at the same step and writes its shards
    runs = listed_runs(home)
    assert runs[0]["status"] == "cancelled", err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < STEPS
    last = out / "checkpoints" / f"step-{saved[-1]}"
    assert {p.name for p in last.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # one file per rank
    assert json.loads((last / "trainer_state.json").read_text())["global_batch"] == 2 * BATCH
    finish(ranks_cli("train", "--resume", runs[0]["id"], home=home))  # one process, no FSDP: DCP reads every shard
    assert_close(curve(out, "train_loss"), curve(reference, "train_loss"), range(1, STEPS + 1), TOL)
    assert_close(curve(out, "val_loss"), curve(reference, "val_loss"), range(STEPS, STEPS + 1), TOL)
    assert listed_runs(home)[0]["status"] == "completed"


def test_fsdp_ranks_run_as_many_forwards_as_each_other() -> None:
    from tunelab.distributed.sharding import DataParallel

    class Rank:  # a group of 2 seen from one rank; local() and share() do no communication
        def __init__(self, rank: int) -> None:
            self.rank, self.world = rank, 2

    mask = np.ones((5, 4), dtype=np.int64)
    batch = {"input_ids": np.arange(20).reshape(5, 4), "attention_mask": mask, "labels": mask.copy()}
    first = DataParallel(Rank(0), rows=2, even=True).local(batch)  # type: ignore[arg-type]
    second = DataParallel(Rank(1), rows=2, even=True).local(batch)  # type: ignore[arg-type]
    assert len(first) == len(second) == 2  # rows 0, 2, 4 vs rows 1, 3 (+ a piece with no loss)
    assert (second[-1]["labels"] == -100).all()
    assert len(DataParallel(Rank(1), rows=2).local(batch)) == 1  # data parallel needs no padding
    valid = [batch, batch, batch]
    assert [len(DataParallel(Rank(r), even=True).share(valid)) for r in (0, 1)] == [2, 2]  # type: ignore[arg-type]
    assert (DataParallel(Rank(1), even=True).share(valid)[-1]["labels"] == -100).all()  # type: ignore[arg-type]


def test_a_checkpoint_without_shards_is_refused_under_fsdp(tmp_path: Path) -> None:
    import torch

    from tunelab.backends.torch import fsdp
    from tunelab.errors import StateError

    (tmp_path / "trainable.safetensors").write_bytes(b"")  # what a ddp or one-process run writes
    model = torch.nn.Linear(2, 2)
    with pytest.raises(StateError, match=r"without train\.parallel: fsdp"):
        fsdp.load(tmp_path, model, torch.optim.AdamW(model.parameters()))
