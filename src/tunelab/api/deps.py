"""Reusable dependencies: settings and the API key every route but /health needs."""

from __future__ import annotations

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


async def require_key_ws(websocket: WebSocket) -> bool:
    """WebSocket auth: ``Authorization: Bearer KEY`` (or ``?api_key=`` where a browser can't set headers).

    Refuses the handshake (HTTP 403 to the client, close code 4401) and returns False without a valid key.
    """
    from starlette.concurrency import run_in_threadpool

    from tunelab.services import verify_key

    header = websocket.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        key = websocket.query_params.get("api_key", "")
    if key and await run_in_threadpool(verify_key, key.strip()) is not None:
        return True
    await websocket.close(code=4401, reason="missing or invalid API key")
    return False
