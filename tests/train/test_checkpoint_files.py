"""What a checkpoint folder holds and what resuming trusts: no pickles run, older layouts still load.

The CLI scenarios (damaged files, a planted ``rng.pt``, a full disk) are in
tests/hardening/test_checkpoints.py; these drive the real torch backend on the
tiny model directly, for the layouts a CLI run can't produce any more.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch import fsdp
from tunelab.backends.torch.backend import TorchBackend
from tunelab.train.checkpoint import TrainerState, resume_checkpoint, save_checkpoint
from tunelab.train.manifest import MANIFEST_FILE, verify


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _trained(folder: Path, tokenizer: Any, seed: int = 0) -> TorchBackend:
    """A LoRA backend on the tiny model after one optimizer step (so the optimizer has state)."""
    torch.manual_seed(seed)
    backend = TorchBackend()
    spec = ModelSpec(str(folder), dtype="float32", device="cpu")
    backend.load(spec, MethodSpec("lora", dropout=0.1), OptimSpec(), tokenizer)
    ids = np.random.default_rng(seed).integers(3, 300, (2, 16)).astype(np.int64)
    backend.forward_backward({"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}, 1.0)
    backend.optimizer_step(1e-3)
    return backend


def _weights(backend: TorchBackend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}


def test_a_checkpoint_holds_no_pickle_and_a_manifest_of_every_file(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    backend = _trained(tiny_model_dir, tiny_tokenizer)
    saved = save_checkpoint(tmp_path, backend, TrainerState(step=3), keep=2)
    names = {p.name for p in saved.iterdir()}
    assert not {n for n in names if n.endswith((".pt", ".pkl", ".bin"))}
    assert MANIFEST_FILE in names and verify(saved) is None
    after = _weights(backend), torch.get_rng_state(), backend._optimizer.state_dict()  # type: ignore[union-attr]

    other = _trained(tiny_model_dir, tiny_tokenizer, seed=1)
    resumed = resume_checkpoint(tmp_path, other.load_checkpoint)
    assert resumed.path == saved and resumed.state.step == 3 and not resumed.skipped
    for name, tensor in _weights(other).items():
        assert torch.equal(tensor, after[0][name])
    assert torch.equal(torch.get_rng_state(), after[1])
    restored = other._optimizer.state_dict()  # type: ignore[union-attr]
    assert restored["param_groups"] == after[2]["param_groups"]  # betas come back as the tuple AdamW keeps
    for index, state in after[2]["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)


def _legacy(folder: Path, backend: TorchBackend) -> None:
    """Rewrite a checkpoint as versions before manifests wrote it: torch.save'd optimizer and RNG state."""
    for name in (MANIFEST_FILE, "optimizer.safetensors", "optimizer.json", "rng.safetensors"):
        (folder / name).unlink()
    torch.save(backend._optimizer.state_dict(), folder / "optimizer.pt")  # type: ignore[union-attr]
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng.pt")


def test_checkpoints_of_earlier_versions_still_load(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _trained(tiny_model_dir, tiny_tokenizer)
    saved = save_checkpoint(tmp_path, backend, TrainerState(step=2), keep=2)
    _legacy(saved, backend)
    weights, rng = _weights(backend), torch.get_rng_state()
    assert verify(saved) is None  # what can be checked without a manifest checks out

    other = _trained(tiny_model_dir, tiny_tokenizer, seed=1)
    resumed = resume_checkpoint(tmp_path, other.load_checkpoint)
    assert resumed.path == saved and not resumed.skipped
    assert all(torch.equal(t, weights[n]) for n, t in _weights(other).items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_pickle_in_an_older_checkpoint_is_refused_not_run(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    backend = _trained(tiny_model_dir, tiny_tokenizer)
    older = save_checkpoint(tmp_path, backend, TrainerState(step=1), keep=3)
    newer = save_checkpoint(tmp_path, backend, TrainerState(step=2), keep=3)
    _legacy(newer, backend)
    marker = tmp_path / "pwned"
    torch.save({"cpu": _Payload(marker)}, newer / "rng.pt")

    resumed = resume_checkpoint(tmp_path, _trained(tiny_model_dir, tiny_tokenizer, seed=1).load_checkpoint)
    assert not marker.exists()
    assert resumed.path == older
    [note] = resumed.skipped
    assert note.startswith("skipped checkpoint step-2: it could not be loaded (UnpicklingError: Weights only load")


def test_a_planted_dcp_index_is_refused_not_run(tmp_path: Path) -> None:
    """DCP reads its .metadata with a plain pickle.load; tunelab reads it through an allow-list."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    fsdp.save(tmp_path, model, optimizer)  # one process, no process group: DCP warns and writes whole tensors
    fresh = torch.nn.Linear(4, 4)
    fsdp.load(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert torch.equal(fresh.weight, model.weight)  # DCP's own index passes the allow-list

    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception, match=r"refused posix\.system in a checkpoint's \.metadata"):
        fsdp.load(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert not marker.exists()
