"""gate/up (and q/k/v) with B joined into the base products: the base weights untouched and held once, the
joined columns following B, backward keeping x A^T alone, and which bases join (the rest, shared with
joined A: test_joined_products.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import load_backend
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.torch import joined_b
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.loading import decoder_layers


@pytest.fixture(autouse=True, params=[("mlp",), ("mlp", "self_attn")], ids=["gate_up", "and_qkv"])
def groups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    """Every test runs with gate/up joined alone (the default) and with q/k/v joined too."""
    monkeypatch.setattr(joined_b, "GROUPS", request.param)
    return tuple(request.param)


def _load(folder: Path, tokenizer: Any, *, joined: bool, device: str = "cpu", dtype: str = "float32") -> TorchBackend:
    backend: TorchBackend = load_backend(folder, tokenizer, device=device, dtype=dtype, switches=((joined_b, joined),))
    return backend


def test_the_base_weights_stay_whole_and_are_held_once(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    backend = _load(tiny_model_dir, tiny_tokenizer, joined=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for layer, mine in zip(decoder_layers(original), decoder_layers(backend._causal_lm), strict=True):
        for name in ("gate_proj", "up_proj"):
            module = getattr(mine.mlp, name)
            weight, joined = module.base_layer.weight, getattr(module, joined_b.BUFFER)
            torch.testing.assert_close(weight, getattr(layer.mlp, name).weight, rtol=0, atol=0)
            assert weight.data_ptr() == joined.data_ptr()  # a view: W is not held twice
    keys = backend.model.state_dict().keys()
    assert not any(joined_b.BUFFER in k for k in keys)  # nothing new is saved


def test_the_joined_weights_follow_b_only_when_it_changes(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _load(tiny_model_dir, tiny_tokenizer, joined=True)
    ids = torch.tensor(_batch()["input_ids"])
    gate = decoder_layers(backend._causal_lm)[0].mlp.gate_proj
    start, _, rank = gate._joined_cols
    cols = getattr(gate, joined_b.BUFFER)[:, start : start + rank]
    with torch.no_grad():
        backend.model(input_ids=ids)  # B was set after loading: refreshed here
        torch.testing.assert_close(cols, gate.lora_B["default"].weight * gate.scaling["default"])
        cols.fill_(7.0)  # not B's: only a refresh would overwrite it
        backend.model(input_ids=ids)
        assert bool((cols == 7.0).all())  # B unchanged since: nothing copied
        gate.lora_B["default"].weight.mul_(0.5)
        backend.model(input_ids=ids)
        torch.testing.assert_close(cols, gate.lora_B["default"].weight * gate.scaling["default"])


def test_the_groups_named_join_and_backward_keeps_x_a_not_the_joined_input(
    tiny_model_dir: Path, tiny_tokenizer: Any, groups: tuple[str, ...]
) -> None:
    backend = _load(tiny_model_dir, tiny_tokenizer, joined=True)
    layer = decoder_layers(backend._causal_lm)[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert (getattr(getattr(layer.self_attn, name), joined_b.BUFFER, None) is not None) is ("self_attn" in groups)
    assert getattr(layer.self_attn.o_proj, joined_b.BUFFER, None) is None  # not in a shared group
    hidden = layer.mlp.gate_proj.base_layer.weight.shape[1]
    widths = {hidden + sum(m._shared_ranks) for m in (layer.self_attn.q_proj, layer.mlp.gate_proj)}
    weights = {t.data_ptr() for t in (*backend.model.parameters(), *backend.model.buffers())}
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:  # activations only (the joined weights are as wide too)
            saved.append(tuple(t.shape))
        return t

    ids = torch.tensor(_batch()["input_ids"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.model(input_ids=ids).logits.float().sum().backward()
    assert saved and not [s for s in saved if s[-1] in widths]  # [x, x A^T] is as wide as the layer


def test_only_plain_floating_frozen_bases_join(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _load(tiny_model_dir, tiny_tokenizer, joined=True)
    gate = decoder_layers(backend._causal_lm)[0].mlp.gate_proj
    assert joined_b.why_not(gate) is None
    gate.base_layer.weight.requires_grad_(True)
    assert "trains" in str(joined_b.why_not(gate))
    assert joined_b.why_not(decoder_layers(backend._causal_lm)[0].mlp) == "not a plain linear base"
    off = _load(tiny_model_dir, tiny_tokenizer, joined=False)
    assert getattr(decoder_layers(off._causal_lm)[0].mlp.gate_proj, joined_b.BUFFER, None) is None
