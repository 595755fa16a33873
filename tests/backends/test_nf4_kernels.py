"""``tunelab::nf4_dequantize``: bitsandbytes' NF4 weights, bit for bit, through one op a compiled graph calls whole.

bitsandbytes is not among the project's dependencies (QLoRA users install it), so these tests run
where it is installed: a GPU machine (its kernels), or a CPU with its wheel (the op's torch arithmetic).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from tunelab.backends.torch import nf4, nf4_kernels  # noqa: E402
from tunelab.backends.torch.retype import retype  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _quantized(shape: tuple[int, int], nested: bool, device: str) -> tuple[Any, Any]:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(device)
    return bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(256, 128), (1000, 64)])  # 1000 blocks: a last partial group of 256
def test_the_op_gives_bitsandbytes_weight_bit_for_bit(device: str, nested: bool, shape: tuple[int, int]) -> None:
    nf4_kernels.load()
    packed, state = _quantized(shape, nested, device)
    ours = nf4_kernels.dequantize(packed, state)
    theirs = bnb.functional.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape and ours.device == theirs.device
    assert torch.equal(ours, theirs)
    assert nf4_kernels.available(packed) == (device == "cuda")  # only CUDA weights are routed to the kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cpp_wrapper", [False, True])  # fast.CPP_WRAPPER: the graph's wrapper in C++ calls the op
def test_a_compiled_product_calls_the_op_whole(device: str, cpp_wrapper: bool, torch_config: Any) -> None:
    """No graph break, and the product and input gradient are bitsandbytes' own (the op has a fake for the trace)."""
    from torch._inductor import config as inductor_config

    torch_config(inductor_config, cpp_wrapper=cpp_wrapper)
    packed, state = _quantized((256, 128), True, device)
    weight = bnb.functional.dequantize_4bit(packed, state)
    x = torch.randn(4, 16, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    expected = x @ weight.t()
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    torch._dynamo.reset()
    run = torch.compile(lambda x: x @ nf4_kernels.dequantize(packed, state).t(), fullgraph=True)
    out = run(x)
    out.float().square().sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)


def test_a_compiled_graph_takes_bitsandbytes_parameter_and_state_whole() -> None:
    """The weight as a run holds it (``Params4bit`` with its ``QuantState``), traced without a graph break."""
    linear = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(256, 128)}, strict=False)
    linear = linear.to("cpu")  # bitsandbytes quantizes the weight when the module is moved
    weight = linear.weight
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    torch._dynamo.reset()
    run = torch.compile(lambda w: nf4_kernels.dequantize(w, w.quant_state), fullgraph=True)
    assert torch.equal(run(weight), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_in_graph_linear_saves_only_the_packed_weight_for_backward(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """The backward dequantizes again, as bitsandbytes does: no bf16 copy of the weight waits for it.

    Merged with the forward's call by the graph's common-subexpression pass, the opaque op's
    output was saved instead: +0.25 GiB at 8B QLoRA 2x2048 (session 46).  Off CUDA the op runs
    its torch arithmetic, so the routing is switched on by hand to trace the same graph here.
    """
    monkeypatch.setattr(nf4, "takes_bnb_kernels", lambda weight: True)
    nf4_kernels.load()
    linear = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(256, 128)}, strict=False)
    linear = linear.to(device)
    x = torch.randn(4, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    expected = linear(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    retype(linear, nf4._InGraph4bit)
    torch._dynamo.reset()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.compile(linear, fullgraph=True)(x)
    out.float().square().sum().backward()
    assert saved and all(t.dtype == torch.uint8 for t in saved), [(t.shape, t.dtype) for t in saved]
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_kernels_run_on_the_callers_stream() -> None:
    """Captured into a CUDA graph (a stream of its own): a launch anywhere else would fail or go uncaptured."""
    nf4_kernels.load()
    packed, state = _quantized((2048, 1024), True, "cuda")
    expected = bnb.functional.dequantize_4bit(packed, state)
    nf4_kernels.dequantize(packed, state)  # warm: the allocator's blocks, the library's first call
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours = nf4_kernels.dequantize(packed, state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ours, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bnb_kernels", [True, False])
def test_an_in_graph_linear_on_the_gpu_matches_bitsandbytes_either_way(
    monkeypatch: pytest.MonkeyPatch, bnb_kernels: bool
) -> None:
    """bitsandbytes' kernels behind the op, or inductor's arithmetic: bitsandbytes' output and gradient exactly."""
    monkeypatch.setattr(nf4, "BNB_KERNELS", bnb_kernels)
    nf4_kernels.load()
    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(1024, 512)}, strict=False)
    linear = linear.to("cuda")
    x = torch.randn(2, 256, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    expected = linear(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    retype(linear, nf4._InGraph4bit)
    torch._dynamo.reset()
    out = torch.compile(linear, fullgraph=True)(x)
    out.float().square().sum().backward()
    # the same weight; the products may take other cuBLAS kernels (a 3-D input, a traced transpose)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-2, atol=1e-2)


def test_by_default_the_op_goes_in_the_graph_for_short_rows_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured on an H100: in the graph, 2,048-token rows gained and 16,384-token rows lost (nf4.SHORT_BELOW)."""
    monkeypatch.setattr(nf4_kernels, "load", lambda: True)  # as where bitsandbytes' library has the kernels
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert nf4.IN_GRAPH == "bnb_kernels" and nf4.BNB_KERNELS
    assert nf4.in_graph_on(cuda, 2048) and nf4.in_graph_on(cuda, None)
    assert not nf4.in_graph_on(cuda, nf4.SHORT_BELOW) and not nf4.in_graph_on(cpu, 2048)
    monkeypatch.setattr(nf4, "IN_GRAPH", True)  # forced: every row, any device
    assert nf4.in_graph_on(cuda, nf4.SHORT_BELOW) and nf4.in_graph_on(cpu, 2048)
