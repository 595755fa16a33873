"""QLoRA with checkpoints: on the replay, the 4-bit attention weights dequantized once for the product and its
backward give bitsandbytes' gradients, with fewer dequantizations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import load_backend, random_batch

from tunelab.backends.base import MethodSpec
from tunelab.backends.torch import held_4bit
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers


def _step(folder: Path, tokenizer: Any, held: bool, device: str = "cpu") -> tuple[float, dict[str, torch.Tensor]]:
    backend = load_backend(folder, tokenizer, MethodSpec("qlora", bits=4), device=device)
    base = backend._causal_lm
    if held:
        assert held_4bit.hold_on_replay(base) == 4 * len(decoder_layers(base))
    checkpoint_layers(decoder_layers(base), offload=device == "cuda")
    base.enable_input_require_grads()
    loss = float(backend.forward_backward(random_batch(), 1.0).loss_sum)
    return loss, {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}


def test_the_replay_s_held_weights_give_bitsandbytes_gradients_with_fewer_dequantizations(
    tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    pytest.importorskip("bitsandbytes.functional")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Expansions(TorchDispatchMode):
        """Counts bitsandbytes' ops that expand a 4-bit weight: its dequantization, and (on a CPU) its fused product."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.count += str(func).startswith(("bitsandbytes.dequantize_4bit", "bitsandbytes.gemm_4bit"))
            return func(*args, **(kwargs or {}))

    runs = {}
    for held in (False, True):
        with Expansions() as seen:
            runs[held] = (*_step(tiny_model_dir, tiny_tokenizer, held), seen.count)
    (loss, grads, many), (held_loss, held_grads, few) = runs[False], runs[True]
    assert held_loss == pytest.approx(loss, rel=1e-6)
    assert held_grads.keys() == grads.keys() and any("q_proj" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(held_grads[name], grad, rtol=1e-5, atol=1e-6)
    assert many - few == 4 * 2, (many, few)  # q, k, v, o of each of the 2 layers: one expansion fewer each


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_with_offloaded_checkpoints_the_gradients_are_bitsandbytes(
    tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    pytest.importorskip("bitsandbytes")
    (loss, grads), (held_loss, held_grads) = (_step(tiny_model_dir, tiny_tokenizer, h, "cuda") for h in (False, True))
    assert held_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(held_grads[name], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()))
