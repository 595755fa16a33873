"""`GET /health`: the one route that needs no key (for load balancers and `serve` start-up checks)."""

from __future__ import annotations

from fastapi import APIRouter

from tunelab import __version__

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the server is up (says nothing about workers).

    ``async``: it answers on the event loop, whatever holds the server's thread pool.
    """
    return {"status": "ok", "version": __version__}
