"""SiLU·up with its backward as one op: autograd's gradients, in the compiled layer's one graph, and (on a GPU)
the Triton kernel's values against the same arithmetic in torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.backends.conftest import assert_same_loss_and_grads, compiled_runs, load_backend

from tunelab.backends.torch import swiglu
from tunelab.backends.torch.loading import decoder_layers

CUDA = torch.cuda.is_available()


def _autograd(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
    return torch.autograd.grad(F.silu(g) * u, (g, u), grad)


def test_the_op_gives_autograd_s_gradients_and_is_registered_soundly() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(5, 77, dtype=torch.float64, generator=gen) * 4 for _ in range(3))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(gate) * up)
    ours = torch.autograd.grad(out, (g, u), grad)
    for mine, theirs in zip(ours, _autograd(gate, up, grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)  # fp32 arithmetic inside
    torch.library.opcheck(swiglu.swiglu_backward, (gate.float(), up.float(), grad.float()))


def test_the_fused_backward_trains_like_peft_compiled_in_one_graph(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """Every layer's MLP takes it; two steps through compiled layers give the same losses and adapter gradients,
    with no graph break and no more graphs than without it."""

    def load(on: bool) -> Any:
        backend = load_backend(tiny_model_dir, tiny_tokenizer)
        if on:
            layers = decoder_layers(backend._causal_lm)
            assert swiglu.fuse_backward(backend._causal_lm) == len(layers)
            assert "FusedBackward" in type(layers[0].mlp).__name__
        return backend

    runs, graphs = compiled_runs(load)
    assert_same_loss_and_grads(runs[1], runs[0], "gate_proj.lora_B", 1e-5)
    assert_same_loss_and_grads(runs[1], runs[0], "up_proj.lora_A", 1e-5)
    assert graphs[1] == graphs[0]


def test_only_plain_silu_mlps_take_it(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    mlp = decoder_layers(backend._causal_lm)[0].mlp
    mlp.act_fn = torch.nn.GELU()
    assert swiglu.fuse_backward(backend._causal_lm) == len(decoder_layers(backend._causal_lm)) - 1
    assert "FusedBackward" not in type(mlp).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(3, 1000), (64, 14336)])
def test_the_cuda_kernel_matches_the_arithmetic_in_torch(shape: tuple[int, int]) -> None:
    """bf16 in and out, fp32 inside; a size that is no multiple of the kernel's block too."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 3 for _ in range(3))
    ours = swiglu.swiglu_backward(gate, up, grad)
    expected = swiglu._math(gate, up, grad)
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine, theirs, rtol=1e-2, atol=1e-2)
