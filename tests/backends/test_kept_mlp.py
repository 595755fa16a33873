"""train.offload_mlp: the MLP parks gate and up on an offloaded checkpoint's first run, and its replay computes
no MLP matrix product, yet every gradient equals the plain checkpoint's (dropout masks included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.kept_mlp import keep_mlps, kept_mlp_applies
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.offload import offload_mlp
from tunelab.errors import ConfigError


def _run(
    folder: Path, tokenizer: Any, *, budget: int | None, offload: bool | None, dropout: float, count: int | None = None
) -> tuple:
    """``budget``: keep the MLPs with that many bytes of CPU memory (None: don't); ``offload`` as in checkpointing."""
    torch.manual_seed(1)
    backend = TorchBackend()
    backend.load(ModelSpec(str(folder), dtype="float32", device="cpu"), MethodSpec("lora", dropout=dropout),
                 OptimSpec(), tokenizer)  # fmt: skip
    base = backend._causal_lm
    if budget is not None:
        assert keep_mlps(base, budget, count) == (count or len(decoder_layers(base)))
    if offload is not None:
        checkpoint_layers(decoder_layers(base), offload=offload)
        base.enable_input_require_grads()
    calls = [0]
    for layer in decoder_layers(base):
        layer.mlp.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch.manual_seed(2)
    losses = [float(backend.forward_backward(_batch(), 1.0).loss_sum) for _ in range(2)]  # two micro-batches accumulate
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return losses, grads, calls[0] // (2 * len(decoder_layers(base)))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kept_mlp_gives_the_checkpoints_gradients_without_running_the_mlp_again(
    tiny_model_dir: Path, tiny_tokenizer: Any, dropout: float
) -> None:
    losses, grads, calls = _run(tiny_model_dir, tiny_tokenizer, budget=None, offload=True, dropout=dropout)
    kept_losses, kept_grads, kept_calls = _run(tiny_model_dir, tiny_tokenizer, budget=2**30, offload=True,
                                               dropout=dropout)  # fmt: skip
    assert kept_losses == pytest.approx(losses, rel=1e-6)
    assert kept_grads.keys() == grads.keys() and any("mlp.down_proj.lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7)
    assert (calls, kept_calls) == (2, 1)  # the plain replay runs the MLP again; the kept one doesn't


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_only_a_kept_mlp_that_can_draw_saves_the_random_state(
    tiny_model_dir: Path, tiny_tokenizer: Any, random_state_saves: list[int], dropout: float
) -> None:
    """Saving and restoring the generators costs host time in every layer; without dropout nothing is drawn again."""
    _run(tiny_model_dir, tiny_tokenizer, budget=2**30, offload=True, dropout=dropout)
    # two micro-batches over two layers: with dropout each layer's checkpoint and its kept MLP save; else none
    assert random_state_saves[0] == (2 * 2 * 2 if dropout else 0)


def test_kept_mlp_matches_an_uncheckpointed_step(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    losses, grads, _ = _run(tiny_model_dir, tiny_tokenizer, budget=None, offload=None, dropout=0.0)
    kept_losses, kept_grads, _ = _run(tiny_model_dir, tiny_tokenizer, budget=2**30, offload=True, dropout=0.0)
    assert kept_losses == pytest.approx(losses, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_only_the_first_layers_park_when_told_so(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    _, grads, _ = _run(tiny_model_dir, tiny_tokenizer, budget=None, offload=True, dropout=0.0)
    _, kept_grads, _ = _run(tiny_model_dir, tiny_tokenizer, budget=2**30, offload=True, dropout=0.0, count=1)
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_a_micro_batch_over_the_cpu_budget_runs_the_mlp_again(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    _, grads, _ = _run(tiny_model_dir, tiny_tokenizer, budget=None, offload=True, dropout=0.0)
    _, kept_grads, calls = _run(tiny_model_dir, tiny_tokenizer, budget=1, offload=True, dropout=0.0)
    assert calls == 2  # nothing parked: the replay runs the MLP as before
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-6, atol=1e-8)


def test_offload_mlp_true_where_it_cant_apply_says_why(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert kept_mlp_applies(base, "lora", None) is None
    assert "method: dora" in (kept_mlp_applies(base, "dora", None) or "")
    assert "8-bit" in (kept_mlp_applies(base, "qlora", 8) or "")
    on, cpu, layers = ModelSpec("m", offload_mlp=True), torch.device("cpu"), len(decoder_layers(base))
    assert offload_mlp(on, MethodSpec("lora"), base, cpu, checkpoints_offloaded=True) == layers
    assert offload_mlp(ModelSpec("m", offload_mlp=1), MethodSpec("lora"), base, cpu, True) == 1
    assert offload_mlp(ModelSpec("m"), MethodSpec("lora"), base, cpu, True) == 0  # the default: off
    assert (
        offload_mlp(ModelSpec("m", offload_mlp="auto"), MethodSpec("full"), base, cpu, True) == 0
    )  # auto: quietly off
    with pytest.raises(ConfigError, match="offloaded checkpoints"):
        offload_mlp(on, MethodSpec("lora"), base, cpu, checkpoints_offloaded=False)
    with pytest.raises(ConfigError, match="tiles its MLPs") as tiled:
        offload_mlp(ModelSpec("m", offload_mlp=True, tiled_mlp=True), MethodSpec("lora"), base, cpu, True)
    assert "tiled_mlp: false" in str(tiled.value.hint)
    with pytest.raises(ConfigError, match="full"):
        offload_mlp(on, MethodSpec("full"), base, cpu, checkpoints_offloaded=True)


def test_parked_layers_follow_the_machines_compute_to_copy_ratio(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch.host_link import HostLink
    from tunelab.backends.torch.kept_mlp import parked_layers

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = len(decoder_layers(base))
    assert parked_layers(base, HostLink(flops=1e12, bytes_per_s=1e12)) == layers  # copies far faster than compute
    assert parked_layers(base, HostLink(flops=1e15, bytes_per_s=1e9)) == 0  # a slow link: nothing parks
    some = parked_layers(base, HostLink(flops=7e14, bytes_per_s=5e10))
    assert 0 <= some <= layers
