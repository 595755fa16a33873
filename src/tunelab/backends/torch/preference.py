"""Preference losses on torch: DPO, IPO, ORPO, SimPO and KTO, one function each, and their reference.

Every sequence is scored as the summed log-prob of its labelled (response) tokens.  The policy's
scores carry gradients; the reference's (dpo, ipo, kto) come from the same model with its adapter
disabled (no second copy of the weights for LoRA, DoRA or QLoRA), from a frozen copy of the base
(full and freeze), or precomputed before training (``ref_seq`` in the batch).  Each objective
function takes the scores of its units, ``(U, 2)``: (chosen, rejected) per pair, or (example, KL
row) per KTO example, and returns the loss of each unit and its diagnostics as ``(sum, count)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.torch.attention import model_inputs
from tunelab.backends.torch.linear_ce import is_plain_linear, linear_logprobs
from tunelab.config.schema import LOSS_CHUNK_ELEMENTS
from tunelab.vocab import REFERENCE_OBJECTIVES, WHOLE_MODEL_METHODS

Stats = dict[str, tuple[torch.Tensor, float]]


@dataclass(frozen=True)
class Scores:
    """Summed log-probs of each unit's two sequences, ``(U, 2)``, and what else an objective reads."""

    policy: torch.Tensor
    reference: torch.Tensor | None
    lengths: torch.Tensor  # scored tokens per sequence, for the length-normalised objectives
    desirable: torch.Tensor | None = None  # KTO: 1.0 for a desirable example


def dpo(s: Scores, spec: ObjectiveSpec) -> tuple[torch.Tensor, Stats]:
    """-log σ(β · ((π_c − ref_c) − (π_r − ref_r)))  (Rafailov et al., 2023)."""
    assert s.reference is not None
    rewards = spec.beta * (s.policy - s.reference)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), _pair_stats(rewards, s.policy)


def ipo(s: Scores, spec: ObjectiveSpec) -> tuple[torch.Tensor, Stats]:
    """(h − 1/(2β))² with h = (π_c − ref_c) − (π_r − ref_r)  (Azar et al., 2023, summed log-probs)."""
    assert s.reference is not None
    ratios = s.policy - s.reference
    losses = (ratios[:, 0] - ratios[:, 1] - 1 / (2 * spec.beta)) ** 2
    return losses, _pair_stats(spec.beta * ratios, s.policy)


def simpo(s: Scores, spec: ObjectiveSpec) -> tuple[torch.Tensor, Stats]:
    """-log σ(β/|y_c| · π_c − β/|y_r| · π_r − γ)  (Meng et al., 2024): no reference model."""
    rewards = spec.beta * s.policy / s.lengths.clamp(min=1)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - spec.gamma), _pair_stats(rewards, s.policy)


def orpo(s: Scores, spec: ObjectiveSpec) -> tuple[torch.Tensor, Stats]:
    """NLL of the chosen (per token) + α · -log σ(log odds_c − log odds_r)  (Hong et al., 2024): no reference.

    With P the per-token mean probability of a response, odds = P / (1 − P).
    """
    mean = s.policy / s.lengths.clamp(min=1)
    log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-7))
    odds_loss = -F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    stats = _pair_stats(spec.alpha * mean, s.policy)
    stats["odds_ratio_loss"] = (odds_loss.detach().sum(), float(len(odds_loss)))
    return -mean[:, 0] + spec.alpha * odds_loss, stats


def kto(s: Scores, spec: ObjectiveSpec) -> tuple[torch.Tensor, Stats]:
    """1 − σ(β(r − z)) for a desirable example, 1 − σ(β(z − r)) otherwise  (Ethayarajh et al., 2024).

    r = π − ref of the example; z = max(0, mean of π − ref over the KL rows), with no gradient.
    """
    assert s.reference is not None and s.desirable is not None
    ratios = s.policy - s.reference
    kl = ratios[:, 1].detach().mean().clamp(min=0) if len(ratios) else ratios.new_zeros(())
    good = s.desirable
    ratio = ratios[:, 0]
    losses = good * (1 - torch.sigmoid(spec.beta * (ratio - kl))) + (1 - good) * (
        1 - torch.sigmoid(spec.beta * (kl - ratio))
    )
    rewards = (spec.beta * ratio).detach()
    right = torch.where(good > 0, rewards > 0, rewards < 0).float()
    n_good = float(good.sum())
    stats: Stats = {
        "rewards/chosen": ((rewards * good).sum(), n_good),
        "rewards/rejected": ((rewards * (1 - good)).sum(), float(len(good)) - n_good),
        "rewards/accuracy": (right.sum(), float(len(good))),
        "kl": (kl.detach(), 1.0),
    }
    return losses, stats


def _pair_stats(rewards: torch.Tensor, policy: torch.Tensor) -> Stats:
    rewards, policy, n = rewards.detach(), policy.detach(), float(len(rewards))
    return {
        "rewards/chosen": (rewards[:, 0].sum(), n),
        "rewards/rejected": (rewards[:, 1].sum(), n),
        "rewards/accuracy": ((rewards[:, 0] > rewards[:, 1]).float().sum(), n),
        "logps/chosen": (policy[:, 0].sum(), n),
        "logps/rejected": (policy[:, 1].sum(), n),
    }


Formula = Callable[[Scores, ObjectiveSpec], tuple[torch.Tensor, Stats]]


def token_logps(
    causal_lm: Any, forward: Any, batch: dict[str, torch.Tensor], fast: bool, attention: str, positions: torch.Tensor
) -> torch.Tensor:
    """Log-prob of each target at ``positions`` (flat indices into ``labels[:, 1:]``), float32.

    ``fast``: the decoder's hidden states at those positions alone go through the LM head.
    """
    labels = batch["labels"][:, 1:]
    targets = labels.reshape(-1).index_select(0, positions)
    inputs = model_inputs(batch, attention)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if fast:
        hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = causal_lm.get_output_embeddings()
        if is_plain_linear(head) and hidden.shape[0] * head.weight.shape[0] > LOSS_CHUNK_ELEMENTS:
            return linear_logprobs(hidden, head, targets, softcap=cap)  # the whole logits never exist at once
        logits = head(hidden)
    else:
        logits = forward(**inputs, use_cache=False).logits[:, -labels.shape[1] - 1 : -1]
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
    logits = logits.float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return -F.cross_entropy(logits, targets, reduction="none")


class PreferenceLoss:
    """The torch loss of one preference objective (the backend's ``_loss``, called like the SFT loss).

    The batch holds the host layout (``seq_index``, ``seq_lengths``, ``desirable``, ``ref_seq``; see
    :func:`tunelab.backends.preference.host_arrays`); returns (summed loss, units, stats).
    """

    def __init__(self, spec: ObjectiveSpec, formula: Formula) -> None:
        self.spec = spec
        self.formula = formula
        self.needs_reference = spec.name in REFERENCE_OBJECTIVES
        self.reference_model: Any = None  # full/freeze without precompute_ref: a frozen copy of the base
        self.reference_fast = False

    def __call__(
        self,
        causal_lm: Any,
        forward: Any,
        batch: dict[str, torch.Tensor],
        fast: bool,
        attention: str,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, int, Stats]:
        count = batch["seq_lengths"].shape[0]
        reference = None
        if self.needs_reference:
            reference = batch.get("ref_seq")
            if reference is None:
                tokens = self.reference_tokens(causal_lm, forward, batch, fast, attention, positions)
                reference = _per_sequence(tokens, batch["seq_index"], count)
        policy = _per_sequence(
            token_logps(causal_lm, forward, batch, fast, attention, positions), batch["seq_index"], count
        )
        scores = Scores(
            policy.view(-1, 2),
            reference.view(-1, 2) if reference is not None else None,
            batch["seq_lengths"].view(-1, 2),
            batch.get("desirable"),
        )
        losses, stats = self.formula(scores, self.spec)
        return losses.sum() + 0.0 * policy.sum(), count // 2, stats  # an empty piece still has a graph

    @torch.no_grad()
    def reference_tokens(
        self,
        causal_lm: Any,
        forward: Any,
        batch: dict[str, torch.Tensor],
        fast: bool,
        attention: str,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """The reference model's log-prob of each target at ``positions``: adapter off, or the frozen copy."""
        if self.reference_model is not None:
            ref = self.reference_model
            return token_logps(ref, ref, batch, self.reference_fast, attention, positions)
        if hasattr(forward, "disable_adapter"):
            with forward.disable_adapter():
                return token_logps(causal_lm, forward, batch, fast, attention, positions)
        # A whole model before its first step (precompute_ref): it is still the base.
        return token_logps(causal_lm, forward, batch, fast, attention, positions)


def _per_sequence(tokens: torch.Tensor, seq_index: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=tokens.dtype, device=tokens.device).index_add(0, seq_index, tokens)


def keep_reference(loss: Any, base: Any, method: str, fast: Callable[[Any], bool]) -> None:
    """Full and freeze change the base itself: keep a frozen copy as the reference (unless precomputed)."""
    if not isinstance(loss, PreferenceLoss) or not loss.needs_reference or loss.spec.precompute_ref:
        return
    if method in WHOLE_MODEL_METHODS:
        loss.reference_model = copy.deepcopy(base).eval().requires_grad_(False)
        loss.reference_fast = fast(loss.reference_model)


def floats(stats: Stats) -> dict[str, tuple[float, float]]:
    """Diagnostics as Python numbers, read from the device in one transfer."""
    if not stats:
        return {}
    sums = torch.stack([total.detach().float().reshape(()) for total, _ in stats.values()]).tolist()
    return {name: (value, count) for (name, (_, count)), value in zip(stats.items(), sums, strict=True)}
