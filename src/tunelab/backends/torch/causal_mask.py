"""Rows that need only the causal mask skip transformers' mask building, and the wait for the GPU inside it.

transformers (5.x) builds each forward's attention mask on the host, and two of its
checks read the GPU: given no 2-D mask, it looks for packed rows in ``position_ids``
(which the model makes itself from ``arange``) and branches on
``(sequence_ids[:, -1] == 0).all()``; given one, ``sdpa``'s mask asks
``padding_mask.all()``.  Either read makes the host wait until the GPU has finished
everything queued before it, the previous step's backward and optimizer.  An 8B LoRA
step's profile on an H100 (``step_profile.py lora``, session 48) shows that wait at
every step's start: the GPU then idles ~2 ms while the host, caught up, queues the
rotary tables and the first layer, ~1% of the step.

The training step knows on the host whether a batch needs more than causal attention:
rows that are full, or padded only at their ends, don't (no real token sees a pad under
causal attention).  For those it keeps the 2-D mask in the call, so transformers does not
look for packed rows, and runs the forward inside :func:`causal_only`, where the mask
function registered for an ``sdpa``-like implementation answers a request for the plain
causal mask with ``None``: ``sdpa`` then takes its causal kernel, as it does for a
batch without a mask, and nothing is read back.  Any other request (sliding windows,
packed rows, padding that matters, any call outside the block) goes to transformers'
own mask function unchanged.

Measured through ``tunelab train`` on an H100 (session 49, one lease, each stack twice in
alternating order): 8B LoRA 2x2048 16,168 -> 16,566 tok/s (+2.5%), 1B LoRA 8x2048 +0.8%,
same peaks and losses; the profile's gaps of over 100 us fell from 3.5 to 1.7 ms a step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tunelab.backends.torch.kept_attention import KEPT_SDPA
from tunelab.backends.torch.shapes import right_padded

# Attention functions that run causal attention by themselves when handed no mask (transformers' sdpa
# function sets ``is_causal`` then); eager and flex attention need the mask itself, so they are left alone.
SDPA_LIKE = ("sdpa", KEPT_SDPA)
# False: the step drops the mask of such rows instead, and transformers searches their positions for packed rows
# (bench/gpu_env.sh's switch causal_mask_off, for an A/B on a GPU).
ON = True
_WRAPPED = "_tunelab_causal_only"
_state = threading.local()


def applies(attention: str) -> bool:
    """Whether :func:`install` covers ``attention`` (an ``sdpa``-like implementation with a mask function)."""
    if not ON or attention not in SDPA_LIKE:
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return attention in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def install(attention: str) -> bool:
    """Wrap the mask function registered for ``attention`` (idempotent); False where it does not apply."""
    if not applies(attention):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base = ALL_MASK_ATTENTION_FUNCTIONS[attention]
    if not getattr(base, _WRAPPED, False):
        AttentionMaskInterface.register(attention, _skipping(base))
    return True


def _skipping(base: Callable[..., Any]) -> Callable[..., Any]:
    from transformers.masking_utils import causal_mask_function

    def mask(*args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "on", False) and _plain_causal(kwargs, causal_mask_function):
            return None  # the plain causal mask, for rows with no padding that matters: sdpa's is_causal
        return base(*args, **kwargs)

    setattr(mask, _WRAPPED, True)
    return mask


def _plain_causal(request: dict[str, Any], causal: Callable[..., Any]) -> bool:
    """A request (keyword arguments, as transformers passes them) for the causal mask of rows attending only to
    themselves: no other mask function, no skip forbidden, and the keys the queries' own positions (a prefix
    adapter's cached keys would make them more, which sdpa's ``is_causal`` would cut off)."""
    q_length, kv_length = request.get("q_length"), request.get("kv_length")
    offsets = (request.get("q_offset", 0), request.get("kv_offset", 0))
    return (
        request.get("mask_function") is causal
        and request.get("allow_is_causal_skip", True) is True
        and isinstance(q_length, int)
        and q_length == kv_length
        and all(isinstance(o, int) and o == 0 for o in offsets)
    )


def shaped(batch: dict[str, Any], installed: bool) -> tuple[dict[str, Any], bool]:
    """``batch`` for the forward, and whether to run it under :func:`causal_only` (``installed``: :func:`install`
    covers the model's attention).

    Rows padded only at their ends (or not at all) need only the causal mask: under causal attention no real
    token sees a pad, so the mask changes nothing that is scored.  Where installed, their mask stays in the call
    and none is built; elsewhere it is dropped, and transformers builds the plain causal mask (with no mask,
    ``sdpa`` takes its causal kernel, flash on a GPU, instead of the masked fallback; on a CPU a 2-layer model's
    step is ~4% faster, with bit-identical real-token logits).
    """
    causal = "position_ids" not in batch and right_padded(batch["attention_mask"])
    if causal and not installed:
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch, causal and installed


@contextlib.contextmanager
def causal_only(on: bool = True) -> Iterator[None]:
    """Inside the block (this thread), requests for the plain causal mask get ``None`` where installed."""
    before = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = before
