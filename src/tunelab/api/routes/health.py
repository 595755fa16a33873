"""`GET /health`: the one route that needs no key (for load balancers and `serve` start-up checks)."""

from __future__ import annotations

from fastapi import APIRouter

from tunelab import __version__

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the server is up (says nothing about workers)."""
    return {"status": "ok", "version": __version__}
