"""Real `tunelab worker` processes: jobs finish, survive a SIGKILL'd worker, run once under a race, cancel cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from tests.integration.conftest import base_config
from tests.jobs.conftest import cli_env, start_worker, wait_until, write_data

from tunelab import services
from tunelab.config.load import validate_config

STEPS = 30


def _train_cfg(model: Path, data: Path, out: Path, **train: object):
    raw = base_config(model, data, out, **{"steps": STEPS, "save_every": 5, "eval_every": 10, **train})
    raw["method"]["dropout"] = 0.2  # the RNG state must survive the takeover too
    return validate_config(raw)


def _adapter_diff(a: Path, b: Path) -> float:
    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    return max(float(abs(left[k] - right[k]).max()) for k in left)


def _done(job_id: str) -> bool:
    return services.show_job(job_id)["status"] in ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def reference_adapter(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Path:
    """An uninterrupted job's adapter (its own registry), for comparing a taken-over job against."""
    root = tmp_path_factory.mktemp("reference")
    env = cli_env(TUNELAB_HOME=str(root / "home"))
    env.pop("TUNELAB_DB_URL", None)
    cfg = _train_cfg(e2e_model, chat_data, root / "out")
    (root / "cfg.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()), encoding="utf-8")
    tl = [sys.executable, "-m", "tunelab"]
    subprocess.run([*tl, "jobs", "submit", str(root / "cfg.yaml")], env=env, check=True, capture_output=True)
    done = subprocess.run([*tl, "worker", "--exit-when-idle"], env=env, capture_output=True, text=True, timeout=300)
    assert "completed" in done.stderr, done.stderr
    logs = subprocess.run([*tl, "jobs", "list", "--json"], env=env, capture_output=True, text=True, check=True)
    job_id = __import__("json").loads(logs.stdout)[0]["id"]
    follow = subprocess.run([*tl, "jobs", "logs", job_id, "--follow"], env=env, capture_output=True, text=True)
    lines = follow.stdout.splitlines()
    assert lines[0].endswith("status queued") and lines[-1].endswith("status completed")
    assert any(" step 30 train_loss=" in line for line in lines), "metrics reach the job's log"
    return root / "out" / "adapter"


@pytest.mark.slow
def test_sigkilled_worker_job_is_taken_over_and_resumed(
    reference_adapter: Path, e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    job = services.submit_job(_train_cfg(e2e_model, chat_data, tmp_path / "out"))
    workers.append(start_worker(log=tmp_path / "w1.log"))
    wait_until(lambda: (tmp_path / "out/checkpoints/step-10").exists(), timeout=240, what="checkpoint step-10")
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait(timeout=30)
    assert not (tmp_path / "out/adapter").exists(), "the job finished before its worker could be killed"
    workers.append(start_worker("--max-jobs", "1", log=tmp_path / "w2.log"))
    wait_until(lambda: _done(job["id"]), timeout=300, what="the job to finish on the second worker")

    shown = services.show_job(job["id"])
    assert shown["status"] == "completed" and shown["attempts"] == 2, (tmp_path / "w2.log").read_text()
    assert services.show_run(job["run_id"])["status"] == "completed"
    logs = [e.get("text", "") for e in services.job_events(job["id"]) if e["type"] == "log"]
    assert any(t.startswith("resuming from step-") for t in logs), "the second attempt resumed, not restarted"
    assert _adapter_diff(reference_adapter, tmp_path / "out/adapter") <= 1e-5


def test_two_workers_racing_run_each_of_50_jobs_once(registry_url: str, tmp_path: Path, workers: list) -> None:
    data = write_data(tmp_path / "data")
    cfg = validate_config({"model": {"path": str(tmp_path / "m")}, "data": {"train": str(data)}})
    ids = [services.submit_job(cfg, kind="validate")["id"] for _ in range(50)]
    workers.extend(start_worker("--exit-when-idle", log=tmp_path / f"w{i}.log") for i in range(2))
    for proc in workers:
        assert proc.wait(timeout=120) == 0
    for job_id in ids:
        job = services.show_job(job_id)
        assert job["status"] == "completed" and job["attempts"] == 1, job
        events = services.job_events(job_id)
        runs = [e for e in events if e["type"] == "status" and e["status"] == "running"]
        executions = [e for e in events if e["type"] == "log" and e["text"].startswith("ok: format chat")]
        assert len(runs) == 1 and len(executions) == 1, events


@pytest.mark.slow
def test_cancel_running_job_stops_it_with_a_checkpoint(
    e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    job = services.submit_job(_train_cfg(e2e_model, chat_data, tmp_path / "out", steps=2000))
    workers.append(start_worker("--max-jobs", "1", log=tmp_path / "w.log"))
    wait_until(lambda: (tmp_path / "out/checkpoints/step-5").exists(), timeout=240, what="first checkpoint")
    cancel = subprocess.run(
        [sys.executable, "-m", "tunelab", "jobs", "cancel", job["id"]], env=cli_env(), capture_output=True, text=True
    )
    assert "cancel requested" in cancel.stdout, cancel.stderr
    assert workers[0].wait(timeout=120) == 0
    assert services.show_job(job["id"])["status"] == "cancelled"
    run = services.show_run(job["run_id"])
    assert run["status"] == "cancelled" and run["step"] < 2000
    assert (tmp_path / "out/checkpoints" / f"step-{run['step']}").is_dir(), "the last step was checkpointed"


def test_a_failing_job_is_recorded_and_the_worker_goes_on(tmp_path: Path, workers: list) -> None:
    data = write_data(tmp_path / "data")
    broken = validate_config(
        {
            "model": {"path": str(tmp_path / "no-such-model")},
            "data": {"train": str(data)},
            "output_dir": str(tmp_path / "o"),
        }
    )
    bad = services.submit_job(broken, priority=1)
    good = services.submit_job(broken, kind="validate")
    workers.append(start_worker("--exit-when-idle", log=tmp_path / "w.log"))
    assert workers[0].wait(timeout=120) == 0, "a job's failure never takes its worker down"
    failed = services.show_job(bad["id"])
    assert failed["status"] == "failed" and "no-such-model" in failed["error"], failed
    run = services.show_run(bad["run_id"])
    assert run["status"] == "failed" and "no-such-model" in run["error"]
    assert services.show_job(good["id"])["status"] == "completed"
    logged = [e for e in services.job_events(bad["id"]) if e["type"] == "log" and e.get("level") == "error"]
    assert logged and "no-such-model" in logged[0]["text"]


@pytest.mark.slow
def test_stopping_a_worker_hands_its_job_back_for_the_next_one(
    e2e_model: Path, chat_data: Path, tmp_path: Path, workers: list
) -> None:
    job = services.submit_job(_train_cfg(e2e_model, chat_data, tmp_path / "out"))
    workers.append(start_worker(log=tmp_path / "w1.log"))
    wait_until(lambda: (tmp_path / "out/checkpoints/step-5").exists(), timeout=240, what="first checkpoint")
    os.kill(workers[0].pid, signal.SIGTERM)  # what Ctrl-C or a service manager sends
    assert workers[0].wait(timeout=120) == 0
    handed_back = services.show_job(job["id"])
    assert handed_back["status"] == "queued" and handed_back["worker_id"] is None, handed_back
    assert handed_back["attempts"] == 0  # a graceful stop is not an abandoned attempt
    assert services.show_run(job["run_id"])["status"] == "queued"
    workers.append(start_worker("--max-jobs", "1", log=tmp_path / "w2.log"))
    assert workers[1].wait(timeout=300) == 0
    done = services.show_job(job["id"])
    assert done["status"] == "completed" and done["attempts"] == 1
    logs = [e.get("text", "") for e in services.job_events(job["id"]) if e["type"] == "log"]
    assert any(t.startswith("resuming from step-") for t in logs)
