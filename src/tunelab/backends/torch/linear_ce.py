"""LM head + cross-entropy in chunks of positions, with the gradient taken in the same pass.

The plain loss materialises ``positions × vocab`` fp32 logits and keeps them
(plus the log-softmax autograd saves) until backward: for a 128k vocabulary at
4,096 supervised positions that is ~6 GiB, more than a 4-bit 8B model's
weights.  Here each chunk's logits live only while that chunk is processed:
the forward pass already knows everything backward needs, since
``d loss / d logits = softmax - onehot``, so it computes the gradients with
respect to the hidden states (and the head's weight, when it trains) right
away and keeps only those.  Backward then just scales them by the incoming
gradient.  The result equals the unchunked loss up to fp32 summation order.
"""

from __future__ import annotations

from typing import Any

import torch

# The chunk sizes live beside the config, where the memory estimate (torch-free) reads them too.
from tunelab.config.schema import loss_chunk_rows as chunk_rows


def _chunk_loss_grad(
    logits: torch.Tensor, labels: torch.Tensor, softcap: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk and ``d loss / d logits`` (in the logits' dtype).

    Written as whole-tensor expressions so that, compiled, the fp32 upcast,
    soft-cap, log-sum-exp and softmax-minus-one-hot fuse into a reduction and
    one elementwise pass over the chunk instead of a kernel (and an fp32 copy)
    per step.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
    capped = None
    if softcap:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    if torch.compiler.is_compiling():
        # Spelled out as max, shift, exp, sum: inductor reads that pattern on a GPU as one online-softmax
        # reduction, a single pass over the chunk.  torch.logsumexp's decomposition guards infinite maxima,
        # does not match, and costs a pass for the max and another for the sum (H100, 1B 8x2048: two
        # ~31 us reductions per 256-row chunk of a 128k vocabulary).  Eager, it would materialise both.
        peak = z.amax(dim=-1, keepdim=True)
        lse = (peak + (z - peak).exp().sum(dim=-1, keepdim=True).log()).squeeze(1)
    else:
        lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, labels[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    classes = torch.arange(z.shape[1], device=z.device)
    grad = torch.exp(z - lse[:, None]) - (classes[None, :] == labels[:, None]).float()
    if capped is not None:
        grad = grad * (1.0 - capped * capped)
    return loss, grad.to(logits.dtype)


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a @ b``, written in place where the dtypes allow (a row block of ``out`` is contiguous)."""
    if a.dtype == b.dtype == out.dtype:
        torch.matmul(a, b, out=out)  # no product buffer to copy from (a device-to-device copy per chunk)
    else:
        out.copy_(a @ b)


_COMPILED: Any = None


def _compiled_chunk() -> Any:
    """:func:`_chunk_loss_grad` compiled once per process (CUDA: Triton kernels)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_chunk_loss_grad)  # the last, shorter chunk makes its size dynamic
    return _COMPILED


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        softcap: float,
        rows: int,
    ) -> torch.Tensor:
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        losses = []  # summed once at the end: one kernel, not an add per chunk
        chunk = _compiled_chunk() if hidden.is_cuda else _chunk_loss_grad
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            logits = torch.nn.functional.linear(h, weight, bias)
            loss, grad = chunk(logits, y, softcap, want_h or want_w or want_b)
            losses.append(loss)
            if grad is None:
                continue
            if grad_b is not None:
                grad_b += grad.float().sum(0)
            if grad_h is not None:
                _product_into(grad_h[start : start + rows], grad, weight)
            if grad_w is not None:
                grad_w.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.which = (want_h, want_w, want_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return torch.stack(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        want_h, want_w, want_b = ctx.which
        w_dtype, b_dtype = ctx.dtypes
        grad_h = grad_w = grad_b = None
        if want_h:
            grad_h = next(saved)
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if want_w:
            grad_w = (next(saved) * grad_out).to(w_dtype)
        if want_b:
            grad_b = (next(saved) * grad_out).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``labels`` (``hidden`` is ``positions × hidden``)."""
    rows = rows or chunk_rows(head.weight.shape[0])
    out: torch.Tensor = _LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, float(softcap or 0.0), rows)
    return out


def is_plain_linear(module: Any) -> bool:
    """Only an unwrapped ``nn.Linear`` head can be fused (not a LoRA-wrapped or quantized one)."""
    return type(module) is torch.nn.Linear


class _LinearLogprobs(torch.autograd.Function):
    """Per-position log-probs of ``head(hidden)`` at ``labels``, chunked; backward recomputes each chunk.

    Unlike the summed cross-entropy, the gradient of a per-position output depends on the upstream
    gradient, which forward doesn't know, so backward projects each chunk again (one more head
    matmul) instead of keeping ``positions × vocab`` logits alive until then.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        softcap: float,
        rows: int,
    ) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            z = _capped(torch.nn.functional.linear(hidden[start : start + rows], weight, bias).float(), softcap)
            y = labels[start : start + rows]
            out[start : start + rows] = z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.softcap, ctx.rows = softcap, rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, labels = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h, y = hidden[start : start + ctx.rows], labels[start : start + ctx.rows]
            raw = torch.nn.functional.linear(h, weight, bias).float()
            z = _capped(raw, ctx.softcap)
            grad = -torch.softmax(z, dim=-1)
            grad.scatter_add_(1, y[:, None], torch.ones_like(y[:, None], dtype=grad.dtype))
            grad = grad * grad_out[start : start + ctx.rows, None].float()
            if ctx.softcap:
                grad = grad * (1.0 - torch.tanh(raw / ctx.softcap) ** 2)
            if grad_b is not None:
                grad_b += grad.sum(0)
            grad = grad.to(weight.dtype)
            if grad_h is not None:
                grad_h[start : start + ctx.rows] = grad @ weight
            if grad_w is not None:
                grad_w.addmm_(grad.t().float(), h.float())
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def _capped(z: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.tanh(z / softcap) * softcap if softcap else z


def linear_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """float32 ``log softmax(head(hidden))[i, labels[i]]`` per position, chunked (``hidden``: positions × hidden)."""
    rows = rows or chunk_rows(head.weight.shape[0])
    out: torch.Tensor = _LinearLogprobs.apply(hidden, head.weight, head.bias, labels, float(softcap or 0.0), rows)
    return out
