"""After the first backward: say which trained tensors got no gradient, instead of training them silently not at all.

A trained tensor without a gradient is not trained: AdamW skips it, and
clipping leaves it out of the norm.  The run then goes on with losses that
fall more slowly or not at all, and nothing says why.  A rewrite of the
layers that cut the autograd graph, a module the loss never reaches, or a
compiler that gets a custom backward wrong all look like that; each costs a
run's whole time before anyone notices the losses.  Checked once, at the
first optimizer step (one pass over the trained tensors), and logged, not
raised: in a mixture-of-experts model an expert no token was routed to has
no gradient at that step, and that is right.

Gradients that are there but all zero train nothing either, and look the
same from outside: a compiler that routes a custom backward's result to the
wrong slot did exactly that to joined A on torch 2.11 (bench/README.md,
session 43).  So the first step's total gradient norm is read once too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)
NAMED = 3  # names in the message; the count says how many more


def without_gradient(model: Any, params: Sequence[torch.nn.Parameter]) -> list[str]:
    """Names of the trained tensors in ``params`` whose gradient is None, in the model's order."""
    missing = {id(p) for p in params if p.requires_grad and p.grad is None}
    if not missing:
        return []
    return [name for name, p in model.named_parameters() if id(p) in missing]


def report(model: Any, params: Sequence[torch.nn.Parameter]) -> list[str]:
    """Log a warning naming the trained tensors without a gradient (returns their names; none: no warning)."""
    names = without_gradient(model, params)
    if names:
        shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
        log.warning(
            "%d of %d trained tensors got no gradient at the first step, so they are not being trained: %s. "
            "In a mixture-of-experts model an expert that no token reached is expected; otherwise turn off "
            "train.compile and, if that fixes it, report it with this log",
            len(names),
            len(params),
            shown,
        )
    return names


def report_all_zero(norm: float) -> bool:
    """Log a warning when the first step's total gradient norm is zero (returns whether it was)."""
    if norm != 0.0:
        return False
    log.warning(
        "every gradient at the first optimizer step is zero, so nothing is being trained: either no token of "
        "its batches carries loss (check that data.mask_prompt leaves the answers unmasked and that they are "
        "not empty), or the loss does not reach the trained tensors; then turn off train.compile and, if "
        "that fixes it, report it with this log"
    )
    return True


def first_step(model: Any, params: Sequence[torch.nn.Parameter], norm: float | None) -> None:
    """Both checks, once, at the first optimizer step (``norm``: its total gradient norm; None: not checked)."""
    report(model, params)
    if norm is not None:
        report_all_zero(norm)
