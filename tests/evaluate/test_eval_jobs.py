"""An eval queued over HTTP (and from the CLI against the server) runs on a real worker; its results are paged back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import start_server, stop_server

pytestmark = pytest.mark.slow


def test_an_eval_job_runs_on_a_worker_and_its_answers_are_paged_over_the_api(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    home, run_id = trained
    shutil.copytree(home, tmp_path / "home")  # the trained run's registry, served by a real `tunelab serve`
    server, proc = start_server(tmp_path)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as api:
            _refusals(api, run_id, tmp_path)
            client_env = server.env(TUNELAB_API_KEY=server.key, TUNELAB_HOME=str(tmp_path / "client"))
            queued = subprocess.run(
                [sys.executable, "-m", "tunelab", "eval", run_id, "--queue", "--server", server.url,
                 "--metrics", "exact_match", "--no-base", "--max-new-tokens", "8", "--json"],
                env=client_env, capture_output=True, text=True,
            )  # fmt: skip
            assert queued.returncode == 0, queued.stderr[-2000:]
            from_cli = json.loads(queued.stdout)
            body = {"metrics": ["exact_match", "contains"], "limit": 5, "max_new_tokens": 8}
            created = api.post(f"/v1/runs/{run_id}/evals", json=body)
            assert created.status_code == 201, created.text
            job = created.json()
            assert (job["kind"], job["status"], job["run_id"]) == ("eval", "queued", run_id)
            assert (from_cli["kind"], from_cli["run_id"]) == ("eval", run_id)

            out = _work(server.env(), jobs=2)
            for queued_job in (from_cli, job):
                shown = api.get(f"/v1/jobs/{queued_job['id']}").json()
                assert shown["status"] == "completed", (shown, out)
            logs = [e["text"] for e in api.get(f"/v1/jobs/{job['id']}/events").json() if e["type"] == "log"]
            assert any(line.startswith(f"eval of run {run_id} on 5 examples") for line in logs), logs

            run = api.get(f"/v1/runs/{run_id}").json()
            assert run["status"] == "completed", "an eval job reads its run; it never changes the run's status"
            page = api.get(f"/v1/runs/{run_id}/evals", params={"offset": 2, "limit": 2})
            assert page.status_code == 200, page.text
            results = page.json()  # the newest eval: the API's job ran second (same priority, queued later)
            assert results["total"] == 5 and results["offset"] == 2 and not results["missing"]
            assert results["scores"]["exact_match"] >= 0.8 and results["base_scores"]["exact_match"] == 0.0
            assert set(results["scores"]) == {"exact_match", "contains"}
            lines = Path(results["path"]).read_text(encoding="utf-8").splitlines()
            assert results["examples"] == [json.loads(line) for line in lines[2:4]]
            assert [e["where"].rsplit(":", 1)[1] for e in results["examples"]] == ["3", "4"]
            assert run["metrics"]["eval/exact_match"] == results["scores"]["exact_match"]
            assert run["metrics"]["eval/base/exact_match"] == 0.0
            past_the_end = api.get(f"/v1/runs/{run_id}/evals", params={"offset": 5}).json()
            assert past_the_end["examples"] == [] and past_the_end["total"] == 5
    finally:
        stop_server(proc)


def _refusals(api: httpx.Client, run_id: str, tmp_path: Path) -> None:
    """Each mistake is refused when queued, naming what to change; nothing is queued for any of them."""
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    cases = [
        (run_id, {"metrics": ["accuracy"]}, 422, "'exact_match_raw'"),  # the names it takes are listed
        (run_id, {"metrics": ["os:system"]}, 422, "'rouge_l'"),  # no server-side code named by a client
        (run_id, {"data": str(outside)}, 422, "outside the folders this server may read"),
        (run_id, {"max_new_tokens": 0}, 422, "max_new_tokens"),
        ("nosuchrun", {}, 404, "nosuchrun"),
    ]
    for run, body, code, says in cases:
        refused = api.post(f"/v1/runs/{run}/evals", json=body)
        assert refused.status_code == code and says in refused.text, (body, refused.text)
    assert api.get("/v1/jobs").json() == [], "a refused eval queues nothing"
    assert api.get("/v1/runs/nosuchrun/evals").status_code == 404


def _work(env: dict[str, str], *, jobs: int) -> str:
    """A real `tunelab worker` runs ``jobs`` queued jobs, then exits."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "worker", "--max-jobs", str(jobs), "--exit-when-idle",
         "--heartbeat", "0.5", "--stale-after", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    return out.decode(errors="replace")


def test_the_api_offers_exactly_the_built_in_metrics() -> None:
    from tunelab.evaluate.metrics import BUILT_IN, TOKEN_METRICS
    from tunelab.vocab import EVAL_METRICS

    assert set(EVAL_METRICS) == set(BUILT_IN) | set(TOKEN_METRICS)
