"""A job on several processes: `tunelab worker --nproc 2` runs it with torchrun (gloo on CPU).

The 2-process job must train exactly as one process with twice the batch, stream
its metrics once (only rank 0 writes), and stop every rank with a checkpoint on cancel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file
from tests.integration.conftest import base_config
from tests.jobs.conftest import cli_env, start_worker, wait_until

from tunelab import services
from tunelab.config.load import validate_config
from tunelab.errors import ConfigError
from tunelab.jobs import queue
from tunelab.jobs.ranks import job_nproc, offered_nproc, parse_nproc

STEPS = 120  # long enough that a worker killed after step 5 leaves the job unfinished on an idle machine too
BATCH = 4  # per process; the one-process reference trains on 2 × BATCH


def _raw(model: Path, data: Path, out: Path, batch: int, steps: int = STEPS) -> dict:
    raw = base_config(model, data, out, steps=steps, batch_size=batch, save_every=5)
    raw["method"]["dropout"] = 0.0
    raw["model"]["dtype"] = "float32"
    raw["device"], raw["backend"] = "cpu", "torch"
    return raw


def _ranks_alive(job_id: str) -> list[str]:
    """Command lines of any process still running one of this job's ranks."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "run-rank" in cmd and job_id in cmd:
            found.append(cmd)
    return found


def test_nproc_is_n_or_auto_and_jobs_wait_for_a_worker_that_offers_enough(tmp_path: Path) -> None:
    assert parse_nproc("2") == 2 and parse_nproc("auto") == 0
    with pytest.raises(ConfigError, match="1 or more"):
        parse_nproc("0")
    assert offered_nproc("3") == 3 and job_nproc(0, 4) == 4 and job_nproc(2, 4) == 2
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n', encoding="utf-8")
    cfg = validate_config(base_config(tmp_path / "model", data, tmp_path / "out"))
    job = services.submit_job(cfg, nproc=2)
    assert job["nproc"] == 2
    assert queue.claim("small", stale_after=30, max_nproc=1) is None, "a 1-process worker must leave it queued"
    claimed = queue.claim("big", stale_after=30, max_nproc=2)
    assert claimed is not None and claimed.id == job["id"] and claimed.nproc == 2


def test_api_takes_nproc_as_a_number_or_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from tunelab.api.app import create_app
    from tunelab.security.keys import create_key

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hi"}\n', encoding="utf-8")
    monkeypatch.setenv("TUNELAB_API_ROOTS", str(tmp_path))
    config = base_config(tmp_path / "model", data, tmp_path / "out")
    del config["output_dir"]  # over the API each run gets a folder of its own under the runs folder
    key, _ = create_key("test")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as api:
        assert api.post("/v1/jobs", json={"config": config, "nproc": "auto"}).json()["nproc"] == 0
        assert api.post("/v1/jobs", json={"config": config, "nproc": 4}).json()["nproc"] == 4
        refused = api.post("/v1/jobs", json={"config": config, "nproc": 0})
        assert refused.status_code == 422 and "nproc" in refused.text


@pytest.fixture(scope="module")
def reference_adapter(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """One process with batch 2 × BATCH, uninterrupted (in a registry of its own): what every layout must match."""
    from tunelab.registry.db import close_registries

    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNELAB_HOME", str(root / "home"))
        env.delenv("TUNELAB_DB_URL", raising=False)
        outcome = services.start_run(validate_config(_raw(e2e_model, chat_data, root / "out", 2 * BATCH)))
        close_registries()
    assert outcome.status == "completed"
    return root / "out/adapter/adapter_model.safetensors"


def _adapter_diff(reference: Path, out: Path) -> float:
    left, right = load_file(str(reference)), load_file(str(out / "adapter/adapter_model.safetensors"))
    assert left.keys() == right.keys()
    return max(float(abs(left[k] - right[k]).max()) for k in left)


@pytest.mark.slow
def test_two_process_job_trains_as_one_process_with_twice_the_batch(
    reference_adapter: Path, e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw(e2e_model, chat_data, tmp_path / "out", BATCH)), encoding="utf-8")
    submit = [sys.executable, "-m", "tunelab", "jobs", "submit", str(cfg_path), "--nproc", "2", "--json"]
    job = yaml.safe_load(subprocess.run(submit, env=cli_env(), capture_output=True, text=True, check=True).stdout)
    workers.append(start_worker("--nproc", "2", "--exit-when-idle", log=tmp_path / "w.log"))
    assert workers[0].wait(timeout=240) == 0, (tmp_path / "w.log").read_text()
    assert "on 2 processes" in (tmp_path / "w.log").read_text()
    assert services.show_job(job["id"])["status"] == "completed", (tmp_path / "w.log").read_text()
    assert _adapter_diff(reference_adapter, tmp_path / "out") < 1e-4
    steps = [e["step"] for e in services.job_events(job["id"]) if e["type"] == "metric" and "train_loss" in e]
    assert sorted(steps) == sorted(set(steps)) and STEPS in steps, "each step's metrics reach the log once"


@pytest.mark.slow
def test_cancel_stops_every_rank_with_a_checkpoint(
    e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    cfg = validate_config(_raw(e2e_model, chat_data, tmp_path / "out", BATCH, steps=2000))
    job = services.submit_job(cfg, nproc=2)
    workers.append(start_worker("--nproc", "2", "--max-jobs", "1", log=tmp_path / "w.log"))
    wait_until(lambda: (tmp_path / "out/checkpoints/step-5").exists(), timeout=120, what="first checkpoint")
    assert len(_ranks_alive(job["id"])) >= 2, "the job runs as two ranks"
    services.cancel_job(job["id"])
    assert workers[0].wait(timeout=120) == 0, (tmp_path / "w.log").read_text()
    assert services.show_job(job["id"])["status"] == "cancelled", (tmp_path / "w.log").read_text()
    run = services.show_run(job["run_id"])
    assert run["status"] == "cancelled" and run["step"] < 2000
    assert (tmp_path / "out/checkpoints" / f"step-{run['step']}").is_dir(), "the last step was checkpointed"
    assert _ranks_alive(job["id"]) == [], "no rank outlives the cancel"


@pytest.mark.slow
def test_sigkilled_worker_job_resumes_on_another_worker_with_another_process_count(
    reference_adapter: Path, e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    job = services.submit_job(validate_config(_raw(e2e_model, chat_data, tmp_path / "out", BATCH)), nproc=0)
    workers.append(start_worker("--nproc", "2", log=tmp_path / "w1.log"))
    wait_until(lambda: (tmp_path / "out/checkpoints/step-5").exists(), timeout=120, what="checkpoint step-5")
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait(timeout=30)
    assert not (tmp_path / "out/adapter").exists(), "the job finished before its worker could be killed"
    wait_until(lambda: not _ranks_alive(job["id"]), timeout=30, what="the dead worker's ranks to exit")
    time.sleep(3.5)  # the lease lapses after the workers' --stale-after 3
    # An `auto` job takes what the next worker offers: 1 process, the global batch kept by the checkpoint.
    workers.append(start_worker("--nproc", "1", "--exit-when-idle", log=tmp_path / "w2.log"))
    assert workers[1].wait(timeout=240) == 0, (tmp_path / "w2.log").read_text()
    done = services.show_job(job["id"])
    assert done["status"] == "completed" and done["attempts"] == 2, done
    assert "resuming from step-" in " ".join(e.get("text", "") for e in services.job_events(job["id"]))
    assert _adapter_diff(reference_adapter, tmp_path / "out") < 1e-4
