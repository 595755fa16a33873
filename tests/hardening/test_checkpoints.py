"""Resuming a run whose checkpoints were damaged, planted with a pickle, or cut short by a full disk.

Every scenario runs the real CLI: a run is SIGKILLed (or stopped) after a few
checkpoints, its folder is tampered with as a disk or a person would, and
``tunelab train --resume`` must pass over what it can't trust, say so, and finish.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tests.conftest import start_cli
from tests.hardening.conftest import train_config, write_config
from tests.integration.runs import listed_runs, only_run_id, stop_after_first_step, wait_for

STEPS = 30


@pytest.fixture(scope="module")
def _killed_once(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, chat_file: Path) -> tuple[Path, str]:
    """A run SIGKILLed once its checkpoint of step 8 exists (one every 2 steps, 5 kept), trained once for the module:
    its folder (home/, out/ and a pristine copy of both) and its id."""
    root = tmp_path_factory.mktemp("killed-run")
    home, out = root / "home", root / "out"
    raw = train_config(tiny_model_dir, chat_file, out, steps=STEPS, save_every=2, keep_checkpoints=5)
    proc = start_cli("train", write_config(root / "cfg.yaml", raw), home=home)
    wait_for(out / "checkpoints" / "step-8", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "adapter").exists(), "the run finished before it could be killed"
    run_id = only_run_id(home)
    for name in ("home", "out"):
        shutil.copytree(root / name, root / "pristine" / name)
    return root, run_id


@pytest.fixture
def killed_run(_killed_once: tuple[Path, str]) -> tuple[Path, Path, str]:
    """The module's killed run as it was killed (home and folder put back where the registry says they are, as a
    test before may have resumed or damaged them): home, checkpoints, id."""
    root, run_id = _killed_once
    for name in ("home", "out"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(root / "pristine" / name, root / name)
    return root / "home", root / "out" / "checkpoints", run_id


def _steps(checkpoints: Path) -> list[Path]:
    found = [p for p in checkpoints.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _resume(home: Path, run_id: str, *, marker: Path | None = None) -> str:
    """``tunelab train --resume`` to the end; its console output (``marker``: a file that must not appear)."""
    proc = start_cli("train", "--resume", run_id, home=home)
    out, err = proc.communicate(timeout=300)
    assert marker is None or not marker.exists(), "the planted pickle ran"
    assert "Traceback" not in err, err
    assert proc.returncode == 0, f"{out}\n{err}"
    [run] = listed_runs(home)
    assert run["status"] == "completed" and run["step"] == STEPS
    return out + err


def test_resume_passes_over_damaged_checkpoints_and_says_which_and_why(killed_run: tuple[Path, Path, str]) -> None:
    """Before: a truncated safetensors file ended the resume in a traceback, though older checkpoints were intact."""
    home, checkpoints, run_id = killed_run
    *_, intact, garbage_state, empty_optimizer, truncated = _steps(checkpoints)
    weights = truncated / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name in ("optimizer.pt", "optimizer.safetensors"):  # whichever this version writes
        if (empty_optimizer / name).exists():
            (empty_optimizer / name).write_bytes(b"")
    (garbage_state / "trainer_state.json").write_text("{'step': 7,", encoding="utf-8")

    said = _resume(home, run_id)
    assert f"skipped checkpoint {truncated.name}: trainable.safetensors has" in said
    assert f"skipped checkpoint {empty_optimizer.name}: optimizer" in said
    assert f"skipped checkpoint {garbage_state.name}: trainer_state.json" in said
    assert f"resuming from {intact.name}" in said
    assert (checkpoints / f"{truncated.name}.damaged").is_dir(), "kept aside for a look, never pruned in its place"


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a file planted in a run folder could do on --resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_never_run_on_resume(tmp_path: Path, killed_run: tuple[Path, Path, str]) -> None:
    """Before: rng.pt was read with torch.load(weights_only=False), so the planted file ran its command."""
    home, checkpoints, run_id = killed_run
    *_, older, newest = _steps(checkpoints)
    marker = tmp_path / "pwned"
    for folder in (older, newest):
        torch.save(_Payload(marker), folder / "rng.pt")  # torch.save: a pickle inside torch's zip, as rng.pt was
    for name in ("rng.safetensors", "manifest.json"):  # the newest now looks like a checkpoint of an older version
        (newest / name).unlink(missing_ok=True)

    said = _resume(home, run_id, marker=marker)
    assert f"skipped checkpoint {newest.name}: it could not be loaded (UnpicklingError" in said
    assert f"resuming from {older.name}" in said  # its planted rng.pt is not one of its files: never read


# Run the CLI with a file-size limit: a write past it fails with EFBIG, as a full disk fails with ENOSPC.
_LIMITED = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv = ['tunelab', *sys.argv[4:]]; runpy.run_module('tunelab', run_name='__main__', alter_sys=True)"
)


def test_a_full_disk_mid_checkpoint_says_what_is_needed_and_resume_works(
    tmp_path: Path, tiny_model_dir: Path, chat_file: Path
) -> None:
    """Before: a traceback about inline_container.cc, and a .step-N.tmp-* folder left to keep the disk full."""
    home, out = tmp_path / "home", tmp_path / "out"
    raw = train_config(tiny_model_dir, chat_file, out, steps=STEPS, save_every=2, keep_checkpoints=5)
    raw["method"]["rank"] = 64  # a checkpoint file (~0.7 MB) well above the limit, the registry's files below it
    stopped = start_cli("train", write_config(tmp_path / "cfg.yaml", raw), home=home)
    stop_after_first_step(stopped, out)
    [kept] = _steps(out / "checkpoints")
    run_id = only_run_id(home)
    limit = max(p.stat().st_size for p in kept.iterdir()) // 2
    assert all(p.stat().st_size < limit for p in home.rglob("*") if p.is_file()), "the registry would hit it first"

    full = start_cli("train", "--resume", run_id, home=home, launcher=("-c", _LIMITED, str(limit)))
    _out, err = full.communicate(timeout=300)
    assert full.returncode == 8, err
    assert "Traceback" not in err and "inline_container" not in err
    # The stop lands at step 1 or, on a loaded machine, a step later: the resume's first save is the next multiple of 2.
    failed = (int(kept.name[5:]) // 2 + 1) * 2
    assert f"could not write checkpoint step-{failed} at {out / 'checkpoints'}: file too large" in err
    assert re.search(r"it needs ~[\d.]+ MB and [\d.]+ MB are free there", err), err
    assert f"the run keeps {kept.name}" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [kept.name], "no temp folder left, nothing lost"
    assert listed_runs(home)[0]["status"] == "failed"

    _resume(home, run_id)
