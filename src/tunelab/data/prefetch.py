"""The next step's micro-batches, collated on a helper thread while the current step runs.

Collating pads and copies a step's examples in Python/numpy.  On a small model
that is a visible share of a step, and it need not wait: the backend's step
releases the GIL while it computes, so one helper thread has the next step's
batches ready when the loop asks, with whatever host-side work the backend does
on a batch before its step (``prepare``: the torch backend gathers host-held
embedding rows there) already done.  The order stays a pure function of the
cursor: the helper only computes what :meth:`MicroBatchStream.get` would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np

from tunelab.data.batching import MicroBatchStream

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


class Prefetcher:
    """Hands out ``count`` micro-batches from a cursor, and starts on the following ``count`` at once.

    All of the stream's ``get`` calls run on the one helper thread (the stream
    caches its current epoch, so it must not be called from two threads).
    Use it as a context manager so the thread ends with the loop.
    """

    def __init__(
        self, stream: MicroBatchStream, count: int, prepare: Callable[[Batch, int], None] | None = None
    ) -> None:
        self.stream = stream
        self.count = count
        self.prepare = prepare  # run on each batch on the helper thread too (the backend's host-side work)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-batches")
        self._ahead: tuple[int, Future[list[Batch]]] | None = None

    def take(self, cursor: int) -> list[Batch]:
        """The micro-batches at ``cursor .. cursor + count - 1`` (prepared ahead when the cursor was expected)."""
        if self._ahead is not None and self._ahead[0] == cursor:
            batches = self._ahead[1].result()
        else:  # the first step, or the cursor moved unexpectedly: compute now (still on the helper thread)
            batches = self._submit(cursor).result()
        self._ahead = (cursor + self.count, self._submit(cursor + self.count))
        return batches

    def _submit(self, cursor: int) -> Future[list[Batch]]:
        return self._pool.submit(self._ready, cursor)

    def _ready(self, cursor: int) -> list[Batch]:
        batches = [self.stream.get(cursor + i) for i in range(self.count)]
        if self.prepare is not None:
            for batch in batches:
                try:
                    self.prepare(batch, 2 * self.count)  # this step's and the next one's may wait at once
                except Exception:  # only saves time: the step does the work itself
                    log.debug("preparing a micro-batch ahead failed", exc_info=True)
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
