"""Reusable dependencies: settings and the API key every route but /health needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, WebSocket, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tunelab.services.views import KeyView
from tunelab.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key from `tunelab auth create-key`.")


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (read once, at start-up)."""
    return request.app.state.settings


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> KeyView:
    """The caller's API key record; 401 when the header is missing, malformed, unknown or revoked."""
    from tunelab.services import verify_key

    if credentials is None:
        raise unauthorized(
            "missing API key: send 'Authorization: Bearer KEY' (create one with `tunelab auth create-key`)"
        )
    record = verify_key(credentials.credentials)
    if record is None:
        raise unauthorized("invalid or revoked API key")
    return record


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ApiKey = Annotated[KeyView, Depends(require_key)]


BEARER_SUBPROTOCOL = "tunelab.bearer"
"""A browser can't set headers on a WebSocket: it may offer ``["tunelab.bearer", KEY]`` as subprotocols."""


@dataclass(frozen=True)
class WsAuth:
    """A WebSocket client's key was accepted; answer the handshake with ``subprotocol`` (None: none asked)."""

    subprotocol: str | None = None


def _ws_key(websocket: WebSocket) -> tuple[str, str | None]:
    """The key a WebSocket client sent, and the subprotocol to accept when it came as one."""
    scheme, _, key = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key:
        return key.strip(), None
    offered = [str(p) for p in websocket.scope.get("subprotocols", [])]
    if BEARER_SUBPROTOCOL in offered:
        rest = [p for p in offered if p != BEARER_SUBPROTOCOL]
        return (rest[0] if rest else ""), BEARER_SUBPROTOCOL
    # Kept for older clients; the server's logs show it as api_key=[redacted] (see api/logs.py).
    return websocket.query_params.get("api_key", "").strip(), None


async def require_key_ws(websocket: WebSocket) -> WsAuth | None:
    """WebSocket auth: ``Authorization: Bearer KEY``, the subprotocols ``tunelab.bearer, KEY``, or ``?api_key=``.

    Refuses the handshake (HTTP 403 to the client, close code 4401) and returns None without a valid key.
    """
    from starlette.concurrency import run_in_threadpool

    from tunelab.services import verify_key

    key, subprotocol = _ws_key(websocket)
    if key and await run_in_threadpool(verify_key, key) is not None:
        return WsAuth(subprotocol)
    await websocket.close(code=4401, reason="missing or invalid API key")
    return None
