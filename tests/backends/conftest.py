"""Helpers shared by the backend tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def torch_config() -> Iterator[Callable[..., None]]:
    """``torch_config(module, name=value, ...)`` sets torch config values (inductor's, functorch's) for one test.

    Through the config module's own ``patch``, which puts each old value back afterwards.
    ``monkeypatch.setattr`` can't: from pytest 9.2 it undoes an attribute that a module's
    ``__getattr__`` serves with ``delattr``, and torch's config modules read a delete as
    "hide this entry", so every later compile in that process failed on the missing value.
    """
    with contextlib.ExitStack() as stack:
        yield lambda module, **values: stack.enter_context(module.patch(values))


@pytest.fixture
def random_state_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item list counting the calls of ``random_state.saved`` (each a save of the generators) in the test."""
    from tunelab.backends.torch import random_state

    saves = [0]
    real = random_state.saved

    def counted(device: Any) -> Any:
        saves[0] += 1
        return real(device)

    monkeypatch.setattr(random_state, "saved", counted)
    return saves


def load_backend(
    folder: Path,
    tokenizer: Any,
    method: Any = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    switches: tuple[tuple[Any, bool | str], ...] = (),
) -> Any:
    """A ``TorchBackend`` on ``folder`` (seeded), each ``(module, value)`` switch's ``ON`` set only while it
    loads, and every LoRA B given random values: PEFT starts B at zero, and then no adapter term counts."""
    import torch

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend

    torch.manual_seed(1)
    backend = TorchBackend()
    before = [(module, module.ON) for module, _ in switches]
    try:
        for module, value in switches:
            module.ON = value
        backend.load(ModelSpec(str(folder), dtype=dtype, device=device), method or MethodSpec("lora"), OptimSpec(),
                     tokenizer)  # fmt: skip
    finally:
        for module, value in before:
            module.ON = value
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return backend


def random_batch() -> dict[str, np.ndarray]:
    """Two rows of 24 random tokens, every position supervised (the same batch on every call)."""
    ids = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int64)
    return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}


def random_batches(count: int, rows: int, length: int, high: int) -> list[dict[str, np.ndarray]]:
    """``count`` batches of ``rows`` x ``length`` random token ids below ``high``, every position supervised."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, high, size=(rows, length))
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return batches


def assert_switched_off_adapters_give_the_base(backend: Any, folder: Path) -> None:
    """With the adapters disabled (a preference objective's reference model), the output is the base's alone."""
    import torch

    ids = torch.tensor(random_batch()["input_ids"])
    with torch.no_grad():
        with backend.model.disable_adapter():
            off = backend.model(input_ids=ids).logits
        on = backend.model(input_ids=ids).logits
        base = type(backend._causal_lm).from_pretrained(folder, dtype=torch.float32)
        torch.testing.assert_close(off, base(input_ids=ids).logits)
    assert not torch.allclose(on, off)


def assert_same_loss_and_grads(a: tuple, b: tuple, adapter: str, tol: float = 1e-5) -> None:
    """Runs ``(loss, grads, ...)`` agree: the loss to ``tol / 10``, every gradient to ``tol`` of its largest entry
    (summed in another order), and ``adapter`` (a parameter name's part) is among the gradients."""
    import pytest
    import torch

    assert a[0] == pytest.approx(b[0], rel=tol / 10)
    assert a[1].keys() == b[1].keys() and any(adapter in n for n in a[1])
    for name, grad in b[1].items():
        torch.testing.assert_close(a[1][name], grad, rtol=tol, atol=tol * float(grad.abs().max()))


def two_steps(
    backend: Any,
    *,
    compiled: str | None = None,
    checkpoints: bool = False,
    fused: bool = False,
) -> tuple:
    """Two optimizer steps on :func:`random_batch`; returns both losses and the second step's gradients.

    ``fused``: torch's fused AdamW, as on CUDA, which changes the adapters without moving their version
    counters (joined weights must follow anyway)."""
    import torch

    from tunelab.backends.torch.checkpointing import checkpoint_layers
    from tunelab.backends.torch.loading import decoder_layers

    if fused:
        backend._optimizer = torch.optim.AdamW(backend._params, lr=0.0, fused=True)
    layers = decoder_layers(backend._causal_lm)
    if compiled:
        for layer in layers:
            layer.compile(backend=compiled)
    if checkpoints:
        checkpoint_layers(layers, offload=False)
        backend._causal_lm.enable_input_require_grads()
    losses = []
    for step in range(2):
        losses.append(float(backend.forward_backward(random_batch(), 1.0).loss_sum))
        if step == 0:
            backend.optimizer_step(1e-2)  # A and B change: joined weights must follow
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return losses, grads


def compiled_runs(load: Any) -> tuple[list[tuple], list[int]]:
    """``two_steps`` with the layers compiled (aot_eager), for ``load(False)`` and ``load(True)``: each run's
    losses and gradients and its first layer's compiled graphs; fails on any graph break."""
    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from tunelab.backends.torch.loading import decoder_layers

    runs, graphs = [], []
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        backend = load(on)
        runs.append(two_steps(backend, compiled="aot_eager"))
        assert not counters["graph_break"], dict(counters["graph_break"])
        layer = decoder_layers(backend._causal_lm)[0]
        graphs.append(len(_debug_get_cache_entry_list(type(layer).forward.__code__)))
    torch._dynamo.reset()
    return runs, graphs
