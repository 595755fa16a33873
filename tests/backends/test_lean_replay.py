"""The replay's down projection: no base product on a checkpoint's replay or a tile's recompute, and every
gradient as with the full product (dropout masks included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.lean_replay import lean_down_projections
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.tiled_mlp import tile_mlps


def _run(
    folder: Path,
    tokenizer: Any,
    *,
    lean: bool,
    tiled: bool = False,
    dropout: float = 0.0,
    method: MethodSpec | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Two micro-batches through offloaded checkpoints; returns losses, gradients, base down products per layer."""
    torch.manual_seed(1)
    backend = TorchBackend()
    backend.load(ModelSpec(str(folder), dtype=dtype, device=device), method or MethodSpec("lora", dropout=dropout),
                 OptimSpec(), tokenizer)  # fmt: skip
    base = backend._causal_lm
    layers = decoder_layers(base)
    if lean:
        assert lean_down_projections(base) == len(layers)
    if tiled:
        assert tile_mlps(base, tile_tokens=8) == len(layers)  # 48 positions: 6 tiles
    checkpoint_layers(layers, offload=True)
    base.enable_input_require_grads()
    calls = [0]
    for layer in layers:
        layer.mlp.down_proj.base_layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch.manual_seed(2)
    losses = [float(backend.forward_backward(_batch(), 1.0).loss_sum) for _ in range(2)]  # two micro-batches accumulate
    grads = {n: p.grad.float().clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return losses, grads, calls[0] // (2 * len(layers))


def _same(lean: tuple, plain: tuple, rtol: float = 1e-5, atol: float = 1e-7, loss_rel: float = 1e-6) -> None:
    assert lean[0] == pytest.approx(plain[0], rel=loss_rel)
    assert lean[1].keys() == plain[1].keys() and any("down_proj.lora_A" in n for n in plain[1])
    for name, grad in plain[1].items():
        torch.testing.assert_close(lean[1][name], grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_replay_skips_the_down_projections_base_product_with_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, dropout: float
) -> None:
    plain = _run(tiny_model_dir, tiny_tokenizer, lean=False, dropout=dropout)
    lean = _run(tiny_model_dir, tiny_tokenizer, lean=True, dropout=dropout)
    _same(lean, plain)
    assert (plain[2], lean[2]) == (2, 1)  # forward and replay; the lean replay runs only the adapters


def test_a_tiled_mlps_recompute_skips_it_too(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    plain = _run(tiny_model_dir, tiny_tokenizer, lean=False, tiled=True)
    lean = _run(tiny_model_dir, tiny_tokenizer, lean=True, tiled=True)
    _same(lean, plain)
    # 6 tiles forward; the checkpoint's replay computes no MLP value; the tiles' recompute for backward: 6 / 0
    assert (plain[2], lean[2]) == (12, 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_4_bit_base_skips_it_too_with_the_same_gradients(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    pytest.importorskip("bitsandbytes")
    qlora = MethodSpec("qlora", bits=4)
    plain = _run(tiny_model_dir, tiny_tokenizer, lean=False, method=qlora, device="cuda")
    lean = _run(tiny_model_dir, tiny_tokenizer, lean=True, method=qlora, device="cuda")
    # fp32 compute over the same dequantized weights: equal up to TF32/fp32 rounding. (In bf16 the rounding
    # noise of a 2-layer model's backward, ~1e-5 in the loss on an H100, swamps what this checks.)
    _same(lean, plain, rtol=1e-3, atol=1e-5, loss_rel=1e-5)
    assert (plain[2], lean[2]) == (2, 1)


def test_only_frozen_plain_adapters_in_residual_mlps_are_made_lean(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch.methods import apply_method

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lean_down_projections(base) == 0  # as loaded, every weight trains
    assert lean_down_projections(base.requires_grad_(False)) == len(decoder_layers(base))  # a frozen base alone
    dora = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MethodSpec("dora"))
    assert lean_down_projections(dora.get_base_model()) == 0  # DoRA reads the base's output
    full = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MethodSpec("full"))
    assert lean_down_projections(full) == 0  # the base weight trains
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other.config.model_type = "gemma2"  # normalises the MLP's output: the replay reads it
    assert lean_down_projections(other) == 0


def test_the_backend_makes_them_lean_where_a_layer_is_replayed(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    def lean_layers(**spec: Any) -> int:
        backend = TorchBackend()
        backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu", **spec), MethodSpec("lora"),
                     OptimSpec(), tiny_tokenizer)  # fmt: skip
        downs = [layer.mlp.down_proj for layer in decoder_layers(backend._causal_lm)]
        return sum(type(d).__name__.startswith("LeanDown") for d in downs)

    assert lean_layers(gradient_checkpointing=True) == 2  # its checkpoints replay each layer
    assert lean_layers(tiled_mlp=True) == 2  # tiles are recomputed for backward
    assert lean_layers() == 0


def test_compiled_layers_share_one_graph_per_run_kind(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean wrapper must not make each layer compile its own graph (a per-layer ``partial`` did: dynamo
    guards on its identity, and past its recompile limit the later layers ran uncompiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # a thread count change recompiles too
    backend = TorchBackend()
    backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"), MethodSpec("lora"), OptimSpec(),
                 tiny_tokenizer)  # fmt: skip
    base = backend._causal_lm
    layers = decoder_layers(base)
    assert lean_down_projections(base) == tile_mlps(base, tile_tokens=8) == len(layers) == 2
    for layer in layers:
        layer.compile(backend="aot_eager")  # the graphs dynamo captures, without inductor's code generation
    checkpoint_layers(layers, offload=True)
    losses = [float(backend.forward_backward(_batch(), 1.0).loss_sum) for _ in range(2)]
    assert all(np.isfinite(losses))
    # one entry for the first run (no gradients) and one for the replay, not one of each per layer
    assert len(_debug_get_cache_entry_list(type(layers[0]).forward.__code__)) == 2
    torch._dynamo.reset()
