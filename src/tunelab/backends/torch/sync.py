"""Gradient and weight synchronisation for the torch backend (imported by it, so torch is loaded).

Data parallel as DDP does it, reduced to what tunelab needs: the trainable
weights start equal on every rank (broadcast from rank 0) and, once per
optimizer step, the accumulated gradients are summed over ranks in a few large
flat buffers.  DDP's wrapper is not used because the backend's loss path calls
into the inner model (the chunked LM head), which a wrapper's forward would not
see; summing once per step is what DDP does under ``no_sync`` accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_BUCKET_BYTES = 64 * 2**20  # big enough to amortise each call, small enough not to double peak memory


def active() -> bool:
    """True when this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_params(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's trainable weights (the same start, whatever each rank's RNG did)."""
    if not active():
        return
    with torch.no_grad():
        for bucket in _buckets(list(params)):
            flat = torch.cat([p.detach().reshape(-1) for p in bucket])
            dist.broadcast(flat, src=0)
            _unflatten(flat, bucket, into_grad=False)


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every trainable gradient by its sum over ranks (a rank with no rows adds zeros)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(list(params)):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket if p.grad is not None])
        dist.all_reduce(flat)
        _unflatten(flat, bucket, into_grad=True)


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of same-dtype, same-device parameters up to about ``_BUCKET_BYTES`` each."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        last = out[-1] if out else None
        fits = last is not None and size + p.numel() * p.element_size() <= _BUCKET_BYTES
        if last is None or not fits or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            out.append([p])
            size = 0
        else:
            last.append(p)
        size += p.numel() * p.element_size()
    return out


def _unflatten(flat: torch.Tensor, bucket: list[torch.nn.Parameter], *, into_grad: bool) -> None:
    at = 0
    for p in bucket:
        n = p.numel()
        target = p.grad if into_grad else p.data
        assert target is not None
        target.copy_(flat[at : at + n].view_as(p))
        at += n
