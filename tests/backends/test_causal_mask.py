"""Rows that need only the causal mask: no mask built and no packed-row search (the GPU reads), the same losses
and gradients as before; every other request still gets transformers' own mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.backends.conftest import assert_same_loss_and_grads, load_backend, random_batch

from tunelab.backends.torch import causal_mask


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count transformers' packed-row searches and the masks its sdpa function builds."""
    import transformers.masking_utils as masking

    calls = {"packed": 0, "built": 0}
    search, sdpa = masking.find_packed_sequence_indices, masking.sdpa_mask

    def counted_search(*args: Any, **kwargs: Any) -> Any:
        calls["packed"] += 1
        return search(*args, **kwargs)

    def counted_sdpa(*args: Any, **kwargs: Any) -> Any:
        calls["built"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(masking, "find_packed_sequence_indices", counted_search)
    monkeypatch.setattr(masking, "sdpa_mask", counted_sdpa)
    # Registered for "sdpa" (the next load wraps it), and put back as it was after the test.
    monkeypatch.setitem(masking.AttentionMaskInterface._global_mapping, "sdpa", counted_sdpa)
    return calls


def _step(backend: Any, batch: dict[str, np.ndarray]) -> tuple:
    loss = float(backend.forward_backward(batch, 1.0).loss_sum)
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    backend.model.zero_grad(set_to_none=True)
    return loss, grads


def _padded(right: bool) -> dict[str, np.ndarray]:
    batch = random_batch()
    mask = np.ones_like(batch["attention_mask"])
    if right:
        mask[0, -5:] = 0
    else:
        mask[0, :5] = 0
    labels = np.where(mask == 1, batch["labels"], -100)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("right_padded", [None, True])
def test_causal_rows_build_no_mask_and_train_as_before(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, right_padded: bool | None
) -> None:
    """Full rows, or rows padded at their ends: the step asks transformers for nothing that reads the device."""
    calls = _spy(monkeypatch)
    batch = random_batch() if right_padded is None else _padded(right=True)
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    assert backend._causal_skip
    ours = _step(backend, batch)
    assert calls == {"packed": 0, "built": 0}
    backend._causal_skip = False  # as before: the mask dropped, transformers searches for packed rows
    theirs = _step(backend, batch)
    assert calls["packed"] > 0
    assert_same_loss_and_grads(ours, theirs, "lora_A", 1e-6)


def test_left_padded_rows_still_get_transformers_mask(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch)
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    batch = _padded(right=False)
    ours = _step(backend, batch)
    assert calls["built"] > 0  # the padding matters here
    with torch.no_grad():  # the model's own forward with the same mask scores the same tokens
        ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
        logits = backend.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = torch.tensor(batch["labels"])[:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")  # fmt: skip
    assert ours[0] == pytest.approx(float(expected), rel=1e-5)


def test_only_the_plain_causal_mask_is_skipped_and_only_inside_the_block() -> None:
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        causal_mask_function,
        sliding_window_causal_mask_function,
    )

    assert causal_mask.install("sdpa") and causal_mask.install("sdpa")  # idempotent
    assert not causal_mask.install("eager") and not causal_mask.applies("flex_attention")
    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    args = dict(batch_size=2, q_length=4, kv_length=4, attention_mask=padding, allow_is_causal_skip=True)
    outside = mask(mask_function=causal_mask_function, **args)
    assert isinstance(outside, torch.Tensor) and outside.shape == (2, 1, 4, 4)
    with causal_mask.causal_only():
        assert mask(mask_function=causal_mask_function, **args) is None
        window = mask(mask_function=sliding_window_causal_mask_function(2), **args)
        assert isinstance(window, torch.Tensor) and not bool(window[1, 0, 3, 0])  # the window still applies
        prefixed = dict(args, kv_length=6, attention_mask=torch.ones(2, 6, dtype=torch.bool))  # a prefix's keys
        assert isinstance(mask(mask_function=causal_mask_function, **prefixed), torch.Tensor)
        assert isinstance(mask(mask_function=causal_mask_function, **(args | {"allow_is_causal_skip": False})),
                          torch.Tensor)  # fmt: skip
        with causal_mask.causal_only(False):
            assert isinstance(mask(mask_function=causal_mask_function, **args), torch.Tensor)
    torch.testing.assert_close(mask(mask_function=causal_mask_function, **args), outside)


def test_switched_off_the_step_drops_the_mask_as_before(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(causal_mask, "ON", False)
    assert not causal_mask.applies("sdpa")
    backend = load_backend(tiny_model_dir, tiny_tokenizer)
    assert not backend._causal_skip
    shaped, causal = backend._shaped(random_batch())
    assert "attention_mask" not in shaped and not causal
