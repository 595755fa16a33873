"""Out-of-memory errors on each torch device, told apart from other failures, and what to free after one."""

from __future__ import annotations

import gc

import torch

# CUDA raises torch.OutOfMemoryError; MPS and a failed CPU allocation (an address-space or cgroup
# limit) raise RuntimeError, with these words in the message.
_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure on any device (a step on smaller pieces may then fit)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _MARKERS)


def release(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Drop the failed step's gradients and hand cached blocks back, so the retry starts from a clean slate."""
    for p in params:
        p.grad = None
    gc.collect()  # the failed graph's tensors are referenced from the exception's frames until now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
