"""GRPO on MLX: the same loss as torch on the same weights and batch, and sampling that ends rows at EOS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunelab.backends.base import MethodSpec, ModelSpec, ObjectiveSpec, OptimSpec
from tunelab.backends.torch.backend import TorchBackend
from tunelab.train.grpo import Group, build_batch, group_advantages

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

PROMPTS = ["The cat sat on", "Hello", "What is the answer to the big red house"]
SPEC = ObjectiveSpec("grpo", beta=0.3, epsilon=0.2)


def _load(backend: Any, model_dir: Path, tokenizer: Any) -> Any:
    model = ModelSpec(str(model_dir), device="cpu", dtype="float32", compile=False)
    backend.load(model, MethodSpec("lora", rank=4, alpha=8), OptimSpec(), tokenizer, SPEC)
    return backend


def _prompts(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(2)]


def test_one_loss_computation_matches_torch(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from tunelab.backends.mlx.backend import MlxBackend

    on_torch = _load(TorchBackend(), tiny_model_dir, tiny_tokenizer)
    on_mlx = _load(MlxBackend(), tiny_model_dir, tiny_tokenizer)
    prompts = _prompts(tiny_tokenizer)
    uniforms = np.random.default_rng(0).random((len(prompts), 8))
    completions, logps = on_torch.sample_completions(
        prompts, uniforms=uniforms, temperature=1.0, stop_ids=[tiny_tokenizer.eos_token_id]
    )
    # Old log-probs moved off the policy's, so ratios land on both sides of the clip range.
    noise = np.random.default_rng(1)
    old = [[v + float(noise.normal(0, 0.3)) for v in row] for row in logps]
    advantages = group_advantages(np.array([1.0, 0.0, 0.5, 2.0, 3.0, 3.0]), 2)
    batch = build_batch(Group(prompts, completions, old, advantages, np.zeros((6, 1))), tiny_tokenizer.pad_token_id)
    tokens = sum(len(c) for c in completions)
    first = {name: b.forward_backward(batch, 1.0 / tokens) for name, b in (("torch", on_torch), ("mlx", on_mlx))}
    assert first["torch"].tokens == first["mlx"].tokens == tokens
    assert abs(first["torch"].loss_sum - first["mlx"].loss_sum) <= 1e-4 * tokens, first
    assert first["torch"].stats["clip_ratio"] == first["mlx"].stats["clip_ratio"]
    assert first["torch"].stats["clip_ratio"][0] > 0  # the clip is exercised
    for backend in (on_torch, on_mlx):
        backend.optimizer_step(1e-2)
    # After one identical step the adapter has moved: the KL to the adapter-off base is the same on both.
    after = {name: b.eval_loss(batch) for name, b in (("torch", on_torch), ("mlx", on_mlx))}
    assert abs(after["torch"].loss_sum - after["mlx"].loss_sum) <= 1e-4 * tokens, after
    kl = {name: part.stats["kl"][0] for name, part in after.items()}
    assert kl["torch"] > 1e-6 and abs(kl["torch"] - kl["mlx"]) <= 1e-4 * max(kl["torch"], 1e-3), kl


def test_mlx_sampling_stops_at_eos_and_follows_its_draws(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from tunelab.backends.mlx.backend import MlxBackend

    on_mlx = _load(MlxBackend(), tiny_model_dir, tiny_tokenizer)
    prompts, eos = _prompts(tiny_tokenizer), tiny_tokenizer.eos_token_id
    uniforms = np.random.default_rng(3).random((len(prompts), 10))
    completions, logps = on_mlx.sample_completions(prompts, uniforms=uniforms, temperature=1.0, stop_ids=[eos])
    for row, values in zip(completions, logps, strict=True):
        assert 1 <= len(row) == len(values) <= 10 and eos not in row[:-1] and all(v <= 0 for v in values)
    again, _ = on_mlx.sample_completions(prompts, uniforms=uniforms, temperature=1.0, stop_ids=[eos])
    assert again == completions
    # The log-probs are the training forward's: the loss at ratio 1 is −Σ A over the completion tokens.
    advantages = np.linspace(-1.0, 1.0, len(prompts))
    batch = build_batch(Group(prompts, completions, logps, advantages, np.zeros((6, 1))), tiny_tokenizer.pad_token_id)
    part = on_mlx.eval_loss(batch)
    expected = -sum(a * len(c) for a, c in zip(advantages, completions, strict=True))
    assert part.loss_sum == pytest.approx(expected, abs=1e-4) and part.stats["clip_ratio"][0] == 0
