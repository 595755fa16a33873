"""Packed batches on MLX: a causal mask per example and RoPE positions that restart per example.

mlx-lm's model files take no mask or positions from the caller, but all of
them talk to a KV cache through one small protocol: the inner model asks the
cache for the attention mask (``make_mask``), and each attention layer rotates
queries and keys by ``cache.offset`` and passes them through
``cache.update_and_fetch``.  :class:`PackedCache` stands in for that cache during
a packed forward: its mask keeps each example to itself, its ``offset`` is the
per-token position array, and it stores nothing.  :class:`PositionalRoPE` wraps
each layer's RoPE so an (batch, length) offset array rotates every token by its
own position (``mx.fast.rope`` takes one offset per sequence, so each token is
made a sequence of one).  With an integer offset it is the wrapped RoPE, so
generation with a real cache is unchanged.

Architectures differ in how their attention broadcasts a batched mask (Gemma-2
computes scores as (batch, kv heads, repeats, L, L)), so :func:`enable_packing`
tries the layouts on a tiny packed batch and keeps the one that reproduces the
examples run alone; an architecture none reproduces is refused, never run wrong.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tunelab.backends.mlx.layers import set_module
from tunelab.errors import ConfigError

_LAYOUTS = (4, 5)  # mask ranks: (B, 1, L, L) for SDPA-style attention, (B, 1, 1, L, L) for grouped scores


class PositionalRoPE(nn.Module):
    """A model's RoPE module that also takes a (batch, length) array of positions as ``offset``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array, offset: Any = 0, *args: Any, **kwargs: Any) -> mx.array:
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return self.inner(x, offset, *args, **kwargs)
        batch, heads, length, dims = x.shape
        per_token = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dims)
        rotated = self.inner(per_token, *args, offset=offset.reshape(-1), **kwargs)
        return rotated.reshape(batch, length, heads, dims).transpose(0, 2, 1, 3)


class PackedCache:
    """The KV-cache protocol, answered for one packed forward pass (nothing is cached)."""

    def __init__(self, positions: mx.array, segments: mx.array, mask_rank: int) -> None:
        self.offset = positions
        self.segments = segments
        self.mask_rank = mask_rank

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, *, window_size: int | None = None, return_array: bool = False) -> mx.array:
        return packed_mask(self.segments, window_size, self.mask_rank)


def packed_mask(segments: mx.array, window: int | None, rank: int) -> mx.array:
    """True where a query may attend a key: same example, not in the future (within ``window``)."""
    batch, length = segments.shape
    index = mx.arange(length)
    allowed = index[:, None] >= index[None]
    if window is not None:
        allowed = allowed & (index[:, None] < index[None] + window)
    mask = (segments[:, :, None] == segments[:, None, :]) & allowed
    return mask.reshape(batch, *([1] * (rank - 3)), length, length)


def packed_caches(model: Any, positions: mx.array, segments: mx.array, mask_rank: int) -> list[PackedCache]:
    """One stand-in cache per decoder layer (the same stateless object for all)."""
    return [PackedCache(positions, segments, mask_rank)] * len(model.model.layers)


def enable_packing(model: Any) -> int:
    """Wrap every RoPE for per-token positions and return the mask rank this architecture takes.

    Raises :class:`ConfigError` when no layout makes a packed batch reproduce its
    examples run one by one.
    """
    ropes = [path for path, module in model.named_modules() if path.endswith(".rope")]
    for path in ropes:
        module = dict(model.named_modules())[path]
        if not isinstance(module, PositionalRoPE):
            set_module(model, path, PositionalRoPE(module))
    training = model.training
    model.eval()  # no dropout while comparing
    try:
        for rank in _LAYOUTS if ropes else ():
            if _reproduces_examples(model, rank):
                return rank
    finally:
        model.train(training)
    raise ConfigError(
        f"data.packing: the MLX backend cannot keep packed examples apart for {type(model).__module__}",
        hint="set data.packing: false, or backend: torch",
    )


def _reproduces_examples(model: Any, rank: int) -> bool:
    """Run two tiny packed rows (with a padding tail) and compare with each example alone."""
    lengths = [[3, 4], [5]]
    width = 7
    rng = np.random.default_rng(0)
    vocab = int(model.model.embed_tokens.weight.shape[0])
    ids = rng.integers(1, vocab, size=(2, width)).astype(np.int32)
    positions, segments = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
    spans = []
    for row, sizes in enumerate(lengths):
        at = 0
        for k, n in enumerate(sizes, start=1):
            positions[row, at : at + n], segments[row, at : at + n] = np.arange(n), k
            spans.append((row, at, n))
            at += n
    try:
        caches = packed_caches(model, mx.array(positions), mx.array(segments), rank)
        packed = model.model(mx.array(ids), cache=caches).astype(mx.float32)
        mx.eval(packed)
    except (ValueError, TypeError, IndexError):  # this layout does not broadcast in this architecture
        return False
    for row, at, n in spans:
        alone = model.model(mx.array(ids[row : row + 1, at : at + n])).astype(mx.float32)
        scale = float(mx.abs(alone).max()) + 1e-6
        tol = 1e-4 if model.model.embed_tokens.weight.dtype == mx.float32 else 3e-2  # fp32 vs half precision
        if float(mx.abs(packed[row : row + 1, at : at + n] - alone).max()) > tol * scale:
            return False
    return True
