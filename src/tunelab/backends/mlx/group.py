"""The :class:`~tunelab.distributed.group.Group` collectives over ``mx.distributed`` (ring, MPI).

``mlx.launch`` starts each process with ``MLX_RANK`` and a hosts file; MLX has
no object broadcast, so :meth:`MlxGroup.broadcast` sends rank 0's pickled bytes
as a sum in which every other rank adds zeros.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, TypeVar

from tunelab.backends.mlx.blas import ensure_fast_blas

ensure_fast_blas()  # must precede the first `import mlx.core` on Linux, as in the backend

import mlx.core as mx  # noqa: E402

T = TypeVar("T")


class MlxGroup:
    """The processes ``mlx.launch`` started; collectives run on the CPU stream (the ring backend's)."""

    def __init__(self) -> None:
        self._group = mx.distributed.init(strict=True)
        self.rank = self._group.rank()
        self.world = self._group.size()

    def _sum(self, array: mx.array) -> mx.array:
        out = mx.distributed.all_sum(array, group=self._group, stream=mx.cpu)
        mx.eval(out)
        return out

    def barrier(self) -> None:
        self._sum(mx.zeros((1,), dtype=mx.float32))

    def all_sum(self, values: Sequence[float]) -> list[float]:
        # float32 on the wire (the ring backend's sums); exact for token counts below 2**24.
        summed: Any = self._sum(mx.array(list(values), dtype=mx.float32)).tolist()
        return [float(v) for v in summed]

    def any(self, flag: bool) -> bool:
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj: T) -> T:
        data = pickle.dumps(obj) if self.rank == 0 else b""
        size = int(self.all_sum([float(len(data))])[0])
        mine = list(data) if self.rank == 0 else [0] * size
        summed: Any = self._sum(mx.array(mine, dtype=mx.uint8)).tolist()
        return pickle.loads(bytes(summed))  # bytes from this run's own rank 0


def sum_gradients(grads: Any, params: Any) -> Any:
    """``grads`` summed over the processes of the run (a process that had no rows adds zeros)."""
    from mlx.utils import tree_map

    group = mx.distributed.init()
    mine = grads if grads is not None else tree_map(mx.zeros_like, params)
    if group.size() <= 1:
        return mine
    summed = tree_map(lambda g: mx.distributed.all_sum(g, group=group, stream=mx.cpu), mine)
    mx.eval(summed)
    return summed
