"""The CUDA fast path on a GPU: PyTorch's varlen attention and compiled layers against the plain path.

Marked ``gpu`` (CI has none); run on the device machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("window", [None, 48])
def test_torch_varlen_equals_sdpa_per_example(window: int | None) -> None:
    pytest.importorskip("torch.nn.attention.varlen")
    from tunelab.backends.torch.attention import _varlen_takes, torch_varlen, varlen_kwargs

    if window and not _varlen_takes("window_size"):
        pytest.skip("this torch's varlen_attn has no sliding window")
    torch.manual_seed(0)
    lengths = [[5, 100, 37, 114], [256]]  # every row is 256 tokens; GQA 8 query heads over 2 key heads
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.tensor(
        [np.concatenate([np.arange(n) for n in row]) for row in lengths], device="cuda", dtype=torch.long
    )
    kwargs = {**varlen_kwargs(positions, static=True), "sliding_window": window}
    out, _ = torch_varlen(None, q, k, v, None, scaling=64**-0.5, **kwargs)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    got = [out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    for t in (q, k, v):
        t.grad = None
    pieces = []
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            sl = slice(start, start + n)
            qi, ki, vi = (t[row : row + 1, :, sl].double() for t in (q, k, v))
            ki, vi = ki.repeat_interleave(4, dim=1), vi.repeat_interleave(4, dim=1)
            i, j = torch.arange(n, device="cuda")[:, None], torch.arange(n, device="cuda")[None, :]
            allowed = (j <= i) & ((i - j < window) if window else True)
            pieces.append((row, sl, torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed)))
            start += n
    ref = torch.zeros(2, 8, 256, 64, device="cuda", dtype=torch.float64)
    for row, sl, piece in pieces:
        ref[row : row + 1, :, sl] = piece
    ref = ref.transpose(1, 2)
    (ref * grad.double()).sum().backward()
    for name, mine, theirs in zip(["out", "dq", "dk", "dv"], got, [ref, q.grad, k.grad, v.grad], strict=True):
        assert _rel(mine, theirs) < 2e-2, name  # bf16 operands


def test_compiled_fast_path_trains_like_the_eager_path() -> None:
    """Compiled layers + fused loss + activation budget vs plain eager: same start, same batches, 8 steps."""
    from tests.backends.conftest import random_batches
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend

    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    batches = random_batches(8, 4, 200, high=64)
    curves = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
        backend = TorchBackend()
        spec = ModelSpec("", "bfloat16", compile=fast, fused_loss=fast, activation_budget=0.5)
        backend.attach(model, spec, MethodSpec("lora", rank=8, alpha=16.0), OptimSpec(), None)
        assert backend.fast.compile_layers is fast
        curve = []
        for batch in batches:
            s = backend.forward_backward(batch, 1.0 / 796)
            backend.optimizer_step(1e-2)
            curve.append(float(s.loss_sum) / s.tokens)
        curves.append(curve)
    fast_curve, eager_curve = curves
    assert fast_curve[-1] < fast_curve[0] - 0.1  # it learns
    for a, b in zip(fast_curve, eager_curve, strict=True):
        assert abs(a - b) <= 0.01 * b, (fast_curve, eager_curve)
