"""The same job operations as :mod:`tunelab.services.jobs`, over HTTP against `tunelab serve`.

The CLI picks this when given ``--server URL`` (or ``TUNELAB_SERVER``); the key
comes from ``TUNELAB_API_KEY`` so it never shows in shell history.
"""

from __future__ import annotations

import os
from typing import Any

from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError, NotFoundError, StateError, TunelabError
from tunelab.services.views import JobView


class ApiClient:
    """A thin, typed wrapper over the /v1 job routes."""

    def __init__(self, server: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        import httpx

        key = api_key or os.environ.get("TUNELAB_API_KEY")
        if not key:
            raise ConfigError(
                "no API key for the server", hint="set TUNELAB_API_KEY (create one with `tunelab auth create-key`)"
            )
        self._http = httpx.Client(
            base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TunelabError(f"cannot reach {self._http.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise _error_for(response.status_code, _detail(response))
        return response.json()

    def submit_job(self, cfg: RunConfig, *, kind: str = "train", priority: int = 0, nproc: int = 1) -> JobView:
        body = {"config": cfg.to_dict(), "kind": kind, "priority": priority, "nproc": nproc or "auto"}
        return JobView(**self._call("POST", "/v1/jobs", json=body))

    def submit_eval(self, run_text: str, *, priority: int = 0, **request: Any) -> JobView:
        """Queue an eval of a run on the server (``request``: data, metrics, base, limit, max_new_tokens)."""
        body = {**{k: v for k, v in request.items() if v is not None}, "priority": priority}
        return JobView(**self._call("POST", f"/v1/runs/{run_text}/evals", json=body))

    def list_jobs(self, *, status: str | None = None, limit: int = 200) -> list[JobView]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return [JobView(**job) for job in self._call("GET", "/v1/jobs", params=params)]

    def show_job(self, job_id: str) -> JobView:
        return JobView(**self._call("GET", f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> JobView:
        return JobView(**self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def job_events(self, job_id: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)


def _error_for(status: int, detail: str) -> TunelabError:
    if status == 401:
        return ConfigError(f"the server refused the API key: {detail}", hint="check TUNELAB_API_KEY")
    if status == 404:
        return NotFoundError(detail)
    if status == 409:
        return StateError(detail)
    if status == 422:
        return ConfigError(detail)
    return TunelabError(f"server error {status}: {detail}")
