"""Chat completions with a run's adapter: loaded models kept, one-at-a-time generation, OpenAI shapes.

Models are loaded on first use and kept (the most recent few); generation
runs on one thread per request under a lock, because a backend holds one
model state and is not safe to drive from two threads at once.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tunelab import services

_END = object()


@dataclass
class ChatModels:
    """The loaded generators, keyed by run id (least recently used dropped past ``keep``)."""

    keep: int = 2
    _loaded: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, model: str) -> str:
        """``run:RUN_ID`` → the full run id (404 for anything else)."""
        return services.resolve_served(model)

    def _generator(self, run_id: str) -> Any:
        if run_id in self._loaded:
            self._loaded.move_to_end(run_id)
            return self._loaded[run_id]
        gen = services.generator_for_run(run_id)
        self._loaded[run_id] = gen
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return gen

    def stream(self, run_id: str, messages: list[dict[str, str]], usage: Any, **sampling: Any) -> Iterator[str]:
        """Yield text pieces; model errors surface at the first ``next()``."""
        out: queue.Queue[Any] = queue.Queue(maxsize=64)

        def produce() -> None:
            try:
                with self._lock:
                    gen = self._generator(run_id)
                    for piece in services.stream_chat(gen, messages, usage, **sampling):
                        out.put(piece)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                out.put(exc)
            out.put(_END)

        threading.Thread(target=produce, name=f"chat-{run_id}", daemon=True).start()
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


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


def sse_chunks(model: str, pieces: Iterator[str], usage: Any) -> Iterator[str]:
    """``chat.completion.chunk`` events as Server-Sent Events, ending with ``data: [DONE]``."""
    import json

    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time())}

    def event(delta: dict[str, str], finish: str | None = None) -> str:
        body = {**base, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield event({"role": "assistant"})
    for piece in pieces:
        if piece:
            yield event({"content": piece})
    yield event({}, usage.finish_reason)
    yield "data: [DONE]\n\n"
