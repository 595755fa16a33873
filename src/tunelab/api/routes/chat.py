"""OpenAI-compatible `POST /v1/chat/completions` for `model: "run:RUN_ID"`, streaming included (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from tunelab import services
from tunelab.api.chat import Generation, completion_body, sse_chunks
from tunelab.api.responses import errors
from tunelab.api.schemas import ChatRequest

router = APIRouter(prefix="/chat", tags=["chat"])


@router.post(
    "/completions",
    response_model=None,
    responses=errors(404, 409, 503, extra={200: {"content": {"text/event-stream": {}}}}),
)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """Answer with the run's base model plus its adapter; ``stream: true`` sends SSE chunks.

    One answer is generated at a time: a chat that waits too long for the model gets a 503 with Retry-After.
    """
    models = request.app.state.chat_models
    run_id = await run_in_threadpool(models.resolve, body.model)
    messages = [m.model_dump() for m in body.messages]
    usage = services.new_usage()
    sampling = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    generation = await models.start(run_id, messages, usage, **sampling)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
    try:
        pieces = generation.pieces()
        if body.stream:
            # Load the model and make the first piece before answering, so a load error is an HTTP error.
            first = await anext(pieces, None)
            return ChatStream(sse_chunks(body.model, first, pieces, usage), generation)
        text = "".join([piece async for piece in pieces])
    finally:
        watcher.cancel()
    return completion_body(body.model, text, usage)


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Stop generating once the client hangs up (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


class ChatStream(StreamingResponse):
    """SSE whose generation stops with the response, however it ends; a client that hangs up is no error."""

    def __init__(self, content: Any, generation: Generation) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # nobody is left to tell; the generation stops below
        finally:
            self.generation.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
