"""train.tiled_mlp: the MLP over tiles of positions gives the gradients of the whole MLP (dropout included),
and inside an offloaded checkpoint its replay computes no MLP output that nothing reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.tiled_mlp import tile_mlps
from tunelab.config import load_config


def _run(folder: Path, tokenizer: Any, *, tiled: bool, offload: bool | None, dropout: float) -> tuple[float, dict, int]:
    """``offload``: True offloaded checkpoints, False checkpoints kept in place, None none."""
    torch.manual_seed(1)
    backend = TorchBackend()
    backend.load(ModelSpec(str(folder), dtype="float32", device="cpu"), MethodSpec("lora", dropout=dropout),
                 OptimSpec(), tokenizer)  # fmt: skip
    base = backend._causal_lm
    if tiled:
        assert tile_mlps(base, tile_tokens=8) == len(decoder_layers(base))  # 48 positions: 6 tiles
    if offload is not None:
        checkpoint_layers(decoder_layers(base), offload=offload)
        base.enable_input_require_grads()
    calls = [0]
    for layer in decoder_layers(base):
        layer.mlp.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch.manual_seed(2)
    loss = backend.forward_backward(_batch(), 1.0).loss_sum
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return loss, grads, calls[0] // len(decoder_layers(base))


@pytest.mark.parametrize("offload", [None, False, True])
def test_tiled_mlp_gives_the_gradients_of_the_whole_mlp(
    tiny_model_dir: Path, tiny_tokenizer: Any, offload: bool | None
) -> None:
    loss, grads, _ = _run(tiny_model_dir, tiny_tokenizer, tiled=False, offload=offload, dropout=0.0)
    tiled_loss, tiled_grads, calls = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=offload, dropout=0.0)
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    assert tiled_grads.keys() == grads.keys() and any("mlp" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-7)
    # forward in 6 tiles, backward in 6; a checkpoint's replay (Llama: residual + mlp) computes no value: 12, not 18
    assert calls == 12


def test_tiled_mlp_with_dropout_matches_its_checkpointed_replay(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The offloaded layer's forward and the tiled backward draw the same dropout masks."""
    plain = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=None, dropout=0.3)
    offloaded = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.3)
    assert offloaded[0] == pytest.approx(plain[0], rel=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(offloaded[1][name], grad, rtol=1e-5, atol=1e-7)


def test_auto_tiles_long_checkpointed_micro_batches_only() -> None:
    def cfg(seq: int, batch: int, gc: bool, tiled: object = "auto") -> Any:
        train = {"batch_size": batch, "gradient_checkpointing": gc, "tiled_mlp": tiled}
        return load_config({"model": {"path": "m"}, "data": {"train": "d", "max_seq_len": seq}, "train": train})

    assert cfg(16384, 1, True).tiles_mlp and cfg(8192, 2, True).tiles_mlp
    assert not cfg(16384, 1, False).tiles_mlp and not cfg(4096, 2, True).tiles_mlp
    assert cfg(512, 1, False, True).tiles_mlp and not cfg(65536, 1, True, False).tiles_mlp
