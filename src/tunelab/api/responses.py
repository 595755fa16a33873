"""The error bodies routes really send, as the OpenAPI schema documents them (FastAPI's ``responses=``).

Every error is ``{"detail": ..., "hint"?: ...}``: ``detail`` is a sentence, except for a 422 from request
validation, where it is the list of problems FastAPI found (one per field).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """A refusal: what went wrong, and (``hint``) what to change."""

    model_config = ConfigDict(extra="allow")
    detail: str
    hint: str | None = None


class FieldProblem(BaseModel):
    """One field request validation refused: where (``loc``), why (``msg``), and FastAPI's ``type`` code."""

    model_config = ConfigDict(extra="allow")  # FastAPI adds ``input`` and ``ctx``
    loc: list[str | int]
    msg: str
    type: str


class ValidationBody(BaseModel):
    """A 422: either request validation's list of field problems, or a config key tunelab refused (a sentence)."""

    model_config = ConfigDict(extra="allow")
    detail: str | list[FieldProblem] = Field(description="a sentence naming the key, or one entry per bad field")
    hint: str | None = None


_WHAT = {
    400: "malformed request (a path, a parameter or a multipart body that cannot be read)",
    401: "missing, invalid or revoked API key",
    404: "no such run, job or model",
    409: "conflicts with the current state",
    413: "request body over the limit",
    415: "not multipart/form-data",
    422: "a field or config key is invalid",
    503: "the model is busy with other chats: retry after Retry-After seconds",
    507: "the server's disk is full",
}


def errors(*codes: int, extra: dict[int | str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` documenting ``codes`` with the bodies they really carry (plus ``extra`` entries as given)."""
    out: dict[int | str, dict[str, Any]] = {
        code: {"model": ValidationBody if code == 422 else ErrorBody, "description": _WHAT[code]} for code in codes
    }
    if 503 in codes:
        out[503]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}
    if 401 in codes:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return {**out, **(extra or {})}
