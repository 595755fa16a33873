"""``tunelab::nf4_dequantize_triton``: NF4 weights in one Triton kernel, bit for bit the torch arithmetic.

The torch arithmetic (:func:`nf4.nested_scales`, :func:`nf4.from_codes`) is bitsandbytes' bit for bit
(test_nf4_kernels.py), so these tests need no bitsandbytes: they build quantization states by hand.
Without a GPU the kernel runs under Triton's interpreter, in a subprocess: ``TRITON_INTERPRET=1`` must be
set before triton is first imported, and other tests in this process may have imported it already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tunelab.backends.torch import nf4, nf4_kernels, nf4_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (rows, cols, nested, dtype, blocksize, blocksize2, offset as a float).  600 blocks of 64 are 19,200
# bytes: the last of 10 programs (2,048 bytes each) is partly filled, and the last group of 256 has 88.
CASES = [(600, 64, nested, dtype, 64, 256, False) for nested in (True, False) for dtype in DTYPES]
CASES += [(600, 64, True, "bf16", 64, 256, True), (96, 128, True, "fp16", 128, 5, False)]


def _state(rows: int, cols: int, nested: bool, dtype: str, blocksize: int, blocksize2: int, as_float: bool) -> Any:
    """Random packed codes and a ``QuantState``-like state as bitsandbytes lays them out (no bitsandbytes)."""
    gen = torch.Generator().manual_seed(rows * cols + blocksize2)
    n = rows * cols
    blocks = n // blocksize
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=gen)
    state = SimpleNamespace(
        code=torch.randn(16, generator=gen),
        absmax=torch.rand(blocks, generator=gen) + 0.1,
        blocksize=blocksize,
        shape=torch.Size((rows, cols)),
        dtype=DTYPES[dtype],
        nested=nested,
    )
    if nested:
        groups = -(-blocks // blocksize2)
        state.absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen)
        state.state2 = SimpleNamespace(
            code=torch.randn(256, generator=gen), absmax=torch.rand(groups, generator=gen) + 0.1, blocksize=blocksize2
        )
        state.offset = torch.randn((), generator=gen)
        state.offset = float(state.offset) if as_float else state.offset
    return packed, state


def _moved(packed: torch.Tensor, state: Any, device: str) -> tuple[torch.Tensor, Any]:
    state = SimpleNamespace(**vars(state))
    state.absmax, state.code = state.absmax.to(device), state.code.to(device)
    if state.nested:
        state.state2 = SimpleNamespace(**vars(state.state2))
        state.state2.code, state.state2.absmax = state.state2.code.to(device), state.state2.absmax.to(device)
        state.offset = state.offset.to(device) if isinstance(state.offset, torch.Tensor) else state.offset
    return packed.to(device), state


def _expected(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The torch arithmetic, as :func:`nf4.dequantize` computes it off bitsandbytes' kernels."""
    scales = state.absmax
    if state.nested:
        inner = state.state2
        scales = nf4.nested_scales(state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize)
    return nf4.from_codes(packed, scales, state.code, state.blocksize, tuple(state.shape), state.dtype)


def _interpreted() -> int:
    """Run under ``TRITON_INTERPRET=1`` (this file as a script): the kernel on every case, on the CPU."""
    failed = []
    for case in CASES:
        packed, state = _state(*case)
        ours = nf4_triton.run_kernel(*nf4_kernels.op_args(packed, state))
        expected = _expected(packed, state)
        if not (ours.dtype == expected.dtype and ours.shape == expected.shape and torch.equal(ours, expected)):
            failed.append({"case": case, "differ": int((ours != expected).sum())})
    print(json.dumps({"cases": len(CASES), "failed": failed}))
    return 1 if failed else 0


def test_the_kernel_under_the_interpreter_is_the_torch_arithmetic_bit_for_bit() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"cases": len(CASES), "failed": []}


@pytest.mark.parametrize("case", CASES[:2] + CASES[-2:])
def test_off_cuda_the_op_is_the_torch_arithmetic_with_or_without_triton(case: tuple[Any, ...]) -> None:
    packed, state = _state(*case)
    expected = _expected(packed, state)
    assert torch.equal(nf4_triton.dequantize(packed, state), expected)
    assert torch.equal(torch.ops.tunelab.nf4_dequantize_triton(*nf4_kernels.op_args(packed, state, 1)), expected)
    assert not nf4_triton.available(packed)


def test_a_compiled_graph_on_the_cpu_takes_the_op_whole() -> None:
    """With triton, the op decomposes into the torch arithmetic; without, it is opaque (its fake traces)."""
    packed, state = _state(*CASES[0])
    torch._dynamo.reset()
    run = torch.compile(lambda p: nf4_triton.dequantize(p, state), fullgraph=True, backend="aot_eager")
    assert torch.equal(run(packed), _expected(packed, state))


NO_KERNEL = not CUDA or nf4_triton.triton is None


@pytest.mark.gpu
@pytest.mark.skipif(NO_KERNEL, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("compiled", [None, "python", "cpp"])  # eager, or compiled with either graph wrapper
def test_on_the_gpu_the_kernel_is_the_torch_arithmetic_bit_for_bit(
    case: tuple[Any, ...], compiled: str | None, torch_config: Any
) -> None:
    """On a GPU ptxas may contract a multiply and an add: the scales' explicitly rounded multiply keeps them apart."""
    packed, state = _moved(*_state(*case), "cuda")
    expected = _expected(packed, state)  # eager torch: each op a kernel of its own, rounded apart
    if compiled:
        from torch._inductor import config as inductor_config
        from torch._inductor.utils import run_and_get_code

        torch_config(inductor_config, cpp_wrapper=compiled == "cpp")  # fast.CPP_WRAPPER's
        torch._dynamo.reset()
        run = torch.compile(lambda p: nf4_triton.dequantize(p, state), fullgraph=True)
        ours, code = run_and_get_code(run, packed)
        text = "\n".join(code)
        assert "ops.tunelab" not in text and "tunelab::" not in text  # inductor launches the kernel, no op call
    else:
        ours = nf4_triton.dequantize(packed, state)
    assert nf4_triton.available(packed) and torch.equal(ours, expected)


@pytest.mark.gpu
@pytest.mark.skipif(NO_KERNEL, reason="needs a CUDA GPU and triton")
def test_on_the_gpu_a_compiled_linear_saves_only_the_packed_weight_for_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the switch on, nf4.dequantize takes the kernel, and the backward dequantizes again (its launch has
    its own ``site``): no bf16 copy of the weight is saved."""
    monkeypatch.setattr(nf4, "TRITON", True)
    packed, state = _moved(*_state(256, 128, True, "bf16", 64, 256, False), "cuda")
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    saved: list[torch.Tensor] = []
    run = torch.compile(lambda x: nf4._Nf4Linear.apply(x, packed, state, None), fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = run(x)
    out.float().square().sum().backward()
    weights = [t for t in saved if t.is_floating_point() and t.numel() >= 256 * 128]  # a dequantized weight
    assert saved and not weights, [(t.shape, t.dtype) for t in saved]


if __name__ == "__main__":
    sys.exit(_interpreted())
