"""NF4 weights dequantized by tunelab's torch code: the same values as bitsandbytes' own kernels, bit for bit.

bitsandbytes is not among the project's dependencies (QLoRA users install it), so these
tests run where it is installed: a GPU machine, or a CPU with its wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from tunelab.backends.torch import nf4  # noqa: E402
from tunelab.backends.torch.retype import retype  # noqa: E402


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(256, 128), (96, 64), (1000, 64)])  # 1000 blocks: a last partial group of 256
def test_dequantize_matches_bitsandbytes_bit_for_bit(nested: bool, shape: tuple[int, int]) -> None:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)
    assert nf4.supported(_Holder(state))
    ours, theirs = nf4.dequantize(packed, state), bnb.functional.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_other_formats_keep_bitsandbytes_own_product() -> None:
    _, state = bnb.functional.quantize_4bit(torch.randn(64, 64), quant_type="fp4")
    assert not nf4.supported(_Holder(state))
    assert not nf4.supported(torch.randn(4, 4))  # a plain weight


def test_a_compiled_nf4_linear_gives_bitsandbytes_output_and_input_gradient() -> None:
    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(128, 256, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(256, 128), "bias": torch.randn(256)}, strict=False)
    linear = linear.to("cpu")  # bitsandbytes quantizes the weight when the module is moved
    x = torch.randn(4, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    expected = linear(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    retype(linear, nf4._InGraph4bit)
    assert torch.equal(linear(x), expected)  # eager: bitsandbytes' own product, unchanged
    torch._dynamo.reset()
    out = torch.compile(linear, fullgraph=True)(x)  # inductor's kernels for the dequantization, no graph break
    out.float().square().sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)


def _peft_nf4(dtype: Any) -> Any:
    """A PEFT LoRA (r 8, alpha 24, B not zero) over one NF4 linear with a bias, on the CPU."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", bnb.nn.Linear4bit(128, 256, bias=True, compute_dtype=dtype, quant_type="nf4"))
    net.proj.load_state_dict({"weight": torch.randn(256, 128), "bias": torch.randn(256)}, strict=False)
    model = get_peft_model(net.to("cpu"), LoraConfig(r=8, lora_alpha=24, target_modules=["proj"], lora_dropout=0.0))
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_()
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_the_adapter_in_the_base_product_gives_peft_outputs_and_gradients(
    monkeypatch: pytest.MonkeyPatch, autocast: bool
) -> None:
    """``[x, x·Aᵀ] @ [W, s·B]ᵀ`` compiled against PEFT's own forward: fp32 to rounding, bf16 to bf16's."""
    dtype = torch.bfloat16 if autocast else torch.float32
    x0 = torch.randn(4, 16, 128)
    results = []
    for in_product in (False, True):
        monkeypatch.setattr(nf4, "LORA_IN_PRODUCT", in_product)
        model = _peft_nf4(dtype)
        run = model
        if in_product:
            assert nf4.wrap_modules(model) == 1  # the base; PEFT's wrapper is put in front too
            assert isinstance(model.base_model.model.proj, nf4._LoraInProduct)
            torch._dynamo.reset()
            run = torch.compile(model, fullgraph=True)
        x = x0.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(x)
        out.float().square().mean().backward()
        lora = model.base_model.model.proj
        results.append(
            [out.float(), x.grad.float(), lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad]
        )
    tolerance = 2e-2 if autocast else 1e-5  # bf16: one rounding of the sum instead of two
    for ours, peft_own in zip(results[1], results[0], strict=True):
        assert ours.dtype == peft_own.dtype
        assert float((ours - peft_own).abs().max()) <= tolerance * float(peft_own.abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bnb_kernels", [False, True])  # inductor's arithmetic, or bitsandbytes' kernels (nf4_kernels)
def test_qlora_training_on_the_compiled_path_dequantizes_in_the_graph_with_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, bnb_kernels: bool
) -> None:
    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend
    from tunelab.backends.torch.loading import decoder_layers

    def step(in_graph: bool, in_product: bool = False) -> tuple[float, dict[str, Any], int]:
        monkeypatch.setattr(nf4, "IN_GRAPH", in_graph)
        monkeypatch.setattr(nf4, "BNB_KERNELS", bnb_kernels and in_graph)
        monkeypatch.setattr(nf4, "LORA_IN_PRODUCT", in_product)
        torch._dynamo.reset()
        torch.manual_seed(1)
        backend = TorchBackend()
        spec = ModelSpec(str(tiny_model_dir), dtype="float32", device="cuda", gradient_checkpointing=True)
        backend.load(spec, MethodSpec("qlora", bits=4), OptimSpec(), tiny_tokenizer)
        base = backend._causal_lm
        wrapped = sum(isinstance(m, nf4._InGraph4bit) for layer in decoder_layers(base) for m in layer.modules())
        ids = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int64)
        batch = {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}
        part = backend.forward_backward(batch, 1.0)
        grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
        return float(part.loss_sum), grads, wrapped

    theirs = step(False)
    for ours in (step(True), step(True, in_product=True)):
        assert ours[2] == 7 * 2 and theirs[2] == 0  # every projection of both layers
        assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
        for name, grad in theirs[1].items():
            torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6)


class _Holder:
    """A stand-in parameter carrying ``quant_state``, as bitsandbytes' ``Params4bit`` does."""

    def __init__(self, state: Any) -> None:
        self.quant_state = state
