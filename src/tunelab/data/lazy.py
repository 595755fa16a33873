"""A sequence of batches built when read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import numpy as np


class LazyBatches(Sequence[dict[str, np.ndarray]]):
    """Batches collated when read, so a large validation split is never padded into memory all at once."""

    def __init__(self, groups: list[Any], make: Callable[[Any], dict[str, np.ndarray]]) -> None:
        self._groups = groups
        self._make = make

    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, np.ndarray]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        if isinstance(index, slice):
            return [self._make(group) for group in self._groups[index]]
        return self._make(self._groups[index])
