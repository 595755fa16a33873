"""`/v1/runs`: the same JSON as `runs show --json`, metrics, and a live event stream."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect, status
from starlette.concurrency import run_in_threadpool

from tunelab import services
from tunelab.api.deps import SettingsDep, require_key_ws
from tunelab.api.responses import errors
from tunelab.api.schemas import EvalCreate, EvalPage, JobPublic, MetricPoint, RunPublic
from tunelab.errors import NotFoundError
from tunelab.vocab import FINAL_STATUSES, RUN_STATUSES

router = APIRouter(prefix="/runs", tags=["runs"])
ws_router = APIRouter(prefix="/runs", tags=["runs"])
StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(RUN_STATUSES) + ")$")]
POLL_S = 0.25
MAX_EVENT_ID = 2**62


@router.get("", response_model=list[RunPublic])
def list_runs(status: StatusFilter = None, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    """Newest runs first."""
    return [run.to_dict() for run in services.list_runs(status=status, limit=limit)]


@router.get("/{run_id}", response_model=RunPublic, responses=errors(404))
def show_run(run_id: str) -> dict[str, Any]:
    """One run, exactly as `tunelab runs show RUN --json` prints it."""
    return services.show_run(run_id).to_dict()


@router.get("/{run_id}/metrics", response_model=list[MetricPoint], responses=errors(404))
def run_metrics(run_id: str) -> list[dict[str, Any]]:
    """Every logged point as ``{step, name, value}``, in step order."""
    return [point.to_dict() for point in services.run_metrics(run_id)]


@router.post("/{run_id}/evals", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses=errors(404, 409))  # fmt: skip
def start_eval(run_id: str, body: EvalCreate, settings: SettingsDep) -> dict[str, Any]:
    """Queue `tunelab eval` of a finished run as a job (a worker runs it); a bad metric or data file is a 422."""
    return services.submit_eval(
        run_id, data=body.data, metrics=body.metrics, base=body.base, limit=body.limit,
        max_new_tokens=body.max_new_tokens, priority=body.priority, allowed_roots=settings.allowed_roots,
    ).to_dict()  # fmt: skip


@router.get("/{run_id}/evals", response_model=EvalPage, responses=errors(404))
def eval_results(
    run_id: str, offset: Annotated[int, Query(ge=0, le=2**31)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> dict[str, Any]:
    """The run's newest eval: scores, the base's, and examples ``offset`` .. ``offset + limit`` of ``total``."""
    return services.eval_page(run_id, offset=offset, limit=limit)


@ws_router.websocket("/{run_id}/events")
async def run_events(websocket: WebSocket, run_id: str) -> None:
    """JSON events (``type``: metric | log | status), starting with everything after ``?after=ID`` (default: all).

    A late subscriber therefore first gets what it missed; the socket closes
    itself once the run has ended and every event has been sent. A bad ``after``
    or an unknown run closes it at once with code 4400 or 4404 and a reason.
    """
    auth = await require_key_ws(websocket)
    if auth is None:
        return
    await websocket.accept(subprotocol=auth.subprotocol)
    after = _event_id(websocket.query_params.get("after", "0"))
    try:
        if after is None:
            await websocket.close(code=4400, reason=f"after: a whole number from 0 to {MAX_EVENT_ID} is needed")
            return
        try:
            run_id = (await run_in_threadpool(services.show_run, run_id)).id
        except NotFoundError as exc:
            await websocket.close(code=4404, reason=exc.message[:120])
            return
        await _pump(websocket, run_id, after)
        await websocket.close(code=status.WS_1000_NORMAL_CLOSURE)
    except (WebSocketDisconnect, OSError):
        return  # the client left: nothing to send, nothing to log


def _event_id(text: str) -> int | None:
    """``after`` as an event id, or None when it is not one (the registry holds ids up to 2**62)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_EVENT_ID:
        return None
    return int(text)


async def _pump(websocket: WebSocket, run_id: str, after: int) -> None:
    while True:
        events = await run_in_threadpool(services.run_events, run_id, after=after)
        for event in events:
            await websocket.send_json(event)
            after = event["id"]
        if not events:
            run = await run_in_threadpool(services.run_status, run_id)
            if run in FINAL_STATUSES and not await run_in_threadpool(services.run_events, run_id, after=after):
                return
            await asyncio.sleep(POLL_S)
