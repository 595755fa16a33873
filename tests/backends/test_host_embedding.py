"""train.offload_embeddings: the frozen input-embedding table in CPU memory gives the run it replaces,
and the switch is refused, with the reason, wherever it can't apply."""

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
from tunelab.backends.torch.host_embedding import (
    PREPARED_AT_MOST,
    HostEmbedding,
    host_embedding_applies,
    move_embeddings_to_host,
)
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.offload import offload_embeddings
from tunelab.errors import ConfigError


def _backend(folder: Path, tokenizer: Any, method: str = "lora") -> TorchBackend:
    backend = TorchBackend()
    spec = ModelSpec(str(folder), dtype="float32", device="cpu")
    backend.load(spec, MethodSpec(method), OptimSpec(), tokenizer)
    return backend


def _step(backend: TorchBackend) -> tuple[float, dict[str, torch.Tensor]]:
    loss = float(backend.forward_backward(_batch(), 1.0).loss_sum)
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return loss, grads


def test_a_host_table_gives_the_same_loss_and_gradients(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """With offloaded checkpoints too: the first layer's adapters get their gradient with no input needing one."""
    results = []
    for host in (False, True):
        backend = _backend(tiny_model_dir, tiny_tokenizer)
        base = backend._causal_lm
        checkpoint_layers(decoder_layers(base), offload=True)
        if host:
            backend._host_embed = move_embeddings_to_host(base, backend.device)
            assert isinstance(base.get_input_embeddings(), HostEmbedding)
            assert not any("embed_tokens" in n for n, _ in base.named_parameters())  # nothing left to move or train
        gathers = []
        if host:
            inner = backend._host_embed._host_rows  # type: ignore[union-attr]
            backend._host_embed._host_rows = lambda ids, seen=gathers, f=inner: seen.append(ids) or f(ids)  # type: ignore[union-attr]
        results.append(_step(backend))
        if host:
            assert len(gathers) == 1  # primed from the host batch; the forward gathered nothing again
    (loss, grads), (host_loss, host_grads) = results
    assert host_loss == pytest.approx(loss, rel=1e-6)
    assert host_grads.keys() == grads.keys() and any("layers.0." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(host_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_an_unprimed_forward_looks_rows_up_itself(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _backend(tiny_model_dir, tiny_tokenizer)
    table = backend._causal_lm.get_input_embeddings().weight.detach().clone()
    host = move_embeddings_to_host(backend._causal_lm, backend.device)
    ids = torch.tensor([[5, 7, 5], [1, 2, 3]])
    torch.testing.assert_close(host(ids), table[ids], rtol=0, atol=0)
    host.prime(ids.numpy(), ids.clone())  # primed for another tensor object: not used for this one
    torch.testing.assert_close(host(ids), table[ids], rtol=0, atol=0)


def test_rows_gathered_ahead_serve_only_the_same_ids(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """prepare (the loader's thread) gathers ahead; prime takes those rows for equal ids and gathers others itself."""
    backend = _backend(tiny_model_dir, tiny_tokenizer)
    table = backend._causal_lm.get_input_embeddings().weight.detach().clone()
    host = move_embeddings_to_host(backend._causal_lm, backend.device)
    first, other = np.array([[5, 7, 5], [1, 2, 3]]), np.array([[5, 7, 6], [1, 2, 3]])
    host.prepare(first, waiting=4)
    first[0, 0] = 9  # the caller reuses its array: what was prepared is a copy
    host.prime(other, ids := torch.from_numpy(other))  # not the ids prepared: gathered now
    torch.testing.assert_close(host(ids), table[ids], rtol=0, atol=0)
    assert len(host._prepared) == 1
    first[0, 0] = 5
    host.prime(first, ids := torch.from_numpy(first))
    torch.testing.assert_close(host(ids), table[ids], rtol=0, atol=0)
    assert not host._prepared  # claimed
    for row in range(6):  # never claimed (another process's share, a cursor that moved): bounded
        host.prepare(np.full((1, 2), row), waiting=4)
    assert [int(ids[0, 0]) for ids, _ in host._prepared] == [2, 3, 4, 5]  # the newest kept
    host.prime(np.full((1, 2), 4), torch.zeros(1, 2, dtype=torch.long))  # and those before a claimed one dropped
    assert [int(ids[0, 0]) for ids, _ in host._prepared] == [5]
    for row in range(PREPARED_AT_MOST + 2):
        host.prepare(np.full((1, 2), row), waiting=10**6)
    assert len(host._prepared) == PREPARED_AT_MOST


def test_the_switch_says_why_it_cannot_apply(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _backend(tiny_model_dir, tiny_tokenizer)
    base, cpu = backend._causal_lm, torch.device("cpu")
    spec = ModelSpec("m", gradient_checkpointing=True, offload_embeddings=True)
    assert not offload_embeddings(ModelSpec("m"), MethodSpec(), base, cpu, checkpoints_offloaded=True)  # auto, CPU: off
    assert not offload_embeddings(ModelSpec("m", offload_embeddings="auto"), MethodSpec(), base, cpu, False)
    assert not offload_embeddings(ModelSpec("m", offload_embeddings=False), MethodSpec(), base, cpu, True)
    with pytest.raises(ConfigError, match="CUDA"):
        offload_embeddings(spec, MethodSpec(), base, cpu, checkpoints_offloaded=True)
    assert "trains the input embeddings" in str(host_embedding_applies(base, trainable_embeddings=True))
    assert host_embedding_applies(base, trainable_embeddings=False) is None
    base.get_output_embeddings().weight = base.get_input_embeddings().weight  # tied, as Llama 3.2 1B is
    assert "ties" in str(host_embedding_applies(base, trainable_embeddings=False))
