"""How fast this GPU computes against how fast its link to CPU memory copies, measured once at start.

What parks activations in CPU memory (:mod:`kept_mlp`) pays off only for as
many layers as the link can copy out while the forward computes: past that,
the copies fall behind, GPU memory holds what waits to be copied, and backward
stalls on it.  The ratio differs by an order of magnitude between machines (an
H200 computes ~5x faster than a consumer card over a link only twice as fast),
so it is measured, on the run's own GPU, in about a tenth of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostLink:
    """Sustained bf16 matrix throughput (FLOP/s) and one-way pinned copy bandwidth (bytes/s)."""

    flops: float
    bytes_per_s: float


def measure(device: torch.device, *, tokens: int = 4096, width: int = 4096, repeats: int = 3) -> HostLink:
    """Time a layer-sized matrix product and a same-order device-to-host copy on ``device`` (the best of a few)."""
    a = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    b = torch.randn(width, 4 * width, device=device, dtype=torch.bfloat16)
    host = torch.empty(tokens, 4 * width, dtype=torch.bfloat16, pin_memory=True)
    out = a @ b  # warm: cuBLAS picks its kernel, the allocator its blocks
    host.copy_(out, non_blocking=True)
    torch.cuda.synchronize(device)
    matmul = min(_timed(lambda: torch.matmul(a, b, out=out), device) for _ in range(repeats))
    copy = min(_timed(lambda: host.copy_(out, non_blocking=True), device) for _ in range(repeats))
    return HostLink(flops=2 * tokens * width * 4 * width / matmul, bytes_per_s=out.nbytes / copy)


def _timed(work: object, device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize(device)
    return max(start.elapsed_time(end) / 1000, 1e-9)
