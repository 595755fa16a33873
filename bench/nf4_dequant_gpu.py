"""NF4 dequantization on a GPU: bitsandbytes, the lean op and the one-kernel Triton op, on 8B Llama's weights.

QLoRA's 8B step on an H100 dequantizes 640 weights and waits on the host: through ``tunelab::nf4_dequantize``
(bitsandbytes' two kernels behind one op, ``nf4_kernels``) a GPU profile showed ~83 µs of host Python a call.
``tunelab::nf4_dequantize_triton`` (``nf4_triton``) does the whole arithmetic in one Triton kernel, which a
compiled graph launches from inductor's code.  For each linear shape of Llama 8B, quantized as QLoRA quantizes
it (NF4, blocks of 64, double-quantized scales), this script

- checks that the Triton op's weight is bitsandbytes' ``dequantize_4bit`` and the lean op's, bit for bit,
  eagerly and compiled;
- times the GPU per call: CUDA events around ``--calls`` back-to-back calls queued behind a GPU sleep (so
  the host's pace doesn't count), the median of ``--repeats``;
- times the host per call: wall time of ``--calls`` back-to-back calls, not synchronised, over the count
  (few enough that the launch queue never fills), the median of ``--repeats``;
- does both eagerly for each shape and inside a ``torch.compile(fullgraph=True)``'d function that
  dequantizes a layer's 7 weights (per weight there), and gives the bandwidth reached (bytes read and
  written over the GPU time).  "inductor" is nf4.py's torch arithmetic compiled in the graph (IN_GRAPH).

Needs a CUDA GPU, bitsandbytes and triton; writes nothing.

    PYTHONPATH=src python3 bench/nf4_dequant_gpu.py                   # the checks, then one table
    PYTHONPATH=src python3 bench/nf4_dequant_gpu.py --calls 50 --repeats 9
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# Llama 3.1 8B's linear weights, (out, in): one layer holds each once.
LAYER = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}
SHAPES = {"q/o": "q", "k/v": "k", "gate/up": "gate", "down": "down"}  # the distinct shapes, one weight each


def _ways(bnb: Any, nf4: Any, nf4_kernels: Any, nf4_triton: Any) -> dict[str, Callable[[Any, Any], Any]]:
    """Each way to dequantize (packed weight, QuantState) -> bf16 weight."""
    ways: dict[str, Callable[[Any, Any], Any]] = {"bitsandbytes": bnb.functional.dequantize_4bit}
    if nf4_kernels.load():
        ways["lean op"] = nf4_kernels.dequantize
    ways["triton op"] = nf4_triton.dequantize

    def inductor(packed: Any, state: Any) -> Any:  # nf4.py's arithmetic, only compiled (eagerly: big temporaries)
        inner = state.state2
        scales = nf4.nested_scales(state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize)
        return nf4.from_codes(packed, scales, state.code, state.blocksize, tuple(state.shape), state.dtype)

    ways["inductor"] = inductor
    return ways


def _moved(packed: torch.Tensor, state: Any) -> int:
    """Bytes a dequantization must read and write: the codes, the 8-bit scales, the bf16 weight."""
    return packed.numel() + state.absmax.numel() + 2 * packed.numel() * 2


def _sleep_cycles_per_us() -> float:
    torch.cuda._sleep(1000)  # loads the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) * 1000.0)


def _host_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Wall µs a call, the calls not synchronised: what the training step's host waits for."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - begin) * 1e6 / calls)
    torch.cuda.synchronize()
    return statistics.median(times)


def _gpu_us(fn: Callable[[], Any], calls: int, repeats: int, host_us: float, cycles_per_us: float) -> float:
    """GPU µs a call: the calls are queued behind a sleep longer than the host needs to queue them."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2 * calls * host_us * cycles_per_us) + 100_000)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="back-to-back calls a timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings; the median is printed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("nf4_dequant_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    import bitsandbytes as bnb

    from tunelab.backends.torch import nf4, nf4_kernels, nf4_triton

    if not nf4_triton.available(torch.empty(1, device="cuda")):
        print("nf4_dequant_gpu: needs triton", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, shape in LAYER.items():
        w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        weights[name] = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    ways = _ways(bnb, nf4, nf4_kernels, nf4_triton)
    cycles_per_us = _sleep_cycles_per_us()
    exact = True

    for label, name in SHAPES.items():
        packed, state = weights[name]
        theirs = bnb.functional.dequantize_4bit(packed, state)
        ours = nf4_triton.dequantize(packed, state)
        same = torch.equal(ours, theirs)
        lean = torch.equal(ours, nf4_kernels.dequantize(packed, state)) if "lean op" in ways else "n/a"
        exact = exact and same and lean is not False
        print(f"# {label} {tuple(state.shape)}: triton op == bitsandbytes {same}, == lean op {lean}")

    rows = []
    for way, fn in ways.items():
        if way != "inductor":  # eagerly nf4.py's arithmetic holds fp32 copies of a whole weight
            for label, name in SHAPES.items():
                packed, state = weights[name]
                call = functools.partial(fn, packed, state)
                call()
                host = _host_us(call, args.calls, args.repeats)
                gpu = _gpu_us(call, args.calls, args.repeats, host, cycles_per_us)
                rows.append((way, "eager", f"{label} {tuple(state.shape)}", gpu, host, _moved(packed, state) / gpu))
        torch._dynamo.reset()
        layer = torch.compile(lambda fn=fn: [fn(p, s) for p, s in weights.values()], fullgraph=True)
        try:
            out = layer()
        except Exception as error:  # e.g. a graph break in bitsandbytes' Python
            print(f"# {way} compiled: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        expected = [bnb.functional.dequantize_4bit(p, s) for p, s in weights.values()]
        same = all(torch.equal(o, e) for o, e in zip(out, expected, strict=True))
        exact = exact and same
        print(f"# {way} compiled: all 7 weights == bitsandbytes {same}")
        del out, expected
        host = _host_us(layer, args.calls, args.repeats) / len(LAYER)
        gpu = _gpu_us(layer, args.calls, args.repeats, host * len(LAYER), cycles_per_us) / len(LAYER)
        moved = sum(_moved(p, s) for p, s in weights.values()) / len(LAYER)
        rows.append((way, "compiled", "layer of 7, per weight", gpu, host, moved / gpu))

    print(f"{'way':<13} {'call':<9} {'weight':<28} {'GPU µs':>9} {'host µs':>9} {'TB/s':>6}")
    for way, call_kind, weight, gpu, host, rate in rows:
        print(f"{way:<13} {call_kind:<9} {weight:<28} {gpu:>9.1f} {host:>9.1f} {rate / 1e6:>6.2f}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
