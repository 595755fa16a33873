"""q/k/v and gate/up adapters share one ``x @ A^T``: PEFT's loss and gradients, one graph for all layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import assert_same_loss_and_grads, assert_switched_off_adapters_give_the_base, load_backend
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch import shared_lora_a
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers


def _run(
    folder: Path,
    tokenizer: Any,
    *,
    shared: bool,
    compiled: bool | str = False,
    checkpoints: bool = False,
    method: MethodSpec | None = None,
    device: str = "cpu",
) -> tuple:
    """One micro-batch; returns the loss, every gradient and how many lora_A modules ran their own product."""
    # the backend's own sharing off: the test shares below
    backend = load_backend(folder, tokenizer, method, device=device, switches=((shared_lora_a, False),))
    base = backend._causal_lm
    layers = decoder_layers(base)
    if shared:
        assert shared_lora_a.share(base) == 2 * len(layers)
    calls = [0]
    for module in base.modules() if not compiled else ():  # dynamo would guard on the counter's value
        if hasattr(module, "lora_A"):
            module.lora_A["default"].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    if compiled:
        for layer in layers:  # by default the graphs dynamo captures, without inductor's code generation
            layer.compile(backend=compiled if isinstance(compiled, str) else "aot_eager")
    if checkpoints:
        checkpoint_layers(layers, offload=False)
        base.enable_input_require_grads()
    loss = float(backend.forward_backward(_batch(), 1.0).loss_sum)
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return loss, grads, calls[0] // len(layers), backend


def _same(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    assert_same_loss_and_grads(a, b, "k_proj.lora_A", tol)


@pytest.mark.parametrize("checkpoints", [False, True])
def test_shared_products_give_peft_s_loss_and_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, checkpoints: bool
) -> None:
    plain = _run(tiny_model_dir, tiny_tokenizer, shared=False, checkpoints=checkpoints)
    shared = _run(tiny_model_dir, tiny_tokenizer, shared=True, checkpoints=checkpoints)
    _same(shared, plain)
    runs = 2 if checkpoints else 1  # a checkpoint's replay runs each layer again
    assert (plain[2], shared[2]) == (7 * runs, 2 * runs)  # only o_proj's and down_proj's A run on their own
    assert shared_lora_a._HANDOVER.x is None and not shared_lora_a._HANDOVER.parts  # nothing kept past a group


def test_compiled_layers_share_it_in_one_graph(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # a thread count change recompiles too
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3  # a graph per layer would show as 3 graphs, not 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    graphs, runs = [], []
    for shared in (False, True):
        torch._dynamo.reset()
        runs.append(_run(tmp_path, tiny_tokenizer, shared=shared, compiled=True))
        layer = decoder_layers(runs[-1][3]._causal_lm)[0]
        graphs.append(len(_debug_get_cache_entry_list(type(layer).forward.__code__)))
    _same(runs[1], runs[0])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # As many graphs as PEFT's own path: 2, since the first layer's input alone needs no gradient. Not one
    # graph per layer, as a per-layer object dynamo guarded on would give.
    assert graphs == [2, 2]
    assert shared_lora_a._HANDOVER.x is None
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_inductor_on_a_gpu_gives_the_same_gradients(tiny_model_dir: Path, tiny_tokenizer: Any, method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    spec = MethodSpec(method, bits=4 if method == "qlora" else None)
    plain = _run(tiny_model_dir, tiny_tokenizer, shared=False, compiled="inductor", method=spec, device="cuda")
    torch._dynamo.reset()
    shared = _run(tiny_model_dir, tiny_tokenizer, shared=True, compiled="inductor", method=spec, device="cuda")
    torch._dynamo.reset()
    _same(shared, plain, tol=1e-4)  # inductor's kernels sum in other orders on a GPU


def test_only_plain_adapters_with_one_input_share(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch.methods import apply_method

    layers = len(decoder_layers(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    for spec, groups in (
        (MethodSpec("lora"), 2 * layers),
        (MethodSpec("lora", dropout=0.1), 0),
        (MethodSpec("dora"), 0),
    ):
        model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)
        assert shared_lora_a.share(model.get_base_model()) == groups, spec
    assert "dropout" in str(shared_lora_a.why_not(_first_q(MethodSpec("lora", dropout=0.1), tiny_model_dir)))


def test_switched_off_adapters_take_peft_s_path(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    _, _, _, backend = _run(tiny_model_dir, tiny_tokenizer, shared=True)
    assert_switched_off_adapters_give_the_base(backend, tiny_model_dir)


def _first_q(spec: MethodSpec, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch.methods import apply_method

    model = apply_method(AutoModelForCausalLM.from_pretrained(folder), spec)
    return decoder_layers(model.get_base_model())[0].self_attn.q_proj


def test_the_backend_shares_them_unless_switched_off(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kinds() -> list[str]:
        backend = TorchBackend()
        backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"), MethodSpec("lora"), OptimSpec(),
                     tiny_tokenizer)  # fmt: skip
        layer = decoder_layers(backend._causal_lm)[0]
        return [type(m).__name__ for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj)]

    assert kinds() == ["FirstLinear", "LaterLinear", "LaterLinear"]
    monkeypatch.setattr(shared_lora_a, "ON", False)
    assert kinds() == ["Linear", "Linear", "Linear"]
