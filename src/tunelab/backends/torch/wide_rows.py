"""Inductor's heuristics hook that reduces rows of up to N elements in one pass (see :data:`fast.PERSISTENT_ROWS`).

A class of its own module, not one made inside a function: inductor keys its
graph cache on its config.  torch 2.11 (the GPU machine's) pickles the hook's
factory into that key (2.13 keys on the ``uuid()`` of what it makes), and a
class defined in a function can't be pickled, so the cache was bypassed: on an
H100 each ``tunelab train`` logged "Failed to pickle cache key" for every
graph, and a second run could not reuse the first's compiled layers.  The factory is
``functools.partial(WideRows, numel)``, which pickles by reference with the
bound in it, and :meth:`WideRows.uuid` names the bound too.
"""

from __future__ import annotations

import functools
from typing import Any

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class WideRows(InductorChoices):
    """Inductor's own choices, except that INNER reductions of at most ``numel`` elements are persistent."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel

    def should_use_persistent_reduction(self, features: Any, cooperative_reduction: bool) -> bool:  # type: ignore[override]
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, self.numel)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # part of inductor's cache key: graphs compiled under it are cached apart
        return f"tunelab-wide-rows-{self.numel}"


def install(numel: int) -> None:
    """Make ``WideRows(numel)`` inductor's choices handler, process-wide, and part of its cache key."""
    if hasattr(inductor_config, "inductor_choices_class"):  # keys the graph cache
        inductor_config.inductor_choices_class = functools.partial(WideRows, numel)
    else:  # an older inductor: a graph cached without the hook would be reused as it was
        inductor_config.fx_graph_cache = False
    V.set_choices_handler(WideRows(numel))
