"""Offline, a hub id fails at once with a message that names the way out (issue 22 item 15).

This machine can't reach huggingface.co, so a real download attempt fails; before the fix it took
~25 s of name-lookup retries.  The time bound below is a generous liveness check, not a benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import yaml

Cli = Callable[..., CompletedProcess]
MISSING = "tunelab-tests/no-such-model-4c1e"  # never cached, never published


def _offline_here() -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


needs_no_network = pytest.mark.skipif(not _offline_here(), reason="huggingface.co is reachable from here")


@needs_no_network
@pytest.mark.parametrize("command", ["generate", "estimate", "validate"])
def test_a_hub_id_fails_fast_without_network(cli: Cli, tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": MISSING}, "data": {"train": str(tmp_path)}}), encoding="utf-8")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n', encoding="utf-8")
    args = {
        "generate": ("generate", "--model", MISSING, "hi"),
        "estimate": ("estimate", cfg),
        "validate": ("data", "validate", data, "--model", MISSING),
    }[command]
    start = time.monotonic()
    result = cli(*args, env={"HF_HUB_OFFLINE": "0"})
    assert time.monotonic() - start < 15  # liveness: the retries took ~25 s before
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    assert "can't be reached" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr


def test_offline_mode_says_nothing_is_downloaded(cli: Cli) -> None:
    result = cli("generate", "--model", MISSING, "hi", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 4 and "HF_HUB_OFFLINE is set" in result.stderr, result.stderr


@needs_no_network
def test_a_hub_dataset_name_fails_fast_without_network(cli: Cli) -> None:
    start = time.monotonic()
    result = cli("data", "validate", "someone/no-such-dataset", env={"HF_HUB_OFFLINE": "0"})
    assert time.monotonic() - start < 15  # datasets' own retries took ~25 s (found by tunelab eval --data)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "can't be reached from here" in result.stderr and "local cache" in result.stderr
