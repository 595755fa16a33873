"""GRPO on the torch backend: sampling over the KV cache agrees with the training forward, and the loss's formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunelab.backends.base import MethodSpec, ModelSpec, ObjectiveSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.grpo import grpo_token_losses
from tunelab.train.grpo import Group, build_batch, group_advantages

PROMPTS = ["The cat sat on", "Hello", "What is the answer to the question of the big red house near the river"]


def _backend(model_dir: Path, tokenizer: Any, beta: float) -> TorchBackend:
    backend = TorchBackend()
    spec = ModelSpec(str(model_dir), device="cpu", dtype="float32")
    backend.load(spec, MethodSpec("lora", rank=4, alpha=8), OptimSpec(), tokenizer, ObjectiveSpec("grpo", beta=beta))
    return backend


def _sample(backend: TorchBackend, tokenizer: Any, seed: int, new: int = 12) -> tuple[list[list[int]], Any, Any]:
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(2)]
    uniforms = np.random.default_rng(seed).random((len(prompts), new))
    completions, logps = backend.sample_completions(
        prompts, uniforms=uniforms, temperature=1.0, stop_ids=[tokenizer.eos_token_id]
    )
    return prompts, completions, logps


def test_sampled_log_probs_are_the_training_forwards_and_rows_stop_at_eos(
    tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    backend = _backend(tiny_model_dir, tiny_tokenizer, beta=0.0)
    prompts, completions, logps = _sample(backend, tiny_tokenizer, seed=0)
    eos = tiny_tokenizer.eos_token_id
    for row in completions:
        assert 1 <= len(row) <= 12 and eos not in row[:-1]  # a row ends at its first stop token, or at the limit
    assert _sample(backend, tiny_tokenizer, seed=0)[1] == completions  # the same draws, the same completions
    assert _sample(backend, tiny_tokenizer, seed=1)[1] != completions
    advantages = np.linspace(-1.0, 1.0, len(prompts))
    group = Group(prompts, completions, logps, advantages, np.zeros((len(prompts), 1)))
    tokens = sum(len(c) for c in completions)
    part = backend.forward_backward(build_batch(group, tiny_tokenizer.pad_token_id), 1.0 / tokens)
    # Left-padded prompts over a KV cache in sampling, right-padded rows in training: the same log-probs, so the
    # ratio is 1 for every token, nothing is clipped and the loss is −Σ A over the completion tokens.
    assert part.tokens == tokens
    assert part.stats["clip_ratio"] == (0.0, float(tokens))
    expected = -sum(a * len(c) for a, c in zip(advantages, completions, strict=True))
    assert part.loss_sum == pytest.approx(expected, abs=1e-4)


def test_the_kl_is_zero_until_the_adapter_moves(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    backend = _backend(tiny_model_dir, tiny_tokenizer, beta=0.5)
    prompts, completions, logps = _sample(backend, tiny_tokenizer, seed=2)
    advantages = group_advantages(np.arange(len(prompts), dtype=np.float64), 2)
    batch = build_batch(Group(prompts, completions, logps, advantages, np.zeros((len(prompts), 1))), 0)
    first = backend.forward_backward(batch, 1.0)
    assert first.stats["kl"][0] == pytest.approx(0.0, abs=1e-6)  # a zero-initialised LoRA: policy = reference
    backend.optimizer_step(1e-2)
    assert backend.eval_loss(batch).stats["kl"][0] > 1e-6  # the reference is the base with the adapter off


def test_group_advantages_and_the_clipped_loss_by_hand() -> None:
    adv = group_advantages(np.array([1.0, 0.0, 3.0, 3.0]), 2)
    assert adv[2:].tolist() == [0.0, 0.0]  # a group that scores alike teaches nothing
    assert adv[0] == pytest.approx(0.5 / (np.std([1.0, 0.0], ddof=1) + 1e-4)) and adv[1] == pytest.approx(-adv[0])
    spec = ObjectiveSpec("grpo", beta=0.1, epsilon=0.2)
    policy = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 1.0, 0.5]))  # ratios 2, 2, 0.5, 1
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0])
    reference = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.4]))
    losses, stats = grpo_token_losses(policy, old, advantages, reference, spec)
    delta = reference - policy
    kl = torch.exp(delta) - delta - 1
    # r·A vs clip(r)·A, the smaller taken: 1.2 (clipped), −2 (not), −0.8 (clipped), 2
    expected = -torch.tensor([1.2, -2.0, -0.8, 2.0]) + 0.1 * kl
    torch.testing.assert_close(losses, expected)
    assert stats["clip_ratio"][0].item() == 3.0  # three ratios lie outside [0.8, 1.2]
    assert stats["kl"][0].item() == pytest.approx(float(kl.sum()))
