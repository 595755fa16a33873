"""A newcomer's first hour through the real CLI: train, find the run at 80 columns, chat with it (issue 22).

One run is trained for the module (a few seconds on the tiny model); every test reads it through
``tunelab`` subprocesses, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tests.conftest import cli_env, run_cli
from tests.integration.conftest import base_config
from tests.integration.runs import only_run_id

pytestmark = pytest.mark.slow

SYSTEM = "You write lists."
PROMPT = "List: tea, rice"


@dataclass(frozen=True)
class Trained:
    home: Path
    run_id: str
    stdout: str


@pytest.fixture(scope="module")
def trained(e2e_model: Path, chat_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("first-hour")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(e2e_model, chat_data, tmp / "out", steps=40, eval_every=20)))
    result = run_cli("train", cfg, home=tmp / "home")
    assert result.returncode == 0, result.stderr
    return Trained(tmp / "home", only_run_id(tmp / "home"), result.stdout)


def test_train_prints_the_run_id_first_and_names_the_loss(trained: Trained) -> None:
    lines = trained.stdout.strip().splitlines()
    assert trained.run_id in lines[0] and f"tunelab runs show {trained.run_id}" in lines[0]
    assert f"run {trained.run_id} completed (val loss " in trained.stdout


def test_runs_list_fits_80_columns_with_whole_ids(trained: Trained) -> None:
    listed = run_cli("runs", "list", home=trained.home, env={"COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), listed.stdout
    assert "…" not in listed.stdout
    row = next(line for line in lines if trained.run_id in line)
    assert "completed" in row and "40/40" in row and "lora" in row
    assert "unique prefix" in listed.stdout
    shown = run_cli("runs", "show", trained.run_id[:4], home=trained.home)
    assert shown.returncode == 0 and trained.run_id in shown.stdout


def _chat(trained: Trained, text: str, *args: str) -> tuple[list[str], str]:
    """``tunelab chat`` with ``text`` piped in: the answers, and the whole transcript."""
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", trained.run_id[:5], "--max-new-tokens", "16", *args],
        input=text,
        env=cli_env(trained.home, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    answers = [chunk.split("\nyou> ")[0].strip() for chunk in result.stdout.split("model> ")[1:]]
    return answers, result.stdout


def _generate(trained: Trained, *args: str) -> str:
    result = run_cli("generate", "--run", trained.run_id, *args, "--max-new-tokens", "16", home=trained.home)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_chat_keeps_history_and_obeys_system_reset_and_exit(trained: Trained) -> None:
    script = f"{PROMPT}\n/system {SYSTEM}\n{PROMPT}\n/reset\n{PROMPT}\n/exit\n{PROMPT}\n"
    answers, transcript = _chat(trained, script)
    assert len(answers) == 3  # nothing after /exit
    assert f"chatting with run {trained.run_id}" in transcript
    assert answers[0] == _generate(trained, PROMPT) != ""  # the run's template and stop tokens, as generate's
    assert "history cleared (2 exchanges forgotten)" in transcript  # both turns were kept until /reset
    # after /reset only the system prompt is left, so the answer is generate --system's
    with_system = _generate(trained, "--system", SYSTEM, PROMPT)  # greedy: one call serves both checks
    assert answers[2] == with_system
    answers, _ = _chat(trained, PROMPT + "\n", "--system", SYSTEM)  # end of input ends the chat too
    assert answers == [with_system]


def test_chat_renders_history_and_system_through_the_runs_template(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the model is given for the next answer: the system prompt and every earlier turn, in its template."""
    from tunelab import services

    monkeypatch.setenv("TUNELAB_HOME", str(trained.home))
    session = services.open_chat(run=trained.run_id, system=SYSTEM)
    first = "".join(session.send(PROMPT, services.Sampling(max_tokens=8)))
    rendered = session.generator.tokenizer.decode(session.generator.conversation_ids(session.messages("List: milk")))
    assert rendered.index(SYSTEM) < rendered.index(PROMPT) < rendered.index(first.strip()) < rendered.index("milk")
    assert rendered.count("<|im_start|>assistant") == 2  # the earlier answer, and the one to come


def test_chat_and_generate_refuse_what_they_cannot_do(trained: Trained) -> None:
    both = run_cli("chat", trained.run_id, "--model", "x", home=trained.home)
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
    no_template = run_cli(
        "generate", "--run", trained.run_id, "--no-chat", "--system", SYSTEM, PROMPT, home=trained.home
    )
    assert no_template.returncode == 2 and "no system prompt" in no_template.stderr
