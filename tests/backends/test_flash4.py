"""FlashAttention 4 behind torch's flash kernels: only where it is switched on, on a Hopper or Blackwell GPU,
and there the packed attention's output and gradients are torch's own kernel's."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunelab.backends.torch import flash4


def test_it_stays_off_unless_switched_on_and_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not flash4.activate(torch.device("cpu"))  # off by default
    monkeypatch.setattr(flash4, "ON", True)
    assert not flash4.activate(torch.device("cpu"))  # no CUDA device: torch's CPU kernels run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash_attn.cute (bench/fetch_fa4.sh)")
def test_on_a_gpu_the_packed_attention_gives_torch_s_output_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.attention import restore_flash_attention_impl

    from tunelab.backends.torch.attention import torch_varlen

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, h, 512, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h in (8, 2, 2)
    )
    starts = torch.tensor([0, 100, 412, 512, 900, 1024], dtype=torch.int32, device="cuda")
    grad = torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

    def run() -> list[torch.Tensor]:
        out, _ = torch_varlen(None, q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=starts, max_length_q=412)
        out.backward(grad)
        got = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]  # type: ignore[union-attr]
        for t in (q, k, v):
            t.grad = None
        return got

    theirs = run()
    monkeypatch.setattr(flash4, "ON", True)
    try:
        if not flash4.activate(torch.device("cuda")):
            pytest.skip("FlashAttention 4 has no kernels for this GPU or torch")
        mine = run()
    finally:
        restore_flash_attention_impl()
    for name, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs, strict=True):
        assert float((a - b).norm() / b.norm()) < 2e-2, name  # bf16 operands, another summation order
