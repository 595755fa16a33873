"""GRPO on MLX: the same clipped policy loss as the torch backend's, and group sampling over mlx-lm's cache.

The loss (see :mod:`tunelab.backends.torch.grpo` for the formula) takes float32 logits and a ``targets``
dict: ``ids`` (each scored position's target, ``IGNORE`` elsewhere when every position is projected),
``old`` and ``adv`` (the sampling-time log-prob and the advantage of each), and ``ref`` (the reference
model's log-prob of each, added by the backend when ``beta`` > 0).

Sampling batches the rows whose prompts have the same length (a prompt's group always does), so no row is
padded and mlx-lm's KV cache serves them as they are; each token is drawn by inverting the tempered CDF at
the caller's uniform number, as on torch, so the trainer owns (and checkpoints) the random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tunelab.backends.base import Batch, ObjectiveSpec
from tunelab.vocab import IGNORE

Stats = dict[str, tuple[mx.array, mx.array]]


def grpo_token_losses(
    policy: mx.array, old: mx.array, advantages: mx.array, reference: mx.array | None, spec: ObjectiveSpec
) -> tuple[mx.array, Stats]:
    """Each token's −min(r·A, clip(r)·A) + β·KL (k3), and the diagnostics as (sum, count) over ``count`` tokens."""
    ratio = mx.exp(policy - old)
    clipped = mx.clip(ratio, 1 - spec.epsilon, 1 + spec.epsilon)
    losses = -mx.minimum(ratio * advantages, clipped * advantages)
    count = mx.array(float(policy.size), dtype=mx.float32)
    outside = mx.stop_gradient(ratio != clipped).astype(mx.float32)
    stats: Stats = {"clip_ratio": (outside.sum(), count)}
    if reference is not None:
        delta = reference - policy
        kl = mx.exp(delta) - delta - 1
        losses = losses + spec.beta * kl
        stats["kl"] = (mx.stop_gradient(kl).sum(), count)
    return losses, stats


def token_logps(logits: mx.array, ids: mx.array) -> mx.array:
    """Each position's log-prob of its target (0 where the target is ``IGNORE``), flat."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = ids.reshape(-1)
    mask = targets != IGNORE
    return mx.where(mask, -nn.losses.cross_entropy(flat, mx.where(mask, targets, 0), reduction="none"), 0.0)


class MlxGrpoLoss:
    """The MLX loss of ``objective.name: grpo``: ``(logits, targets) -> (summed loss, tokens, stats)``."""

    def __init__(self, spec: ObjectiveSpec) -> None:
        self.spec = spec
        self.needs_reference = spec.beta > 0

    def __call__(self, logits: mx.array, targets: Any) -> tuple[mx.array, mx.array, Stats]:
        mask = (targets["ids"].reshape(-1) != IGNORE).astype(mx.float32)
        policy = token_logps(logits, targets["ids"])
        reference = targets.get("ref")
        losses, stats = grpo_token_losses(
            policy, targets["old"].reshape(-1), targets["adv"].reshape(-1), reference, self.spec
        )
        # Compiled, every position is projected: one without a target has policy = old = ref = 0 there,
        # so its loss, clipping and KL are 0; only the counts must be the scored tokens.
        tokens = mask.sum()
        return (losses * mask).sum(), tokens, {name: (total, tokens) for name, (total, _) in stats.items()}

    def add_reference(self, targets: dict[str, mx.array], logits: mx.array) -> None:
        """The reference model's log-prob of every scored token (the backend's reference forward)."""
        targets["ref"] = mx.stop_gradient(token_logps(logits, targets["ids"]))


def grpo_targets(batch: Batch, width: int, picked: bool) -> tuple[dict[str, mx.array], mx.array | None]:
    """The ``targets`` dict of a GRPO batch padded to ``width``, and the scored positions if ``picked``."""
    extra = width - batch["input_ids"].shape[1]
    labels = np.pad(batch["labels"], ((0, 0), (0, extra)), constant_values=IGNORE)[:, 1:]
    old = np.pad(batch["old_logps"], ((0, 0), (0, extra)))[:, 1:]
    adv = np.pad(batch["advantages"], ((0, 0), (0, extra)))[:, 1:]
    if not picked:
        arrays = {"ids": labels.astype(np.int32), "old": old.astype(np.float32), "adv": adv.astype(np.float32)}
        return {k: mx.array(v) for k, v in arrays.items()}, None
    positions = np.flatnonzero(labels.reshape(-1) != IGNORE)
    arrays = {
        "ids": labels.reshape(-1)[positions].astype(np.int32),
        "old": old.reshape(-1)[positions].astype(np.float32),
        "adv": adv.reshape(-1)[positions].astype(np.float32),
    }
    return {k: mx.array(v) for k, v in arrays.items()}, mx.array(positions.astype(np.int32))


def sample_completions(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    uniforms: np.ndarray,
    temperature: float,
    stop_ids: Sequence[int],
) -> tuple[list[list[int]], list[list[float]]]:
    """Complete every prompt row (``uniforms``: ``(rows, max_new_tokens)``); ids and untempered log-probs."""
    model.eval()
    tokens: list[list[int]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    for rows in by_length.values():
        drawn, scores = _sample_rows(model, [prompts[r] for r in rows], uniforms[rows], temperature, set(stop_ids))
        for row, ids, values in zip(rows, drawn, scores, strict=True):
            tokens[row], logps[row] = ids, values
    return tokens, logps


def _sample_rows(
    model: Any, prompts: list[Sequence[int]], uniforms: np.ndarray, temperature: float, stops: set[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """Rows whose prompts have one length, batched over one cache; each ends after its first stop id."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(np.asarray(prompts, dtype=np.int32)), cache=cache)[:, -1, :].astype(mx.float32)
    rows, limit = uniforms.shape
    out: list[list[int]] = [[] for _ in range(rows)]
    scores: list[list[float]] = [[] for _ in range(rows)]
    done = np.zeros(rows, dtype=bool)
    for step in range(limit):
        if temperature == 0:  # greedy (validation)
            token = mx.argmax(logits, axis=-1)
        else:
            cdf = mx.cumsum(mx.softmax(logits / temperature, axis=-1), axis=-1)
            target = mx.array(uniforms[:, step].astype(np.float32))[:, None] * cdf[:, -1:]
            token = mx.minimum((cdf <= target).sum(axis=-1), logits.shape[-1] - 1)
        logp = mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), token[:, None], axis=-1)
        mx.eval(token, logp)
        for row, (t, lp) in enumerate(zip(np.array(token).tolist(), np.array(logp).reshape(-1).tolist(),
                                          strict=True)):  # fmt: skip
            if not done[row]:
                out[row].append(int(t))
                scores[row].append(float(lp))
                done[row] = int(t) in stops
        if done.all() or step + 1 == limit:
            break
        logits = model(token.reshape(-1, 1).astype(mx.int32), cache=cache)[:, -1, :].astype(mx.float32)
    return out, scores
