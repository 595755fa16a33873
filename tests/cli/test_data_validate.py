"""`tunelab data validate` reports every bad record in one pass, grouped by kind, with lines (issue 22 item 20)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

Cli = Callable[..., CompletedProcess]


def _chat(*turns: tuple[object, object]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


def test_every_bad_record_is_reported_at_once_by_kind(cli: Cli, tmp_path: Path) -> None:
    good = _chat(("user", "hi"), ("assistant", "hello"))
    lines = [
        good,
        _chat(("bot", "hi"), ("assistant", "hello")),  # 2: unknown role
        _chat(("user", "hi")),  # 3: nothing to learn
        _chat(("user", 3), ("assistant", "x")),  # 4: content not a string
        _chat(("user", "a"), ("bot", "x")),  # 5: unknown role again, at another index
        good,
        _chat(("user", "q")),  # 7: nothing to learn
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli("data", "validate", data, env={"COLUMNS": "300"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    err = result.stderr
    assert "5 bad records:" in err
    assert f"role 'bot' is not one of system, user, assistant, tool (2): {data}: lines 2, 5" in err
    assert f"nothing to learn (2): {data}: lines 3, 7" in err
    assert f"content must be a string (1): {data}: line 4" in err


def test_a_clean_file_still_gets_its_report(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_chat(("user", "hi"), ("assistant", "hello")) + "\n", encoding="utf-8")
    result = cli("data", "validate", data, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["splits"]["train"]["records"] == 1


def test_broken_json_and_bad_bytes_are_listed_with_the_record_problems(cli: Cli, tmp_path: Path) -> None:
    good = _chat(("user", "hi"), ("assistant", "hello")).encode()
    lines = [
        b'{"messages": [',  # 1: a line cut short
        good,
        b"caf\xe9 " + good,  # 3: Latin-1 bytes
        _chat(("user", "q")).encode(),  # 4: nothing to learn
        b"[1, 2]",  # 5: JSON, but not an object
        b'{"messages": oops}',  # 6: not JSON
        good,
    ]
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    result = cli("data", "validate", data, env={"COLUMNS": "300"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    err = result.stderr
    assert "5 bad records:" in err
    assert f"not valid JSON (Expecting value) (2): {data}: lines 1, 6" in err
    assert f"{data}: line 3" in err and "not UTF-8" in err
    assert f"nothing to learn (1): {data}: line 4" in err
    assert f"each line must be a JSON object, got list (1): {data}: line 5" in err


def test_a_file_of_only_broken_lines_lists_them_all(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("not json\nnor this\n", encoding="utf-8")
    result = cli("data", "validate", data, env={"COLUMNS": "300"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert (
        "2 bad records:" in result.stderr
        and f"not valid JSON (Expecting value) (2): {data}: lines 1, 2" in result.stderr
    )
