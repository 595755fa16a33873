"""Change what one module's ``forward`` does by giving it a subclass, shared by every layer that gets it.

A compiled decoder layer's graph serves all the layers only while the compiler
sees the same code in each.  A per-layer ``module.forward = partial(...)`` that the
compiler traces into is a new Python object in every layer, and dynamo guards on
its identity: each layer then compiles its own graph, and past dynamo's recompile
limit (8) the rest run uncompiled.  A mixin class put in front of the module's own class gives
every wrapped module the same ``forward``; what differs between layers lives
in plain attributes, which dynamo reads as constants.
"""

from __future__ import annotations

from typing import Any

_classes: dict[tuple[type, type], type] = {}


def retype(module: Any, mixin: type) -> None:
    """Make ``module`` an instance of ``mixin`` + its own class (one class per pair; idempotent)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if (mixin, cls) not in _classes:
        _classes[mixin, cls] = type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _classes[mixin, cls]
