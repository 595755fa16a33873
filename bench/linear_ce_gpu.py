"""The fused, chunked LM head + cross-entropy vs the plain one on a CUDA GPU (one command).

    PYTHONPATH=src python bench/linear_ce_gpu.py

Llama-3.1-8B's head (4096 -> 128,256) on 4,096 bf16 positions: prints the loss
difference, the hidden-state gradient's relative difference, the peak memory
the loss adds and its time (forward + backward, after two warm-up rounds),
plain (`cross_entropy(head(x).float())`) vs tunelab's ``linear_ce``.
Measured on an H100 on 2026-11-24: loss equal, gradient 6.8e-4 relative (bf16
rounding), peak 5.87 GiB plain vs 0.47 GiB fused, 20.6 ms vs 25.5 ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tunelab.backends.torch.linear_ce import linear_cross_entropy

POSITIONS, HIDDEN, VOCAB = 4096, 4096, 128_256


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(POSITIONS, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    y = torch.randint(0, VOCAB, (POSITIONS,), device="cuda")

    def plain() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(x).float(), y, reduction="sum")

    def fused() -> torch.Tensor:
        return linear_cross_entropy(x, head, y)

    def run(loss_fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor, float, float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert x.grad is not None
        grad = x.grad.clone()
        x.grad = None
        return float(loss.detach()), grad, (torch.cuda.max_memory_allocated() - base) / 2**30, seconds

    for _ in range(2):
        run(plain), run(fused)
    loss_p, grad_p, mem_p, time_p = run(plain)
    loss_f, grad_f, mem_f, time_f = run(fused)
    rel = float((grad_f.float() - grad_p.float()).norm() / grad_p.float().norm())
    print(f"loss rel diff {abs(loss_f - loss_p) / abs(loss_p):.2e}  grad rel {rel:.2e}")
    print(f"peak GiB plain {mem_p:.2f} fused {mem_f:.2f}  ms plain {time_p * 1e3:.1f} fused {time_f * 1e3:.1f}")


if __name__ == "__main__":
    main()
