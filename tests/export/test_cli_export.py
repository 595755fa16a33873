"""`tunelab export` through the real CLI: the export is recorded with its report and hash; mistakes exit cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.export.conftest import train_run


@pytest.mark.slow
def test_cli_export_records_the_verified_artifact(chat_data: Path, tmp_path: Path) -> None:
    train_run(chat_data, tmp_path, "qwen2", "bpe", steps=4)
    run_id = json.loads(run_cli("runs", "list", "--json").stdout)[0]["id"]

    done = run_cli("export", run_id[:6], "--to", "hf", "--out", tmp_path / "exported", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verified: max logit diff" in done.stdout and "template same tokens" in done.stdout

    run = json.loads(run_cli("runs", "show", run_id, "--json").stdout)
    [row] = [a for a in run["artifact_list"] if a["kind"] == "export:hf"]
    assert row["path"] == str(tmp_path / "exported")
    assert len(row["meta"]["sha256"]) == 64 and row["meta"]["report"]["passed"] is True

    again = run_cli("export", run_id, "--to", "hf", "--out", tmp_path / "exported")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_cli_export_refuses_bad_options_before_loading(tmp_path: Path) -> None:
    bad = run_cli("export", "nope", "--to", "gguf", "--quantize", "q3_k", "--out", tmp_path / "x.gguf")
    assert bad.returncode == 2 and "q8_0" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("export", "nope", "--to", "hf", "--out", tmp_path / "x")
    assert missing.returncode == 6 and "Traceback" not in missing.stderr
    for args, says in [
        (("--to", "gguf", "--adapter-only"), "--adapter-only applies to --to ollama"),
        (("--to", "ollama", "--base", "llama3.2"), "add --adapter-only"),
        (("--to", "gguf-adapter", "--quantize", "q4_k_m"), "f32, f16"),
    ]:
        bad = run_cli("export", "nope", *args, "--out", tmp_path / "y")
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
