"""Chat completions with a run's adapter: loaded models kept, one generation at a time, OpenAI shapes.

A backend holds one model state and is not safe to drive from two threads, so answers are generated one
at a time, on a thread of their own (a one-thread executor), never on the server's shared thread pool: a
wedged or slow generation can then starve nothing but other chats. A request waits for the model on the
event loop (an asyncio lock, no thread held) for at most ``wait_s``, then gets a 503 with Retry-After.
Pieces come back through an unbounded queue, so the generating thread never blocks on a slow or vanished
reader; it checks a flag between tokens and stops as soon as the request ends (client gone included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException, status

from tunelab import services

_END = object()


class Generation:
    """One answer being generated: pieces are handed to the event loop; ``cancel()`` stops it at the next token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # unbounded: the producer must never block
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def put(self, item: Any) -> None:
        """From the generating thread: hand ``item`` to the loop (a no-op once the loop has closed)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as they come; the model's error is raised here. Leaving early cancels the rest."""
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()


class ChatModels:
    """The loaded generators, keyed by run id (least recently used dropped past ``keep``), and who may use them."""

    def __init__(self, *, keep: int = 2, wait_s: float = 30.0) -> None:
        self.keep, self.wait_s = keep, wait_s
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # touched only on the generation thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-chat")
        self._lock: asyncio.Lock | None = None  # made on first use, inside the server's event loop
        self._running: set[Generation] = set()

    def resolve(self, model: str) -> str:
        """``run:RUN_ID`` → the full run id (404 for anything else)."""
        return services.resolve_served(model)

    async def start(self, run_id: str, messages: list[dict[str, str]], usage: Any, **sampling: Any) -> Generation:
        """Wait (at most ``wait_s``, on the loop) for the model, then start answering on the generation thread."""
        self._lock = self._lock or asyncio.Lock()
        lock = self._lock
        try:
            await asyncio.wait_for(lock.acquire(), self.wait_s)
        except TimeoutError:
            raise busy(self.wait_s) from None
        loop = asyncio.get_running_loop()
        generation = Generation(loop)
        self._running.add(generation)

        def release(_: Future[None]) -> None:  # on the generation thread, once it is really done
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(self._finished, lock, generation)

        try:
            self._executor.submit(self._produce, generation, run_id, messages, usage, sampling).add_done_callback(
                release
            )
        except RuntimeError:  # the executor was shut down: the server is stopping
            self._finished(lock, generation)
            raise busy(self.wait_s) from None
        return generation

    def _finished(self, lock: asyncio.Lock, generation: Generation) -> None:
        self._running.discard(generation)
        lock.release()

    def _produce(self, generation: Generation, run_id: str, messages: list[dict[str, str]], usage: Any,
                 sampling: dict[str, Any]) -> None:  # fmt: skip
        try:
            if not generation.cancelled:  # the client may have left while waiting for the model
                model = self._generator(run_id)
                for piece in services.stream_chat(model, messages, usage, **sampling):
                    if generation.cancelled:
                        break  # closing the token iterator stops the backend's generation too
                    generation.put(piece)
        except BaseException as exc:  # handed to the request, which raises it
            generation.put(exc)
        generation.put(_END)

    def _generator(self, run_id: str) -> Any:
        if run_id in self._loaded:
            self._loaded.move_to_end(run_id)
            return self._loaded[run_id]
        gen = services.generator_for_run(run_id)
        self._loaded[run_id] = gen
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return gen

    def close(self) -> None:
        """At shutdown: stop every answer at its next token and start no new one."""
        for generation in list(self._running):
            generation.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def busy(wait_s: float) -> HTTPException:
    """The 503 for a chat that waited ``wait_s`` for the model without getting it."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"the model is busy answering other chats (waited {wait_s:g} s); retry later",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )


def completion_body(model: str, text: str, usage: Any) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": usage.finish_reason}
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


async def sse_chunks(model: str, first: str | None, pieces: AsyncIterator[str], usage: Any) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events as Server-Sent Events, ending with ``data: [DONE]``."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time())}

    def event(delta: dict[str, str], finish: str | None = None) -> str:
        body = {**base, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield event({"role": "assistant"})
    if first is not None:
        if first:
            yield event({"content": first})
        async for piece in pieces:
            if piece:
                yield event({"content": piece})
    yield event({}, usage.finish_reason)
    yield "data: [DONE]\n\n"
