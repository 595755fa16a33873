"""Greedy answers for many prompts at once: left-padded batches through transformers' ``generate``.

An eval asks hundreds of short questions; one at a time, a small model spends most of its time in
Python and tiny matrix products.  Here prompts of similar length go together (sorted by length, so
little padding), left-padded so every row's last prompt token sits in the same column and the new
tokens line up.  The attention mask hides the padding and transformers derives each row's positions
from it, so a row's tokens are the ones a lone greedy run gives (same model, same stop tokens, same
length limit); the text comes from the same decoding as `tunelab generate`'s stream.

Only a transformers model (the torch backend) batches; any other backend answers one prompt at a time.

A batch that runs out of memory is not the user's problem to solve by trial: the same prompts go
again in halves (and every later batch at the halved size), down to one prompt at a time; only a
single prompt that does not fit stops the eval, with :class:`EvalOutOfMemory` saying what to lower.
Halving never changes an answer, since a row's tokens don't depend on the rows beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from tunelab.errors import StateError
from tunelab.inference import Generator, decode_pieces, stop_ids


class EvalOutOfMemory(StateError):
    """One prompt alone does not fit in memory: nothing smaller is left to try."""


def out_of_memory(what: str, reason: str) -> EvalOutOfMemory:
    """The error that stops an eval whose single prompt ran out of memory (``what`` names the prompt)."""
    return EvalOutOfMemory(
        f"{what} ran out of memory even one prompt at a time ({reason}); nothing was written",
        hint="lower --max-new-tokens, shorten that prompt or leave it out (--limit), or use a device with more memory",
    )


def can_batch(generator: Generator) -> bool:
    """Whether the generator's model is a transformers model this module can drive directly."""
    torch = sys.modules.get("torch")  # a torch model means torch is already imported; never import it for MLX
    model = getattr(generator.backend, "model", None)
    return torch is not None and isinstance(model, torch.nn.Module) and hasattr(model, "generate")


def greedy_texts(
    generator: Generator,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
    on_message: Callable[[str], None] = lambda _text: None,
    labels: Sequence[str] = (),
) -> list[str]:
    """Each prompt's greedy answer as text, in the prompts' order (needs :func:`can_batch`).

    A batch that runs out of memory is retried in halves (``on_message`` is told), down to one prompt;
    ``labels`` name the prompts (``file:line``) in the error when one alone doesn't fit.
    """
    stops = stop_ids(generator.tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    start = 0
    while start < len(order):
        chunk = order[start : start + batch_size]
        rows, reason = _attempt(generator, [prompts[i] for i in chunk], stops, max_new_tokens)
        if rows is not None:
            for i, tokens in zip(chunk, rows, strict=True):
                texts[i] = "".join(decode_pieces(generator.tokenizer, tokens))
            start += len(chunk)
            on_progress(len(texts), len(prompts))
            continue
        if len(chunk) == 1:
            where = labels[chunk[0]] if labels else f"example {chunk[0] + 1}"
            raise out_of_memory(f"{where} ({len(prompts[chunk[0]])} prompt tokens)", reason)
        batch_size = max(len(chunk) // 2, 1)
        on_message(f"{len(chunk)} prompts at once ran out of memory ({reason}); retrying {batch_size} at a time")
    return [texts[i] for i in range(len(prompts))]


def _attempt(
    generator: Generator, batch: list[list[int]], stops: list[int], max_new_tokens: int
) -> tuple[list[list[int]] | None, str]:
    """(the batch's new tokens, "") or, when it ran out of memory, (None, the reason) with its memory freed."""
    backend: Any = generator.backend
    try:
        return _generate(generator, batch, stops, max_new_tokens), ""
    except Exception as exc:
        if not backend.is_out_of_memory(exc):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    # Out of the except block, the failed batch's tensors (held by the exception's frames) can be freed.
    backend.release_memory()
    return None, reason


def _generate(generator: Generator, prompts: list[list[int]], stops: list[int], max_new_tokens: int) -> list[list[int]]:
    """One left-padded batch through ``model.generate``; each row's new tokens up to (not with) its first stop."""
    import torch

    backend: Any = generator.backend
    model, device = backend.model, backend.device
    pad = generator.tokenizer.pad_token_id
    pad = pad if pad is not None else (stops[0] if stops else 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad,
            do_sample=False,
        )
    rows = []
    for new in out[:, width:].tolist():
        cut = next((k for k, token in enumerate(new) if token in stops), len(new))
        rows.append(new[:cut])
    return rows
