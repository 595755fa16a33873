"""What the MLX backend changes in an mlx-lm model's forward: checkpointed blocks, and the head split off."""

from __future__ import annotations

from typing import Any

import mlx.core as mx


def checkpoint_class(cls: type) -> None:
    """Recompute a block's activations in backward (mx.checkpoint) for every instance of its class.

    Patching the class keeps parameter paths unchanged (a wrapper module would
    rename every weight); it is done once per class.
    """
    if getattr(cls, "_tunelab_checkpointed", False):
        return
    plain = cls.__call__

    def checkpointed(self: Any, *args: Any, **kwargs: Any) -> Any:
        def inner(params: Any, *a: Any, **k: Any) -> Any:
            self.update(params)
            return plain(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    setattr(cls, "__call__", checkpointed)  # noqa: B010 - assigning a method on the class on purpose
    setattr(cls, "_tunelab_checkpointed", True)  # noqa: B010


def split_head(model: Any) -> Any:
    """The output projection, if ``head(model.model(x))`` equals ``model(x)`` for this architecture.

    Some architectures transform logits after the head.  Their config fields say
    so (soft-capping, scaling); a probe forward then checks the rest.  The fields
    are needed as well: on small logits ``tanh(x / c) · c`` is ``x`` to 1e-4, so a
    probe alone can't see soft-capping.
    """
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    for field in ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping"):
        if getattr(args, field, None) not in (None, 1, 1.0):
            return None
    if inner is None:
        return None
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        head = inner.embed_tokens.as_linear
    if head is None:
        return None
    probe = mx.array([[1, 2, 3, 4, 5]])
    try:
        same = mx.allclose(head(inner(probe)), model(probe), rtol=1e-4, atol=1e-4).item()
    except (AttributeError, TypeError, ValueError):
        return None
    return head if same else None
