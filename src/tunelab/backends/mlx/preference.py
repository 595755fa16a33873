"""Preference losses on MLX: DPO, IPO, ORPO, SimPO and KTO, the same formulas as the torch backend's.

The backend projects the decoder's states to float32 logits (all positions when compiled, only the
scored ones otherwise) and hands them to :class:`MlxPreferenceLoss` with a ``targets`` dict:
``ids`` (the target of each position), ``seq_index`` (its sequence; ``S`` = none), ``seq_lengths``
(scored tokens per sequence), and ``desirable`` (KTO) and ``ref_seq`` (each sequence's reference
log-prob, from the adapters switched off, a frozen copy, or precomputed) where they apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tunelab.backends.base import Batch, ObjectiveSpec
from tunelab.backends.mlx.layers import set_module
from tunelab.backends.preference import host_arrays
from tunelab.vocab import IGNORE, REFERENCE_OBJECTIVES

Stats = dict[str, tuple[mx.array, Any]]  # (sum, count): a count is a number or an array


@dataclass(frozen=True)
class Scores:
    """Summed log-probs of each unit's two sequences, ``(U, 2)``, and what else an objective reads."""

    policy: mx.array
    reference: mx.array | None
    lengths: mx.array
    desirable: mx.array | None = None


def dpo(s: Scores, spec: ObjectiveSpec) -> tuple[mx.array, Stats]:
    """-log σ(β · ((π_c − ref_c) − (π_r − ref_r)))."""
    assert s.reference is not None
    rewards = spec.beta * (s.policy - s.reference)
    return -nn.log_sigmoid(rewards[:, 0] - rewards[:, 1]), _pair_stats(rewards, s.policy)


def ipo(s: Scores, spec: ObjectiveSpec) -> tuple[mx.array, Stats]:
    """(h − 1/(2β))² with h = (π_c − ref_c) − (π_r − ref_r)."""
    assert s.reference is not None
    ratios = s.policy - s.reference
    losses = mx.square(ratios[:, 0] - ratios[:, 1] - 1 / (2 * spec.beta))
    return losses, _pair_stats(spec.beta * ratios, s.policy)


def simpo(s: Scores, spec: ObjectiveSpec) -> tuple[mx.array, Stats]:
    """-log σ(β/|y_c| · π_c − β/|y_r| · π_r − γ)."""
    rewards = spec.beta * s.policy / mx.maximum(s.lengths, 1)
    return -nn.log_sigmoid(rewards[:, 0] - rewards[:, 1] - spec.gamma), _pair_stats(rewards, s.policy)


def orpo(s: Scores, spec: ObjectiveSpec) -> tuple[mx.array, Stats]:
    """NLL of the chosen (per token) + α · -log σ(log odds_c − log odds_r)."""
    mean = s.policy / mx.maximum(s.lengths, 1)
    log_odds = mean - mx.log1p(-mx.minimum(mx.exp(mean), 1 - 1e-7))
    odds_loss = -nn.log_sigmoid(log_odds[:, 0] - log_odds[:, 1])
    stats = _pair_stats(spec.alpha * mean, s.policy)
    stats["odds_ratio_loss"] = (mx.stop_gradient(odds_loss).sum(), float(odds_loss.shape[0]))
    return -mean[:, 0] + spec.alpha * odds_loss, stats


def kto(s: Scores, spec: ObjectiveSpec) -> tuple[mx.array, Stats]:
    """1 − σ(β(r − z)) for a desirable example, 1 − σ(β(z − r)) otherwise; z from the KL rows, no gradient."""
    assert s.reference is not None and s.desirable is not None
    ratios = s.policy - s.reference
    count = ratios.shape[0]
    kl = mx.maximum(mx.stop_gradient(ratios[:, 1]).mean(), 0) if count else mx.array(0.0)
    good, ratio = s.desirable, ratios[:, 0]
    losses = good * (1 - mx.sigmoid(spec.beta * (ratio - kl))) + (1 - good) * (1 - mx.sigmoid(spec.beta * (kl - ratio)))
    rewards = mx.stop_gradient(spec.beta * ratio)
    right = mx.where(good > 0, rewards > 0, rewards < 0).astype(mx.float32)
    stats: Stats = {
        "rewards/chosen": ((rewards * good).sum(), good.sum()),
        "rewards/rejected": ((rewards * (1 - good)).sum(), (1 - good).sum()),
        "rewards/accuracy": (right.sum(), float(count)),
        "kl": (kl, 1.0),
    }
    return losses, stats


def _pair_stats(rewards: mx.array, policy: mx.array) -> Stats:
    rewards, policy, n = mx.stop_gradient(rewards), mx.stop_gradient(policy), float(rewards.shape[0])
    return {
        "rewards/chosen": (rewards[:, 0].sum(), n),
        "rewards/rejected": (rewards[:, 1].sum(), n),
        "rewards/accuracy": ((rewards[:, 0] > rewards[:, 1]).astype(mx.float32).sum(), n),
        "logps/chosen": (policy[:, 0].sum(), n),
        "logps/rejected": (policy[:, 1].sum(), n),
    }


Formula = Callable[[Scores, ObjectiveSpec], tuple[mx.array, Stats]]


def sequence_logps(logits: mx.array, targets: dict[str, mx.array]) -> mx.array:
    """Each sequence's summed log-prob of its scored targets, ``(S,)``."""
    flat = logits.reshape(-1, logits.shape[-1])
    ids = targets["ids"].reshape(-1)
    tokens = -nn.losses.cross_entropy(flat, mx.where(ids != IGNORE, ids, 0), reduction="none")
    count = targets["seq_lengths"].shape[0]
    return mx.zeros((count + 1,), dtype=mx.float32).at[targets["seq_index"].reshape(-1)].add(tokens)[:count]


class MlxPreferenceLoss:
    """The MLX loss of one preference objective: ``(logits, targets) -> (summed loss, units, stats)``."""

    def __init__(self, spec: ObjectiveSpec, formula: Formula) -> None:
        self.spec = spec
        self.formula = formula
        self.needs_reference = spec.name in REFERENCE_OBJECTIVES

    def __call__(
        self, logits: mx.array, targets: Any
    ) -> tuple[mx.array, mx.array, dict[str, tuple[mx.array, mx.array]]]:
        policy = sequence_logps(logits, targets)
        reference = targets.get("ref_seq")
        desirable = targets.get("desirable")
        scores = Scores(
            policy.reshape(-1, 2),
            reference.reshape(-1, 2) if reference is not None else None,
            targets["seq_lengths"].reshape(-1, 2),
            desirable,
        )
        losses, stats = self.formula(scores, self.spec)
        counts = {name: (total, mx.array(count, dtype=mx.float32)) for name, (total, count) in stats.items()}
        return losses.sum(), mx.array(policy.shape[0] // 2), counts  # arrays only: it may run compiled

    def add_reference(self, targets: dict[str, mx.array], logits: mx.array) -> None:
        """Each sequence's reference log-prob from the reference forward's ``logits``."""
        targets["ref_seq"] = mx.stop_gradient(sequence_logps(logits, targets))


def preference_targets(batch: Batch, width: int, picked: bool) -> tuple[dict[str, mx.array], mx.array | None]:
    """The ``targets`` dict of a preference batch padded to ``width``, and the scored positions if ``picked``."""
    extra = width - batch["input_ids"].shape[1]
    padded = {
        k: np.pad(v, ((0, 0), (0, extra)), constant_values=IGNORE if k == "labels" else 0) for k, v in batch.items()
    }
    arrays = host_arrays(padded)
    positions = arrays.pop("positions")
    shifted = padded["labels"][:, 1:]
    if picked:
        ids, seq_index = shifted.reshape(-1)[positions], arrays.pop("seq_index")
    else:
        ids = shifted
        seq_index = np.full(shifted.size, len(arrays["seq_lengths"]), dtype=np.int64)
        seq_index[positions] = arrays.pop("seq_index")
        seq_index = seq_index.reshape(shifted.shape)
    targets = {
        "ids": mx.array(ids.astype(np.int32)),
        "seq_index": mx.array(seq_index.astype(np.int32)),
        **{k: mx.array(v) for k, v in arrays.items()},
    }
    return targets, mx.array(positions.astype(np.int32)) if picked else None


@contextmanager
def adapters_off(model: Any, adapters: dict[str, Any]) -> Iterator[None]:
    """The base model: every LoRA/DoRA layer swapped for the frozen linear it wraps, for the duration."""
    for path, layer in adapters.items():
        set_module(model, path, layer.base)
    try:
        yield
    finally:
        for path, layer in adapters.items():
            set_module(model, path, layer)


def reference_rows(reference_logits: Callable[..., mx.array], batch: Batch, *, picked: bool) -> np.ndarray:
    """Each labelled token's reference log-prob, laid out like ``input_ids`` (0 elsewhere): precompute_ref.

    ``reference_logits(ids, picked)`` is the backend's reference forward (logits at the picked
    flat positions of ``labels[:, 1:]``, or at every position when ``picked`` is None).
    """
    positions = np.flatnonzero(batch["labels"][:, 1:] != IGNORE)
    at = mx.array(positions.astype(np.int32))
    logits = reference_logits(mx.array(batch["input_ids"].astype(np.int32)), at if picked else None)
    logits = logits.reshape(-1, logits.shape[-1])
    if not picked:
        logits = logits[at]
    targets = mx.array(batch["labels"][:, 1:].reshape(-1)[positions].astype(np.int32))
    tokens = -nn.losses.cross_entropy(logits, targets, reduction="none")
    return _scatter_rows(np.array(tokens), positions, batch["input_ids"].shape)


def _scatter_rows(tokens: np.ndarray, positions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-token values at flat ``positions`` of ``labels[:, 1:]`` laid out like ``input_ids`` (0 elsewhere)."""
    rows, width = shape
    shifted = np.zeros(rows * (width - 1), dtype=np.float32)
    shifted[positions] = tokens
    return np.concatenate([np.zeros((rows, 1), np.float32), shifted.reshape(rows, width - 1)], axis=1)
