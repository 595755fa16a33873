"""A run whose process died stays `running` no more; a run whose folder is gone says so.

Through the real CLI: a training run SIGKILLed mid-way, a run resumed twice at
once, and a finished run whose folder was deleted before `export`/`generate`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli, start_cli
from tests.hardening.conftest import train_config, write_config
from tests.integration.runs import finish, listed_runs, only_run_id, wait_for

from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope


def test_a_sigkilled_run_is_marked_failed_with_the_resume_hint(
    tmp_path: Path, tiny_model_dir: Path, chat_file: Path
) -> None:
    """Before: it stayed `running` in `runs list` forever."""
    home, out = tmp_path / "home", tmp_path / "out"
    raw = train_config(tiny_model_dir, chat_file, out, steps=400, save_every=2)
    proc = start_cli("train", write_config(tmp_path / "cfg.yaml", raw), home=home)
    wait_for(out / "checkpoints" / "step-2", proc)
    run_id = only_run_id(home)
    assert listed_runs(home)[0]["status"] == "running", "a live run is left alone"
    again = run_cli("train", "--resume", run_id, home=home)  # a second process would write the same checkpoints
    assert again.returncode == 7 and f"run {run_id} is still training (process {proc.pid}" in again.stderr
    assert proc.poll() is None, "the refused resume did not disturb the run"

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    [run] = listed_runs(home)
    assert run["status"] == "failed"
    assert f"its process ({proc.pid} on {socket.gethostname()}) ended" in run["error"]
    assert f"tunelab train --resume {run_id}" in run["error"]
    shown = run_cli("runs", "show", run_id, home=home)
    assert "failed" in shown.stdout and "--resume" in shown.stdout


def test_runs_of_other_hosts_and_of_live_processes_are_never_marked(tunelab_home: Path) -> None:
    """What can't be checked from here (another host), is alive (this process), or names no owner stays `running`."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that existed and is now free
    here = socket.gethostname()
    owners = {"elsewhere": (gone.pid, "another-host"), "alive": (os.getpid(), here), "old": (None, None)}
    owners["dead"] = (gone.pid, here)
    with session_scope(open_registry()) as s:
        for run_id, (pid, host) in owners.items():
            repo.create_run(s, run_id=run_id, config={"model": {"path": "m"}}, output_dir=str(tunelab_home))
            repo.update_run(s, run_id, status="running", owner_pid=pid, owner_host=host)
    statuses = {run["id"]: run["status"] for run in listed_runs(tunelab_home)}
    assert statuses == {"elsewhere": "running", "alive": "running", "old": "running", "dead": "failed"}


def test_export_and_generate_say_the_run_folder_is_gone(tmp_path: Path, tiny_model_dir: Path, chat_file: Path) -> None:
    """Before: a traceback from the loader (generate) and a misleading "not found" (export)."""
    home, out = tmp_path / "home", tmp_path / "out"
    finish(
        start_cli(
            "train",
            write_config(tmp_path / "cfg.yaml", train_config(tiny_model_dir, chat_file, out, steps=2)),
            home=home,
        )
    )
    run_id = only_run_id(home)
    shutil.rmtree(out)

    for args in (("export", run_id, "--to", "hf", "--out", tmp_path / "hf"), ("generate", "--run", run_id, "hi")):
        result = run_cli(*args, home=home)
        assert result.returncode == 7, result.stderr
        assert "Traceback" not in result.stderr
        assert f"run {run_id}: {out} is gone (deleted or moved since the run wrote it)" in result.stderr
    shown = run_cli("runs", "show", run_id, home=home)
    assert f"gone: {out}" in " ".join(shown.stdout.split())
    assert listed_runs(home)[0]["missing"] == [str(out)]
