"""`tunelab export … --eval`: the export just written answers the run's held-out examples beside the run itself;
a drop past --max-drop fails the export with exit 8 (kept for inspection, not recorded), as a failed verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

NOVEL = ("tell me a story about the sea", "why is the sky blue at noon", "hello there", "count to ten",
         "what is a colour", "name a fruit", "what is grey?", "is red a fruit?")  # fmt: skip


def _own_home(trained: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    """A copy of the shared registry: exports recorded here stay out of the other tests' export tables."""
    shutil.copytree(trained[0], tmp_path / "home")
    return tmp_path / "home", trained[1]


def _artifacts(home: Path, run_id: str) -> list[dict]:
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    return list(shown["artifact_list"])


def test_export_eval_prints_the_table_and_records_the_export(trained: tuple[Path, str], tmp_path: Path) -> None:
    home, run_id = _own_home(trained, tmp_path)
    out = tmp_path / "m8.gguf"
    done = run_cli("export", run_id, "--to", "gguf", "-q", "q8_0", "--out", out, "--eval", "--max-new-tokens", "8",
                   "--max-drop", "0.2", home=home, env={"COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verified:" in done.stdout and "greedy agreement" in done.stdout, done.stdout
    lines = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 2}
    assert set(lines) == {"reference", "gguf q8_0"}, done.stdout
    assert "100%" in lines["gguf q8_0"], lines["gguf q8_0"]
    recorded = [a for a in _artifacts(home, run_id) if a["path"] == str(out)]
    assert len(recorded) == 1 and recorded[0]["kind"] == "export:gguf"
    rows = {r["target"]: r for r in recorded[0]["meta"]["eval"]["rows"]}
    assert rows["gguf q8_0"]["agreement"] == 1.0 and rows["gguf q8_0"]["scores"]["exact_match"] >= 0.9
    assert rows["gguf q8_0"]["perplexity_ratio"] != 1.0  # 8-bit weights: a real, small change in loss

    as_json = run_cli("export", run_id, "--to", "hf", "--out", tmp_path / "hf", "--eval", "--max-new-tokens", "8",
                      "--json", home=home)  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    table = json.loads(as_json.stdout)["eval"]
    assert [r["target"] for r in table["rows"]] == ["reference", "hf float32"] and table["failures"] == []
    assert table["rows"][1]["agreement"] == 1.0


def test_a_drop_past_max_drop_fails_with_exit_8_and_is_not_recorded(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab import services
    from tunelab.config.load import load_config

    home, first = _own_home(trained, tmp_path)
    # A run barely moved from its random base: long, low-margin answers that 4-bit weights change.
    config = json.loads(run_cli("runs", "show", first, "--json", home=home).stdout)["config"]
    config = {**config, "train": {**config["train"], "steps": 1, "eval_every": 1, "lr": 1e-6, "warmup": 0},
              "output_dir": str(tmp_path / "barely")}  # fmt: skip
    monkeypatch.setenv("TUNELAB_HOME", str(home))  # trained in this process, into the copied registry: a CLI start less
    barely = services.start_run(load_config(config))
    assert barely.status == "completed" and barely.output_dir == tmp_path / "barely", barely
    run_id = barely.run_id
    data = tmp_path / "novel.jsonl"
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "a fruit"}]} for p in NOVEL]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    out = tmp_path / "m4.gguf"
    failed = run_cli("export", run_id, "--to", "gguf", "-q", "q4_0", "--out", out, "--eval", "--data", data,
                     "--max-new-tokens", "24", "--max-drop", "0.5", home=home, env={"COLUMNS": "200"})  # fmt: skip
    assert failed.returncode == 8, failed.stderr[-2000:]
    assert f"error: gguf q4_0 ({out}): greedy answers agree on only" in failed.stderr, failed.stderr
    assert "kept for inspection but not recorded" in failed.stderr and "Traceback" not in failed.stderr
    assert "gguf q4_0" in failed.stdout  # the table is printed before the failure
    assert out.is_file() and not any(a["path"] == str(out) for a in _artifacts(home, run_id))


def test_export_eval_mistakes_are_refused_before_anything_is_written(trained: tuple[Path, str], tmp_path: Path) -> None:
    home, run_id = trained
    out = tmp_path / "never"
    cases = [
        (["--to", "hf", "--max-drop", "0.1"], "--max-drop, --data and --limit go with --eval"),
        (["--to", "coreml", "--eval"], "--eval scores exports loaded by a runtime here"),
        (["--to", "hf", "--eval", "--metrics", "exact_match,accuracy"], "no metric named 'accuracy'"),
        (["--to", "hf", "--eval", "--data", str(tmp_path / "gone.jsonl")], "gone.jsonl does not exist"),
    ]
    for args, says in cases:
        done = run_cli("export", run_id, "--out", out, *args, home=home, env={"COLUMNS": "200"})
        assert done.returncode in (2, 3) and says in done.stderr, (args, done.stderr[-1500:])
        assert "Traceback" not in done.stderr and not out.exists(), args
