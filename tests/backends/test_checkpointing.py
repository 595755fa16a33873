"""Gradient checkpointing on the path `tunelab train` takes: layers really run again in backward,
and the gradients are those of the run without checkpointing (plain and with inputs offloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.offload import offload_checkpoints
from tunelab.backends.torch.random_state import draws_random
from tunelab.errors import ConfigError


def _batch(packed: bool) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int64)
    batch = {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}
    if packed:
        batch["position_ids"] = np.tile(np.r_[np.arange(10), np.arange(14)], (2, 1))
    return batch


def _backend(folder: Path, tokenizer: Any, *, gc: bool, packing: bool, dropout: float = 0.0) -> TorchBackend:
    backend = TorchBackend()
    spec = ModelSpec(str(folder), dtype="float32", device="cpu", gradient_checkpointing=gc, packing=packing)
    backend.load(spec, MethodSpec("lora", dropout=dropout), OptimSpec(), tokenizer)
    return backend


def _mlp_calls(backend: TorchBackend) -> list[int]:
    calls = [0]
    for layer in decoder_layers(backend._causal_lm):
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _grads(backend: TorchBackend) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
def test_checkpointing_recomputes_layers_on_a_loaded_model(
    tiny_model_dir: Path, tiny_tokenizer: Any, packing: bool
) -> None:
    """from_pretrained leaves the base in eval mode, where transformers skips checkpointing without a word."""
    grads = {}
    for gc in (False, True):
        backend = _backend(tiny_model_dir, tiny_tokenizer, gc=gc, packing=packing)
        calls = _mlp_calls(backend)
        backend.forward_backward(_batch(packing), 1.0)
        layers = len(decoder_layers(backend._causal_lm))
        assert calls[0] == (2 * layers if gc else layers)  # each layer ran again in backward
        assert backend.checkpointing == ("on" if gc else "off")
        grads[gc] = _grads(backend)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6)


def test_dropout_is_active_from_the_first_step(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _backend(tiny_model_dir, tiny_tokenizer, gc=False, packing=False, dropout=0.5)
    backend.forward_backward(_batch(False), 1.0)
    dropouts = [m for m in backend.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)


def test_offloaded_checkpoints_give_the_same_gradients_with_dropout(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The offloaded layer replays under the forward's RNG state, so dropout masks match."""
    grads = []
    for offload in (None, True):
        torch.manual_seed(1)
        backend = _backend(tiny_model_dir, tiny_tokenizer, gc=False, packing=False, dropout=0.3)
        if offload:
            checkpoint_layers(decoder_layers(backend._causal_lm), offload=True)
            backend._causal_lm.enable_input_require_grads()
        calls = _mlp_calls(backend)
        torch.manual_seed(2)
        backend.forward_backward(_batch(False), 1.0)
        assert calls[0] == len(decoder_layers(backend._causal_lm)) * (2 if offload else 1)
        grads.append(_grads(backend))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_only_layers_that_can_draw_random_numbers_keep_the_random_state(
    tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    """Saving and restoring the generators costs host time in every layer: a layer without dropout skips it."""
    plain = _backend(tiny_model_dir, tiny_tokenizer, gc=False, packing=False)
    layers = decoder_layers(plain._causal_lm)
    assert not any(draws_random(layer) for layer in layers)
    dropped = _backend(tiny_model_dir, tiny_tokenizer, gc=False, packing=False, dropout=0.3)
    assert all(draws_random(layer) for layer in decoder_layers(dropped._causal_lm))  # PEFT's lora_dropout
    layers[0].self_attn.attention_dropout = 0.1  # transformers' attention reads it in training
    assert draws_random(layers[0]) and not draws_random(layers[1])
    layers[1].self_attn.config.attention_dropout = 0.1  # a rate read from the config at call time
    assert draws_random(layers[1])
    layers[1].self_attn.config.attention_dropout = 0.0
    layers[1].mlp.act_fn = torch.nn.RReLU()  # random in training
    assert draws_random(layers[1])
    layers[1].mlp.act_fn = torch.nn.SiLU()
    layers[1].mlp.hidden_dropout = torch.tensor(0.2)  # a rate held as a tensor
    assert draws_random(layers[1])
    del layers[1].mlp.hidden_dropout
    assert not draws_random(layers[1])
    layers[1].mlp.add_module("router", type("TopKRouter", (torch.nn.Module,), {})())  # may sample: kept
    assert draws_random(layers[1])


def test_offload_switch_is_refused_where_it_cannot_apply() -> None:
    cpu = torch.device("cpu")
    assert not offload_checkpoints(ModelSpec("m", gradient_checkpointing=True), MethodSpec(), cpu)  # auto
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        offload_checkpoints(ModelSpec("m", offload_checkpoints=True), MethodSpec(), cpu)
    with pytest.raises(ConfigError, match="CUDA"):
        offload_checkpoints(ModelSpec("m", gradient_checkpointing=True, offload_checkpoints=True), MethodSpec(), cpu)
