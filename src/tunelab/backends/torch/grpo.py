"""GRPO on torch: sampling groups of completions with a KV cache, and the clipped policy loss.

Sampling runs the training model itself (adapters on, eval mode, no gradients), every row of the batch at
once over one KV cache, and stops a row at its first stop token.  Each token is drawn by inverting the
tempered distribution's CDF at a uniform number the caller gives (``uniforms``, one per row and new
token): the trainer owns the random stream, so it is saved with every checkpoint and a resumed run draws
the same completions.  The log-prob of each drawn token under the untempered policy is returned with it:
the "old" policy the loss's ratio compares with.

The loss (one term per completion token, summed; the trainer divides by the step's completion tokens):

    −min(r·A, clip(r, 1−ε, 1+ε)·A) + β·KL,   r = exp(log π(t) − log π_old(t)),
    KL = exp(ref − log π) − (ref − log π) − 1   (the k3 estimator, ≥ 0; Schulman 2020)

with A the completion's group-normalised advantage, and the reference the base with the adapter disabled
(no second copy of the weights), or for full/freeze a frozen copy (:func:`keep_reference`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.torch.preference import PreferenceLoss, Stats, token_logps


class GrpoLoss(PreferenceLoss):
    """The backend's loss for ``objective.name: grpo``; called like every loss, returns (sum, tokens, stats).

    The batch holds, besides ``input_ids``/``attention_mask``/``labels`` (completion tokens labelled),
    ``old_logps`` and ``advantages``, both shaped like ``input_ids`` (the value for token ``t`` at ``t``).
    """

    def __init__(self, spec: ObjectiveSpec) -> None:
        super().__init__(spec, _unused)
        self.needs_reference = spec.beta > 0  # beta 0: no reference forward at all

    def __call__(
        self,
        causal_lm: Any,
        forward: Any,
        batch: dict[str, torch.Tensor],
        fast: bool,
        attention: str,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, int, Stats]:
        policy = token_logps(causal_lm, forward, batch, fast, attention, positions)
        old = _at(batch["old_logps"], positions)
        advantages = _at(batch["advantages"], positions)
        reference = None
        if self.needs_reference:
            reference = self.reference_tokens(causal_lm, forward, batch, fast, attention, positions)
        losses, stats = grpo_token_losses(policy, old, advantages, reference, self.spec)
        return losses.sum() + 0.0 * policy.sum(), int(positions.numel()), stats


def grpo_token_losses(
    policy: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    reference: torch.Tensor | None,
    spec: ObjectiveSpec,
) -> tuple[torch.Tensor, Stats]:
    """Each completion token's loss (see the module docstring) and the diagnostics, from flat log-probs."""
    ratio = torch.exp(policy - old)
    clipped = ratio.clamp(1 - spec.epsilon, 1 + spec.epsilon)
    losses = -torch.minimum(ratio * advantages, clipped * advantages)
    count = float(policy.numel())
    stats: Stats = {"clip_ratio": ((ratio.detach() != clipped.detach()).float().sum(), count)}
    if reference is not None:
        delta = reference - policy
        kl = torch.exp(delta) - delta - 1
        losses = losses + spec.beta * kl
        stats["kl"] = (kl.detach().sum(), count)
    return losses, stats


def _at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The per-token values of the positions that carry a loss (the same indexing as the labels)."""
    return values[:, 1:].reshape(-1).index_select(0, positions).float()


def _unused(*_: Any) -> Any:  # GrpoLoss scores tokens, not pairs: the pair formula is never called
    raise AssertionError("GrpoLoss has no pair formula")


@torch.no_grad()
def sample_completions(
    model: Any,
    device: torch.device,
    prompts: Sequence[Sequence[int]],
    *,
    uniforms: np.ndarray,
    temperature: float,
    stop_ids: Sequence[int],
    pad_id: int,
    autocast: torch.dtype | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Complete every prompt row (``uniforms``: ``(rows, max_new_tokens)`` in [0, 1)); ids and old log-probs.

    Rows are left-padded so every row's next token is the last column; a row ends after its first stop
    token (which is kept: the model learns to stop) or at ``max_new_tokens``.
    """
    rows, limit = uniforms.shape
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    draws = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float64)).to(device)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logps = [], []
    key = _cache_keyword(model)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, next_position = getattr(out, key), positions[:, -1:] + 1
        for step in range(limit):
            logits = out.logits[:, -1].float()
            token, logp = _draw(logits, draws[:, step], temperature)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens.append(token)
            logps.append(torch.where(done, torch.zeros_like(logp), logp))
            done = done | torch.isin(token, stops)
            if step + 1 == limit or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                        use_cache=True, **{key: cache})  # fmt: skip
            cache, next_position = getattr(out, key), next_position + 1
    drawn = torch.stack(tokens, dim=1).cpu().tolist()
    scores = torch.stack(logps, dim=1).cpu().tolist()
    return _until_stop(drawn, scores, set(stop_ids))


def _cache_keyword(model: Any) -> str:
    """The KV cache's name in the forward and its output: ``cache`` from transformers 5.2x, else the old name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _draw(logits: torch.Tensor, uniform: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / T) at the row's uniform (T = 0: the likeliest), and its log-prob
    under softmax(logits)."""
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        cdf = torch.softmax(logits / temperature, dim=-1).double().cumsum(dim=-1)
        target = (uniform * cdf[:, -1]).unsqueeze(1)
        token = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    logp = torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
    return token, logp


def _until_stop(
    drawn: list[list[int]], scores: list[list[float]], stops: set[int]
) -> tuple[list[list[int]], list[list[float]]]:
    tokens, logps = [], []
    for row, values in zip(drawn, scores, strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:end])
        logps.append(values[:end])
    return tokens, logps
