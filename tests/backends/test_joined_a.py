"""o_proj and down_proj with A joined into the base products: the base weights held once, the joined rows
following A, which adapters join, and a replay's lean down projection kept (the rest, shared with joined B:
test_joined_products.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import (
    assert_same_loss_and_grads,
    load_backend,
    random_batch,
    two_steps,
)

from tunelab.backends.torch import joined_a
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.loading import decoder_layers


def _load(folder: Path, tokenizer: Any, *, joined: bool, dtype: str = "float32", device: str = "cpu") -> TorchBackend:
    backend: TorchBackend = load_backend(folder, tokenizer, device=device, dtype=dtype, switches=((joined_a, joined),))
    return backend


def _same(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    assert_same_loss_and_grads(a, b, "down_proj.lora_A", tol)
    assert_same_loss_and_grads(a, b, "o_proj.lora_B", tol)


def test_w_is_held_once_and_a_s_rows_follow_a_only_when_it_changes(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    backend = _load(tiny_model_dir, tiny_tokenizer, joined=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for layer, mine in zip(decoder_layers(original), decoder_layers(backend._causal_lm), strict=True):
        for parent, name in joined_a.TARGETS:
            module = getattr(getattr(mine, parent), name)
            weight, joined = module.base_layer.weight, getattr(module, joined_a.BUFFER)
            torch.testing.assert_close(weight, getattr(getattr(layer, parent), name).weight, rtol=0, atol=0)
            assert weight.data_ptr() == joined.data_ptr()  # a view: W is not held twice
    assert not any(joined_a.BUFFER in k for k in backend.model.state_dict())  # nothing new is saved
    down = decoder_layers(backend._causal_lm)[0].mlp.down_proj
    a = down.lora_A["default"].weight
    rows = getattr(down, joined_a.BUFFER)[-a.shape[0] :]
    ids = torch.tensor(random_batch()["input_ids"])
    with torch.no_grad():
        backend.model(input_ids=ids)
        torch.testing.assert_close(rows, a)
        rows.fill_(7.0)  # not A's: only a refresh would overwrite it
        backend.model(input_ids=ids)
        assert bool((rows == 7.0).all())  # A unchanged since: nothing copied
        a.mul_(0.5)
        backend.model(input_ids=ids)
        torch.testing.assert_close(rows, a)


def test_only_plain_adapters_on_plain_frozen_bases_join(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from tunelab.backends.base import MethodSpec

    dora = load_backend(tiny_model_dir, tiny_tokenizer, MethodSpec("dora"), switches=((joined_a, True),))
    dropout = load_backend(
        tiny_model_dir, tiny_tokenizer, MethodSpec("lora", dropout=0.1), switches=((joined_a, True),)
    )
    for backend in (dora, dropout):
        assert getattr(decoder_layers(backend._causal_lm)[0].mlp.down_proj, joined_a.BUFFER, None) is None
    off = _load(tiny_model_dir, tiny_tokenizer, joined=False)
    assert getattr(decoder_layers(off._causal_lm)[0].mlp.down_proj, joined_a.BUFFER, None) is None


def test_a_replay_s_down_projection_runs_joined_and_unread_with_peft_s_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lean_replay's class goes in front; on a replay it hands a joined down projection to joined_a.replayed."""
    from tunelab.backends.torch.lean_replay import lean_down_projections

    calls = []
    original = joined_a.replayed
    monkeypatch.setattr(joined_a, "replayed", lambda module, x: calls.append(x.shape) or original(module, x))
    runs = []
    for joined in (False, True):
        backend = _load(tiny_model_dir, tiny_tokenizer, joined=joined)
        assert lean_down_projections(backend._causal_lm) == len(decoder_layers(backend._causal_lm))
        down = decoder_layers(backend._causal_lm)[0].mlp.down_proj
        names = [c.__name__ for c in type(down).__mro__]
        assert ("_JoinedA" in names) is joined and names.index("_LeanDown") < names.index("Linear")
        if joined:
            assert names.index("_LeanDown") < names.index("_JoinedA")  # a replay takes the lean path first
        runs.append(two_steps(backend, checkpoints=True))
    _same(runs[1], runs[0])
    assert len(calls) == 2 * len(decoder_layers(backend._causal_lm))  # every layer's replay, both steps
