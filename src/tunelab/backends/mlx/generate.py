"""Token streaming for the MLX backend: one token at a time through mlx-lm's prompt cache and sampler.

Mirrors :mod:`tunelab.backends.torch.generate`: the caller gets an iterator of
token ids and stops whenever it likes (closing the iterator is all it takes;
nothing runs in the background here).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx


def stream_tokens(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: Sequence[int],
    seed: int,
) -> Iterator[int]:
    """Yield sampled token ids until ``max_new_tokens`` or a stop id (which is yielded too).

    A generator: the model is put in eval mode and the RNG seeded when the first
    token is asked for, not when this is called.
    """
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    model.eval()
    mx.random.seed(seed)
    cache = make_prompt_cache(model)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    logits = model(mx.array(list(prompt_ids))[None], cache=cache)[:, -1, :]
    for _ in range(max_new_tokens):
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        value = int(token.item())  # type: ignore[arg-type]
        yield value
        if value in stop_ids:
            return
        logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
