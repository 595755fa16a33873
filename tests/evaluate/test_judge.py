"""`tunelab eval RUN --judge URL`: a model behind a real OpenAI-compatible endpoint (tunelab's own `serve` on
127.0.0.1) grades each answer 0-10; an unreachable, keyless or non-grading judge is a clear error that writes
nothing."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tests.api.conftest import start_server, stop_server
from tests.conftest import run_cli
from tests.evaluate.conftest import ANSWER, COLOURS

pytestmark = pytest.mark.slow


def _judge_run(root: Path, home: Path) -> str:
    """A tiny judge trained on the judge's own prompt: '9' when the graded answer is right, '2' when it is not."""
    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.evaluate.judge import prompt
    from tunelab.tiny import make_tiny_checkpoint

    rng = random.Random(0)
    noise = "abcdefghijklmnopqrstuvwxyz?!.,'{}[]()#&*     "
    rows = []
    for i in range(64):
        right = (i // len(COLOURS)) % 2 == 0  # every question both ways: only the graded answer tells the score
        answer = ANSWER if right else "".join(rng.choice(noise) for _ in range(rng.randint(1, 30))).strip() or "x"
        asked = prompt(f"what is {COLOURS[i % len(COLOURS)]}?", ANSWER, answer)
        rows.append({"messages": [{"role": "user", "content": asked},
                                  {"role": "assistant", "content": "9" if right else "2"}]})  # fmt: skip
    (root / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in rows for m in r["messages"]] * 5
    model = make_tiny_checkpoint(root / "judge-model", texts, arch="llama", vocab_size=400, hidden_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0)  # fmt: skip
    config = {"model": {"path": str(model), "dtype": "float32"},
              "data": {"train": str(root / "judge.jsonl"), "max_seq_len": 256}, "method": {"name": "full"},
              "train": {"steps": 300, "batch_size": 8, "lr": 2e-3, "warmup": 2, "seed": 0},
              "output_dir": str(root / "judge-out"), "tensorboard": False}  # fmt: skip
    with pytest.MonkeyPatch.context() as env:  # trained in this process, into the test's registry: a CLI start less
        env.setenv("TUNELAB_HOME", str(home))
        done = services.start_run(load_config(config))
    assert done.status == "completed" and done.output_dir == root / "judge-out", done
    return done.run_id


def _written(home: Path, run_id: str) -> tuple[list[Path], int]:
    """The run's eval files and how many eval artifacts it has: what a failed eval must leave unchanged."""
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    evals = [a for a in shown["artifact_list"] if a["kind"] == "eval"]
    return sorted((Path(shown["output_dir"]) / "eval").glob("*")), len(evals)


def test_a_served_judge_grades_the_run_above_its_base(trained: tuple[Path, str], tmp_path: Path) -> None:
    shared, run_id = trained
    home = tmp_path / "home"
    shutil.copytree(shared, home)  # start_server serves tmp_path / "home": this registry, with the judge in it
    judge = _judge_run(tmp_path, home)
    server, proc = start_server(tmp_path)
    try:
        ask = ("eval", run_id, "--judge", server.url, "--judge-model", f"run:{judge}", "--metrics", "exact_match",
               "--max-new-tokens", "8")  # fmt: skip
        before = _written(home, run_id)
        keyless = run_cli(*ask, home=home, env={"COLUMNS": "200"})
        assert keyless.returncode == 2 and "HTTP 401" in keyless.stderr, keyless.stderr[-1500:]
        assert "TUNELAB_JUDGE_KEY" in keyless.stderr and "Traceback" not in keyless.stderr
        mute = run_cli(*ask[:5], f"run:{run_id}", *ask[6:], home=home, env={"TUNELAB_JUDGE_KEY": server.key})
        assert mute.returncode == 3 and "none of the judge's 8 replies held a score" in mute.stderr, mute.stderr
        assert _written(home, run_id) == before, "a failed eval writes nothing"

        done = run_cli(*ask, "--json", home=home, env={"TUNELAB_JUDGE_KEY": server.key})
        assert done.returncode == 0, done.stderr[-2000:]
        folder = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)["artifacts"]["model"]
        any_model = run_cli("eval", "--model", folder, "--data", shared.parent / "valid.jsonl", *ask[2:], "--json",
                            home=home, env={"TUNELAB_JUDGE_KEY": server.key})  # fmt: skip
        assert any_model.returncode == 0, any_model.stderr[-2000:]
    finally:
        stop_server(proc)
    report = json.loads(done.stdout)
    assert report["metrics"] == ["exact_match", "judge"]
    assert report["scores"]["judge"] >= 0.8 and report["base_scores"]["judge"] <= 0.3, report
    assert json.loads(any_model.stdout)["scores"]["judge"] == report["scores"]["judge"]  # no run needed
    rows = [json.loads(line) for line in Path(report["examples_file"]).read_text(encoding="utf-8").splitlines()]
    assert all(r["judge_reply"].strip() == "9" and r["scores"]["judge"] == 0.9 for r in rows), rows
    assert all("base_judge_reply" in r for r in rows)
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    assert shown["metrics"]["eval/judge"] == report["scores"]["judge"]

    gone = run_cli(*ask, home=home, env={"TUNELAB_JUDGE_KEY": server.key, "COLUMNS": "200"})  # the server stopped
    assert gone.returncode == 2 and "can't be reached" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr
    assert _written(home, run_id)[1] == before[1] + 1  # only the successful eval was recorded
    with_exports = run_cli("eval", run_id, "--exports", "--judge", server.url, home=home)
    assert with_exports.returncode == 2 and "--judge grades answers generated here" in with_exports.stderr
