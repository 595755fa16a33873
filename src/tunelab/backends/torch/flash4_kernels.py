"""FlashAttention 4's two entry points in the shape torch's dispatcher calls them.

torch (2.11 to 2.13) registers FlashAttention 4 behind its flash kernels from a
module exposing ``_flash_attn_fwd`` returning ``(out, lse)`` and ``_flash_attn_bwd``
returning ``(dq, dk, dv)``.  ``flash_attn.cute.interface``'s 4.0.0b10 returned
exactly that; 4.0.0b20 and later return more (the softmax's row maxima and more,
for callers that want them), and torch's ``out, lse = ...`` then fails on every
call.  These two keep what torch reads, so any beta serves; the arguments pass
through untouched (torch only names ones every release has).

Imported by name, by torch, only when :mod:`flash4` routes torch's flash kernels to FlashAttention 4.
"""

from __future__ import annotations

from typing import Any

import torch
from flash_attn.cute import interface


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = interface._flash_attn_fwd(*args, **kwargs)[:2]
    return out, lse


def _flash_attn_bwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = interface._flash_attn_bwd(*args, **kwargs)[:3]  # a 4th, the sink's gradient, only with a sink
    return dq, dk, dv
