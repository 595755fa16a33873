"""Out-of-memory errors from MLX (Metal or a failed CPU allocation), and what to free after one."""

from __future__ import annotations

import gc

import mlx.core as mx

# Metal reports "Insufficient Memory" from a command buffer or "[metal::malloc] Attempting to
# allocate ..." past its limits; a failed host allocation arrives as MemoryError (std::bad_alloc).
_MARKERS = ("insufficient memory", "attempting to allocate", "out of memory", "bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure (a step on smaller pieces may then fit)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _MARKERS)


def release() -> None:
    """Hand MLX's cached buffers back after the failed step's arrays are gone."""
    gc.collect()
    mx.clear_cache()
