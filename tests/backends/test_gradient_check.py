"""The first optimizer step names the trained tensors that got no gradient, and says when every gradient is zero
(a cut graph, or a backward routed to the wrong slot, trains nothing, silently)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from tests.backends.conftest import load_backend, random_batch

from tunelab.backends.torch.loading import decoder_layers


def _step(backend: Any) -> None:
    backend.forward_backward(random_batch(), 1.0)
    backend.optimizer_step(1e-3)


def test_a_layer_cut_from_the_graph_is_named_once(
    tiny_model_dir: Path, tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    first = decoder_layers(backend._causal_lm)[0]

    # The first layer's output leaves the graph: nothing below it can get a gradient, as when a rewrite or a
    # compiler cuts it.  The other layers still train, so the backward itself succeeds.
    def cut(_module: Any, _inputs: Any, out: Any) -> Any:
        return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()

    first.register_forward_hook(cut)
    trained_in_first = [n for n, p in first.named_parameters() if p.requires_grad]
    with caplog.at_level(logging.WARNING, logger="tunelab.backends.torch.gradient_check"):
        _step(backend)
        _step(backend)
    warnings = [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]
    assert len(warnings) == 1  # said at the first step only
    total = sum(1 for p in backend.model.parameters() if p.requires_grad)
    assert warnings[0].startswith(f"{len(trained_in_first)} of {total} trained tensors got no gradient")
    assert "layers.0." in warnings[0] and "layers.1." not in warnings[0]
    assert "more" in warnings[0]  # more than the three it names


def test_a_whole_graph_says_nothing(
    tiny_model_dir: Path, tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="tunelab.backends.torch.gradient_check"):
        _step(backend)
    assert not [r for r in caplog.records if "got no gradient" in r.getMessage() or "is zero" in r.getMessage()]


def test_gradients_that_are_all_zero_are_said_once(
    tiny_model_dir: Path, tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    last = decoder_layers(backend._causal_lm)[-1]

    # Every trained tensor stays in the graph, but no gradient flows back through the last layer's output:
    # each gradient exists and is zero, as when a compiler routed a custom backward's result to the wrong
    # slot (torch 2.11 did that to joined A under CUDA autocast).
    def zeroed(_module: Any, _inputs: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.detach() + 0.0 * hidden
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    last.register_forward_hook(zeroed)
    with caplog.at_level(logging.WARNING, logger="tunelab.backends.torch.gradient_check"):
        _step(backend)
        _step(backend)
    assert all(p.grad is None or not p.grad.any() for p in backend.model.parameters())
    said = [r.getMessage() for r in caplog.records if "is zero" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("every gradient at the first optimizer step is zero")
    assert not [r for r in caplog.records if "got no gradient" in r.getMessage()]  # they all have one
