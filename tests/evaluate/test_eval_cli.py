"""`tunelab eval`: the run's greedy answers (exactly what `tunelab generate` prints) scored beside its base's."""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.evaluate.conftest import COLOURS, _rows, generate_here

pytestmark = pytest.mark.slow


def test_the_run_beats_its_base_and_answers_as_generate_does(
    trained: tuple[Path, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, run_id = trained
    done = run_cli("eval", run_id, "--max-new-tokens", "8", "--json", home=home)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["examples"] == len(COLOURS) and report["metrics"] == ["exact_match", "contains", "bleu", "rouge_l"]
    assert report["base_scores"]["exact_match"] == 0.0 and report["scores"]["exact_match"] >= 0.9, report

    rows = [json.loads(line) for line in Path(report["examples_file"]).read_text(encoding="utf-8").splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in rows] == [str(i) for i in range(1, len(COLOURS) + 1)]
    assert sum(r["scores"]["exact_match"] for r in rows) / len(rows) == report["scores"]["exact_match"]
    for row in rows[:2]:  # the same greedy text `tunelab generate` prints for that prompt (run in this process)
        prompt = row["prompt"][-1]["content"]
        generated = generate_here(capsys, monkeypatch, home, prompt, "--run", run_id, "--max-new-tokens", "8")
        assert generated == row["prediction"]

    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    assert shown["metrics"]["eval/exact_match"] == report["scores"]["exact_match"]
    assert shown["metrics"]["eval/base/exact_match"] == 0.0
    assert shown["artifacts"]["eval"] == report["examples_file"]


def test_mistakes_are_named_and_leave_no_results(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home, run_id = trained
    (tmp_path / "mine.py").write_text(
        "def boom(prediction, reference, record):\n    raise ValueError('no such column: answer')\n\n"
        "def words(prediction, reference, record):\n    return 'many'\n",
        encoding="utf-8",
    )
    text_data = tmp_path / "plain.jsonl"
    text_data.write_text(json.dumps({"text": "just text"}) + "\n", encoding="utf-8")
    broken = tmp_path / "broken.jsonl"  # a good first line, then one cut off mid-record
    broken.write_text(json.dumps(_rows()[0]) + "\n" + '{"messages": [\n', encoding="utf-8")
    unknown = tmp_path / "quiz.jsonl"
    unknown.write_text(json.dumps({"question": "what is red?", "answer": "a fruit"}) + "\n", encoding="utf-8")
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    before = sorted((Path(shown["output_dir"]) / "eval").glob("*"))
    # `tunelab eval` through the CLI's entry point in this process (nine CLI starts less), mine.py importable as the
    # child's PYTHONPATH made it; an exception that escapes main() counts as a traceback on stderr.
    from tunelab.cli.main import main

    monkeypatch.syspath_prepend(str(tmp_path))
    for var, value in (("TUNELAB_HOME", str(home)), ("COLUMNS", "200"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "1")):  # fmt: skip
        monkeypatch.setenv(var, value)  # main() setdefault()s the last three

    def evaluate(*args: str) -> tuple[int | str | None, str]:
        capsys.readouterr()
        crash = ""
        try:
            main(["eval", run_id, "--max-new-tokens", "4", *args])
            code: int | str | None = 0
        except SystemExit as exc:
            code = exc.code
        except Exception:
            code, crash = "crashed", traceback.format_exc()
        return code, capsys.readouterr().err + crash

    cases = [
        (["--data", str(broken)], 3, "broken.jsonl:2: not valid JSON"),
        (["--data", str(unknown)], 3, "quiz.jsonl:1: can't tell the format from the keys ['answer', 'question']"),
        (["--metrics", "exact_match,accuracy"], 2, "no metric named 'accuracy'"),
        (["--metrics", "nowhere:score"], 2, "could not import 'nowhere'"),
        (["--metrics", "mine:missing"], 2, "mine has no function 'missing'"),
        (["--data", str(tmp_path / "gone.jsonl")], 3, "gone.jsonl does not exist"),
        (["--data", str(text_data)], 3, "text examples have no reference answer"),
        (["--metrics", "mine:boom", "--no-base"], 3, "metric mine:boom raised ValueError: no such column: answer"),
        (["--metrics", "mine:words", "--no-base"], 3, "metric mine:words returned 'many' for example 1, not a number"),
    ]
    try:
        for args, code, says in cases:
            exit_code, stderr = evaluate(*args)
            assert exit_code == code and says in stderr, (args, exit_code, stderr[-1500:])
            assert "Traceback" not in stderr, stderr
    finally:
        sys.modules.pop("mine", None)
    assert sorted((Path(shown["output_dir"]) / "eval").glob("*")) == before, "a failed eval writes nothing"
    monkeypatch.delenv("TUNELAB_DB_URL", raising=False)  # read back in this process too
    from tunelab import services
    from tunelab.registry.db import close_registries

    close_registries()
    after = services.show_run(run_id).to_dict()
    close_registries()
    assert (after["metrics"], after["artifact_list"]) == (shown["metrics"], shown["artifact_list"]), "nor records"


def test_perplexity_is_exp_of_the_trainers_validation_loss(trained: tuple[Path, str]) -> None:
    home, run_id = trained
    done = run_cli("eval", run_id, "--metrics", "perplexity,token_loss", "--json", home=home)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout)["scores"]
    val_loss = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)["metrics"]["val_loss"]
    # Reloaded by transformers in float32, one example at a time: an independent path to the trainer's number.
    assert scores["token_loss"] == pytest.approx(val_loss, rel=1e-4, abs=1e-6)
    assert scores["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-4)
    assert json.loads(done.stdout)["base_scores"]["perplexity"] > 10 * scores["perplexity"]


def test_any_model_folder_can_be_scored_without_a_run(trained: tuple[Path, str]) -> None:
    home, run_id = trained
    shown = json.loads(run_cli("runs", "show", run_id, "--json", home=home).stdout)
    valid = home.parent / "valid.jsonl"
    done = run_cli("eval", "--model", shown["artifacts"]["model"], "--data", valid, "--metrics", "exact_match",
                   "--max-new-tokens", "8", "--json", home=home)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["scores"]["exact_match"] >= 0.9 and report["base_scores"] is None
    assert Path(report["examples_file"]).parent == home / "evals"
    bare = run_cli("eval", home=home)
    assert bare.returncode == 2 and "--model PATH" in bare.stderr and "Traceback" not in bare.stderr
