"""The FastAPI application: routers, error mapping, body limits.  Built by a factory, never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab import __version__
from tunelab.api import hints, logs
from tunelab.api.chat import ChatModels
from tunelab.api.deps import require_key
from tunelab.api.responses import errors
from tunelab.api.routes import chat, datasets, health, jobs, models, runs
from tunelab.errors import TunelabError
from tunelab.settings import Settings, get_settings

JSON_BODY_LIMIT = 1 << 20
"""Bodies of every route but uploads stay under 1 MiB (a config or a chat is far smaller)."""
UPLOAD_PATH = "/v1/datasets"


def create_app(settings: Settings | None = None) -> FastAPI:
    """A ready app; settings are read now (or passed in), not at import."""
    settings = settings or get_settings()
    chat_models = ChatModels(wait_s=settings.chat_wait_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logs.install()  # uvicorn has configured its loggers by now
        yield
        chat_models.close()  # stop answers at their next token, so the process exits promptly

    app = FastAPI(
        title="tunelab",
        version=__version__,
        description="Queue fine-tunes, follow runs, chat with their adapters. Send `Authorization: Bearer KEY`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.chat_models = chat_models
    app.include_router(health.router)
    secured = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=errors(400, 401, 413, 422))
    for module in (jobs, runs, datasets, models, chat):
        secured.include_router(module.router)
    app.include_router(secured)
    app.include_router(runs.ws_router, prefix="/v1")  # WebSockets check the key themselves (see deps)
    app.add_exception_handler(TunelabError, _tunelab_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT, upload_limit=settings.upload_limit_bytes + (64 << 10))
    return app


async def _client_left(request: Request, exc: Exception) -> Response:
    """The client hung up mid-request: nobody is left to answer, and it is no server error (no traceback)."""
    return Response(status_code=400)


async def _tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
    """A user's mistake: its HTTP status and the message that says what to change."""
    body: dict[str, Any] = {"detail": hints.for_api(exc.message)}
    if exc.hint:
        body["hint"] = hints.for_api(exc.hint)
    return JSONResponse(body, status_code=exc.http_status)


class BodyLimit:
    """Refuse oversize bodies with 413: by Content-Length up front, and by counting when the body is streamed.

    A streamed body that passes the limit is answered here, at once; the app then sees a client that left
    (whatever it answers to that is dropped), so no route's body parsing can turn the refusal into a 400.
    """

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"].rstrip("/") == UPLOAD_PATH else self.limit
        refusal = JSONResponse({"detail": f"request body over the {limit}-byte limit"}, 413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if not declared.isdigit():
                refusal = JSONResponse({"detail": "Content-Length must be a whole number of bytes"}, 400)
            await refusal(scope, receive, send)
            return
        seen, started, answered = 0, False, False

        async def counted() -> Message:
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    answered = True
                    if not started:
                        await refusal(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if not answered:
                started = True
                await send(message)

        await self.app(scope, counted, guarded)
