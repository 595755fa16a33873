"""`GET /v1/models`: what `/v1/chat/completions` can serve (OpenAI's list shape)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tunelab import services
from tunelab.api.schemas import ModelList

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models() -> dict[str, Any]:
    """Every completed run with an adapter or model, as ``run:RUN_ID``."""
    return {"object": "list", "data": [model.to_dict() for model in services.served_models()]}
