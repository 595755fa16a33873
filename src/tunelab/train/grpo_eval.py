"""GRPO's validation: each held-out prompt answered once, greedily, and scored by the run's reward functions.

Greedy answers (temperature 0) draw nothing from the training's random stream, so validating never changes
what the run samples next, and a resumed run validates exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tunelab.backends.base import Backend
from tunelab.data.grpo import PromptSet
from tunelab.train.rewards import Reward, score


def validation_rewards(
    backend: Backend,
    prompts: PromptSet,
    rewards: Sequence[Reward],
    *,
    rows: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    decode: Callable[[list[int]], str],
) -> dict[str, float]:
    """``val_reward`` (Σ weight × reward), ``val_reward/<function>`` and ``val_completion_length``, as means."""
    values: list[np.ndarray] = []
    lengths: list[int] = []
    stops = set(stop_ids)
    for start in range(0, len(prompts), rows):
        chunk = list(range(start, min(start + rows, len(prompts))))
        completions, _ = backend.sample_completions(  # type: ignore[attr-defined]
            [prompts.ids[i] for i in chunk],
            uniforms=np.zeros((len(chunk), max_new_tokens)),
            temperature=0.0,
            stop_ids=list(stop_ids),
        )
        texts = [decode([t for t in c if t not in stops]) for c in completions]
        values.append(score(rewards, texts, [prompts.examples[i] for i in chunk], [prompts.where[i] for i in chunk]))
        lengths.extend(len(c) for c in completions)
    table = np.concatenate(values)
    out = {"val_reward": float((table @ np.array([r.weight for r in rewards], dtype=np.float64)).mean())}
    out.update({f"val_reward/{r.label}": float(table[:, j].mean()) for j, r in enumerate(rewards)})
    out["val_completion_length"] = float(np.mean(lengths))
    return out
