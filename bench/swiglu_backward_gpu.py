"""SiLU·up's backward alone on a GPU: inductor's kernel against the memory bandwidth its bytes need.

In 8B LoRA's step on an H100 (``step_profile.py lora``) the compiled layer's SiLU·up backward kernel took
8.7 ms a step, 272 us a layer, for 587 MB (it reads gate, up and the output's gradient and writes the two
input gradients, 4,096 × 14,336 bf16 each): ~2.2 TB/s, where the same layer's forward kernel moves its
bytes at ~3.2 TB/s.  This script times, on the shapes of Unsloth's benchmark rows, the same arithmetic
compiled by inductor as ``tunelab train`` compiles it (default heuristics, then with coordinate-descent
tuning) and as one plain Triton kernel of a few block sizes, beside a device-to-device copy as the
bandwidth reference.

Session 48 (H100, ``results/swiglu_backward_h100_2026-12-07.txt``): the plain kernel beat inductor's
standalone backward (8B shape 236 against 312 us, 1B 491 against 575), but put in the compiled layers as an
opaque op it made ``tunelab train`` slower (8B LoRA -0.6%, 1B LoRA -2.0%).  Inside the layer inductor's own
kernel already ran at 230 us a layer (the same lease's profile), so the standalone figure overstated what
there was to gain.  It was not kept.

    python3 bench/swiglu_backward_gpu.py        # prints one line per (shape, variant): us and TB/s
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = {"8b_2x2048": (4096, 14336), "1b_8x2048": (16384, 8192)}


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's SiLU·up, as the compiled layer computes it (its backward is autograd's decomposition)."""
    return F.silu(gate) * up


def backward_of(forward, gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):  # type: ignore[no-untyped-def]
    """A function that runs ``forward``'s backward alone, again and again, on one retained forward."""
    g = gate.detach().requires_grad_()
    u = up.detach().requires_grad_()
    out = forward(g, u)
    return lambda: torch.autograd.grad(out, (g, u), grad, retain_graph=True)


def swiglu_backward_explicit(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gradients written out, in fp32 arithmetic, for inductor to fuse."""
    g = gate.float()
    s = torch.sigmoid(g)
    dh = grad.float()
    du = dh * g * s
    dg = dh * up.float() * s * (1.0 + g * (1.0 - s))
    return dg.to(gate.dtype), du.to(up.dtype)


def _triton_kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)

    def run(gate, up, grad, block, warps):  # type: ignore[no-untyped-def]
        dg = torch.empty_like(gate)
        du = torch.empty_like(up)
        n = gate.numel()
        kernel[(triton.cdiv(n, block),)](gate, up, grad, dg, du, n, BLOCK=block, num_warps=warps)
        return dg, du

    return run


def _time_us(fn, reps: int = 40) -> float:  # type: ignore[no-untyped-def]
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def _bench_shape(name: str, rows: int, cols: int, triton_run) -> None:  # type: ignore[no-untyped-def]
    import torch._inductor.config as inductor_config

    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, grad = (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    moved = 5 * gate.numel() * gate.element_size()
    reference = backward_of(swiglu, gate, up, grad)()
    copy_dst = torch.empty_like(gate)
    copy_us = _time_us(lambda: copy_dst.copy_(gate))
    copy_rate = 2 * gate.numel() * gate.element_size() / copy_us / 1e6
    print(
        json.dumps(
            {"shape": name, "variant": "copy (one tensor)", "us": round(copy_us, 1), "TB/s": round(copy_rate, 2)}
        )
    )

    def explicit():  # type: ignore[no-untyped-def]
        compiled = torch.compile(swiglu_backward_explicit)
        return lambda: compiled(gate, up, grad)

    def triton_of(block: int, warps: int):  # type: ignore[no-untyped-def]
        return lambda: lambda: triton_run(gate, up, grad, block, warps)

    # (label, coordinate descent, a factory for the timed call): each compiled variant is made, compiled
    # and timed inside its own config patch, after a reset, so no variant reuses another's compiled code.
    variants: list[tuple[str, bool, object]] = [("eager autograd", False, lambda: backward_of(swiglu, gate, up, grad))]
    for tuned in (False, True):
        label = " + coordinate descent" if tuned else ""
        variants.append(
            (f"inductor autograd{label}", tuned, lambda: backward_of(torch.compile(swiglu), gate, up, grad))
        )
        variants.append((f"inductor explicit{label}", tuned, explicit))
    for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
        variants.append((f"triton block {block} warps {warps}", False, triton_of(block, warps)))
    for label, tuned, factory in variants:
        with inductor_config.patch(coordinate_descent_tuning=tuned):
            torch._dynamo.reset()
            fn = factory()  # type: ignore[operator]
            out = fn()  # the first call compiles
            err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, reference, strict=True))
            us = _time_us(fn)
        row = {"shape": name, "variant": label, "us": round(us, 1), "TB/s": round(moved / us / 1e6, 2)}
        print(json.dumps(row | {"max_abs_diff": round(err, 4)}))


def main() -> int:
    if not torch.cuda.is_available():
        print("swiglu_backward_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    triton_run = _triton_kernel()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (rows, cols) in SHAPES.items():
        _bench_shape(name, rows, cols, triton_run)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
