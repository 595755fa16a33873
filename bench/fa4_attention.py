"""FlashAttention 4 against torch's own kernels on tunelab's two attention paths, on a CUDA GPU.

    . bench/fa4_env.sh   # second of the two calls that carry FlashAttention 4 (see that file)
    python3 bench/fa4_attention.py

Packed rows run ``attention.torch_varlen`` (``torch.nn.attention.varlen``, causal within each
example; the examples 200-900 tokens long, as chat rows are).  Rows that are not packed (the
default, and the rows beside Unsloth) run transformers' sdpa over the whole row, causal, which on a
Hopper GPU takes cuDNN's kernel.  For each issue-15 row's attention shape (8B 2x2048, 1B 8x2048, 8B
1x16,384; GQA 32 query heads over 8) and each path it times forward + backward with torch's
kernels, then with FlashAttention 4 as ``flash4.take_sdpa`` sets it up (torch's flash kernels
routed to it through ``flash4_kernels``, and cuDNN's sdpa kernel turned off so sdpa takes the flash
one), and prints the ratio, the relative difference of the output and of the
query's gradient, and the three costliest kernels of the first shape under each.  Decides whether
tunelab should turn FlashAttention 4 on where it is installed.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tunelab.backends.torch import flash4
from tunelab.backends.torch.attention import torch_varlen

# (name, rows, row length, query heads, key/value heads, head size)
SHAPES = [
    ("8B 2x2048", 2, 2048, 32, 8, 128),
    ("1B 8x2048", 8, 2048, 32, 8, 64),
    ("8B 1x16384", 1, 16384, 32, 8, 128),
]
PATHS = ("packed", "rows")
Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]  # starts None: whole rows


def packed_starts(rows: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """Cumulative example starts of ``rows`` packed rows of ``length`` tokens, examples of 200-900 tokens."""
    starts = [0]
    for row in range(rows):
        at = 0
        while at < length:
            at += min(int(rng.integers(200, 900)), length - at)
            starts.append(row * length + at)
    return torch.tensor(starts, dtype=torch.int32, device="cuda")


def make_case(path: str, rows: int, length: int, heads: int, kv_heads: int, dim: int) -> Case:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(h: int) -> torch.Tensor:
        shape = (rows, h, length, dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    if path == "rows":
        return tensor(heads), tensor(kv_heads), tensor(kv_heads), None, length
    starts = packed_starts(rows, length, np.random.default_rng(0))
    return tensor(heads), tensor(kv_heads), tensor(kv_heads), starts, int((starts[1:] - starts[:-1]).max())


def step(case: Case, grad: torch.Tensor) -> torch.Tensor:
    q, k, v, starts, longest = case
    if starts is None:  # as transformers' sdpa path calls it for a Llama: (batch, heads, length, dim)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad.transpose(1, 2))
        return out.transpose(1, 2)
    out, _ = torch_varlen(None, q, k, v, None, scaling=q.shape[-1] ** -0.5, cu_seq_lens_q=starts, max_length_q=longest)
    out.backward(grad)
    return out


def milliseconds(case: Case, grad: torch.Tensor, repeats: int = 20) -> float:
    for _ in range(3):
        step(case, grad)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step(case, grad)
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / repeats


def tflops(case: Case, ms: float) -> float:
    """Causal forward (two products) and backward (~2.5 forwards) over the packed examples or whole rows."""
    q, _, _, starts, length = case
    if starts is None:
        lengths = torch.full((q.shape[0],), float(length), dtype=torch.float64)
    else:
        lengths = (starts[1:] - starts[:-1]).double()
    flop = 4 * q.shape[1] * q.shape[-1] * float((lengths * (lengths + 1) / 2).sum()) * 3.5
    return flop / ms / 1e9


def top_kernels(case: Case, grad: torch.Tensor) -> list[tuple[str, float]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(case, grad)
        torch.cuda.synchronize()
    events: Any = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:3]
    return [(e.key[:70], round(e.device_time_total / 1e3, 3)) for e in events]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    seen: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
    for impl in ("torch", "FA4"):
        if impl == "FA4":
            flash4.ON = True
            llama = SimpleNamespace(num_attention_heads=32, hidden_size=4096)  # head size 128, no attention dropout
            if not flash4.take_sdpa(torch.device("cuda"), llama, None):  # its log line above says why
                print("FA4 could not be activated")
                return
        for path in PATHS:
            for name, rows, length, heads, kv_heads, dim in SHAPES:
                label = f"{path} {name}"
                case = make_case(path, rows, length, heads, kv_heads, dim)
                seeded = torch.Generator(device="cuda").manual_seed(1)  # the same upstream gradient under both
                grad = torch.randn(rows, length, heads, dim, device="cuda", dtype=torch.bfloat16, generator=seeded)
                try:
                    out = step(case, grad).detach().float()
                    dq = case[0].grad.float().clone()  # type: ignore[union-attr]
                    for t in case[:3]:
                        t.grad = None
                    ms = milliseconds(case, grad)
                except Exception as exc:
                    print(f"{impl} {label}: failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                    continue
                line = f"{impl} {label}: {ms:.3f} ms forward + backward, ~{tflops(case, ms):.0f} TFLOP/s"
                if label in seen:
                    base_ms, base_out, base_dq = seen[label]
                    line += f"; {base_ms / ms:.2f}x torch's"
                    line += f"; output {relative(out, base_out):.1e}, dq {relative(dq, base_dq):.1e}"
                else:
                    seen[label] = (ms, out, dq)
                print(line, flush=True)
                if name == SHAPES[0][0]:
                    print("  kernels (ms):", top_kernels(case, grad), flush=True)


if __name__ == "__main__":
    main()
