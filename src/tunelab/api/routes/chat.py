"""OpenAI-compatible `POST /v1/chat/completions` for `model: "run:RUN_ID"`, streaming included (SSE)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunelab import services
from tunelab.api.chat import completion_body, sse_chunks
from tunelab.api.schemas import ChatRequest

router = APIRouter(prefix="/chat", tags=["chat"])


@router.post("/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    """Answer with the run's base model plus its adapter; ``stream: true`` sends SSE chunks."""
    models = request.app.state.chat_models
    run_id = await run_in_threadpool(models.resolve, body.model)
    messages = [m.model_dump() for m in body.messages]
    usage = services.new_usage()
    sampling = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    pieces = models.stream(run_id, messages, usage, **sampling)
    if body.stream:
        # Load the model and make the first piece before answering, so a load error is an HTTP error, not a cut stream.
        first = await run_in_threadpool(next, pieces, None)
        chain = _prepend(first, pieces)
        return StreamingResponse(sse_chunks(body.model, chain, usage), media_type="text/event-stream")
    text = "".join(await run_in_threadpool(list, pieces))
    return completion_body(body.model, text, usage)


def _prepend(first: str | None, rest: Any) -> Any:
    if first is not None:
        yield first
        yield from rest
