"""Greedy answers for many prompts at once: left-padded batches through transformers' ``generate``.

An eval asks hundreds of short questions; one at a time, a small model spends most of its time in
Python and tiny matrix products.  Here prompts of similar length go together (sorted by length, so
little padding), left-padded so every row's last prompt token sits in the same column and the new
tokens line up.  The attention mask hides the padding and transformers derives each row's positions
from it, so a row's tokens are the ones a lone greedy run gives (same model, same stop tokens, same
length limit); the text comes from the same decoding as `tunelab generate`'s stream.

Only a transformers model (the torch backend) batches; any other backend answers one prompt at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from tunelab.inference import Generator, decode_pieces, stop_ids


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
) -> list[str]:
    """Each prompt's greedy answer as text, in the prompts' order (needs :func:`can_batch`)."""
    stops = stop_ids(generator.tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = _generate(generator, [prompts[i] for i in chunk], stops, max_new_tokens)
        for i, tokens in zip(chunk, rows, strict=True):
            texts[i] = "".join(decode_pieces(generator.tokenizer, tokens))
        on_progress(len(texts), len(prompts))
    return [texts[i] for i in range(len(prompts))]


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
