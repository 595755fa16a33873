"""Tokenize a stream of record chunks, in this process or in a pool of worker processes.

Chunks have a fixed number of records whatever the pool size, and results come
back in submission order, so the output is identical for any ``num_proc``.
Only a bounded window of chunks is in flight at once: reading never runs ahead
of tokenization, which keeps memory flat on datasets larger than RAM.
"""

from __future__ import annotations

import os
import pickle
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.data.arrow_split import TokenizedChunk
from tunelab.data.formats import to_samples
from tunelab.data.sources import Record
from tunelab.data.tokenize import tokenize_samples

# Records per chunk.  Part of the output's identity only through chunk-independent work, but kept fixed anyway.
CHUNK_RECORDS = 512
_WINDOW_PER_WORKER = 2  # chunks in flight per worker: enough to keep workers busy, little memory


@dataclass(frozen=True)
class TokenizeOptions:
    """How records become token rows (everything but the tokenizer, which workers load once)."""

    fmt: str
    template: str
    max_seq_len: int
    mask_prompt: bool
    train_on: str


# A chunk of records, and which of them go to the carved validation split (None: all train).
Task = tuple[list[Record], np.ndarray | None]
Result = tuple[TokenizedChunk, TokenizedChunk | None]


def tokenize_chunk(task: Task, tokenizer: Any, opts: TokenizeOptions) -> Result:
    """Validate every record of the chunk (the first bad one raises) and tokenize it."""
    records, to_valid = task
    samples = to_samples(records, opts.fmt)
    if to_valid is None:
        return _tokenize(records, samples, tokenizer, opts), None
    keep = [i for i in range(len(records)) if not to_valid[i]]
    held = [i for i in range(len(records)) if to_valid[i]]
    train = _tokenize([records[i] for i in keep], [samples[i] for i in keep], tokenizer, opts)
    return train, _tokenize([records[i] for i in held], [samples[i] for i in held], tokenizer, opts)


def _tokenize(records: list[Record], samples: list[Any], tokenizer: Any, opts: TokenizeOptions) -> TokenizedChunk:
    split = tokenize_samples(
        samples,
        tokenizer,
        template=opts.template,
        max_seq_len=opts.max_seq_len,
        mask_prompt=opts.mask_prompt,
        sources=[(r.path, r.line) for r in records],
        train_on=opts.train_on,
    )
    return TokenizedChunk.from_split(split)


def tokenize_stream(tasks: Iterable[Task], tokenizer: Any, opts: TokenizeOptions, *, num_proc: int) -> Iterator[Result]:
    """Tokenized chunks in task order, using ``num_proc`` worker processes (1: this process)."""
    if num_proc <= 1:
        for task in tasks:
            yield tokenize_chunk(task, tokenizer, opts)
        return
    yield from _pooled(tasks, tokenizer, opts, num_proc)


def _pooled(tasks: Iterable[Task], tokenizer: Any, opts: TokenizeOptions, num_proc: int) -> Iterator[Result]:
    blob = pickle.dumps(tokenizer)
    context = _context(type(tokenizer).__module__)
    window: deque[Future[Result]] = deque()
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker, initargs=(blob, opts)) as pool:
        try:
            for task in tasks:
                window.append(pool.submit(_work, task))
                if len(window) >= num_proc * _WINDOW_PER_WORKER:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:  # a bad record (or Ctrl-C): drop the queued work
                future.cancel()


def _context(tokenizer_module: str) -> Any:
    """A fork server that has imported tunelab and the tokenizer's library once; workers fork from it.

    Never a plain fork of this process: it may hold tokenizer thread pools or
    torch state that a fork would corrupt.  Spawn (slower to start: every
    worker imports the libraries again) where there is no fork server.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, tokenizer_module])
    return context


_WORKER: dict[str, Any] = {}


def _init_worker(blob: bytes, opts: TokenizeOptions) -> None:
    # One process per core already: the tokenizer's own thread pool would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = pickle.loads(blob)
    _WORKER["opts"] = opts


def _work(task: Task) -> Result:
    return tokenize_chunk(task, _WORKER["tokenizer"], _WORKER["opts"])


def default_num_proc(requested: int | None) -> int:
    """``data.num_proc``, or every core this process may use."""
    if requested is not None:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)
