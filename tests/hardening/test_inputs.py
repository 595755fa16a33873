"""Inputs that used to run away: a YAML alias bomb, a huge record, a stop before training starts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from tests.hardening.conftest import train_config, write_config

from tunelab.config.load import load_config
from tunelab.data.sources import read_records
from tunelab.errors import ConfigError, DataError

_MINIMAL = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}


def _billion_laughs(levels: int = 10) -> str:
    """``method.targets`` holding 9**10 strings once its aliases are expanded, in 700 bytes of YAML."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "model: {path: m}\ndata: {train: t.jsonl}\nmethod:\n  targets: [" + ", ".join(items) + "]\n"


def test_a_billion_laughs_config_is_refused_at_once(tmp_path: Path, cli) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs(), encoding="utf-8")
    result = cli("train", bomb, timeout=60)  # before the fix: ran until killed, past 2 GB
    assert result.returncode == 2, result.stderr
    assert f"{bomb}:1: its aliases (*name) expand it to more than 1,000,000" in result.stderr
    assert "Traceback" not in result.stderr


def test_alias_bombs_cycles_and_deep_nesting_in_overrides_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="expand it to more than"):
        load_config(_MINIMAL, ["method.targets=" + _billion_laughs().split("targets: ", 1)[1].strip()])
    with pytest.raises(ConfigError, match=r"override name: an alias refers to the collection it is inside of"):
        load_config(_MINIMAL, ["name=&a [*a]"])
    with pytest.raises(ConfigError, match="override name: more than 100 aliases"):
        load_config(_MINIMAL, ["name=[&a x, " + ", ".join(["*a"] * 101) + "]"])
    with pytest.raises(ConfigError, match="nests too deeply"):
        load_config(_MINIMAL, ["name=" + "[" * 5000 + "]" * 5000])


def test_a_config_with_a_few_anchors_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "model: {path: m}\ndata: {train: t.jsonl}\nmethod: {targets: &t [q_proj, v_proj]}\n"
        "name: &n run\noutput_dir: *n\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.method.targets == ["q_proj", "v_proj"] and cfg.output_dir == "run"


def _peak_rss_cli(*args: str | Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI in a child that reports its own peak resident memory (bytes) on its last stderr line."""
    probe = (
        "import resource, sys\nfrom tunelab.cli.main import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        "    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *map(str, args)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    peak = int(result.stderr.strip().splitlines()[-1].split()[1])
    return result, peak * (1 if sys.platform == "darwin" else 1024)


def test_validate_with_a_model_refuses_a_50_mb_record_without_ballooning(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "huge.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "q", "completion": "short"}) + "\n")
        fh.write(json.dumps({"prompt": "q", "completion": "the cat sat " * (50 * 2**20 // 12)}) + "\n")
    result, peak = _peak_rss_cli("data", "validate", data, "--model", tiny_model_dir, env={})
    assert result.returncode == 3, result.stderr
    assert f"{data}:2: this record is longer than the limit of 8,388,608 bytes (8 MiB) per record" in result.stderr
    assert "TUNELAB_MAX_RECORD_MB" in result.stderr and "Traceback" not in result.stderr
    # the process with torch + transformers imported sits near 1 GiB; before the fix it peaked at 8.7 GiB
    assert peak < 2 * 2**30, f"peak memory {peak / 2**30:.2f} GiB"


def test_the_record_limit_applies_to_every_format_and_is_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_text = "x" * 3000
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": long_text}) + "\n", encoding="utf-8")
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps([{"text": "ok"}, {"text": long_text}], indent=1), encoding="utf-8")
    multiline = tmp_path / "a.csv"  # a quoted field over many short lines
    multiline.write_text('text\nok\n"' + "x\n" * 1500 + '"\n', encoding="utf-8")
    cases = [(jsonl, 2, "is longer than"), (as_json, 5, "holds about 3,004 bytes"), (multiline, 3, "spans more")]
    for path, line, what in cases:
        with pytest.raises(DataError, match=rf"{path.name}:{line}: this record {what}.* the limit of 2,048 bytes"):
            read_records(path, max_record_bytes=2048)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["ok", long_text]}), parquet)
    with pytest.raises(DataError, match=r"a.parquet:2: this record holds about 3,004 bytes"):
        read_records(parquet, max_record_bytes=2048)

    monkeypatch.setenv("TUNELAB_MAX_RECORD_MB", "0.002")  # the setting training and `data validate` read
    with pytest.raises(DataError, match="the limit of 2,097 bytes"):
        read_records(jsonl)
    monkeypatch.setenv("TUNELAB_MAX_RECORD_MB", "1")
    assert [r.line for r in read_records(jsonl)] == [1, 2]


def test_a_csv_field_longer_than_csv_modules_default_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("prompt,completion\nq," + "y" * 200_000 + "\n", encoding="utf-8")
    (record,) = read_records(path)  # csv's own 131,072-character field limit used to raise csv.Error
    assert len(record.data["completion"]) == 200_000


def _running_runs(home: Path) -> list[str]:
    """Ids of the runs the registry file says are running (read directly: a CLI call takes longer than setup)."""
    if not (home / "tunelab.db").exists():
        return []
    with closing(sqlite3.connect(home / "tunelab.db", timeout=30)) as db:
        try:
            return [row[0] for row in db.execute("SELECT id FROM runs WHERE status = 'running'")]
        except sqlite3.OperationalError:  # the schema is still being created
            return []


def test_sigterm_before_the_first_step_ends_the_run_at_once(
    tmp_path: Path, tunelab_home: Path, tiny_model_dir: Path, chat_file: Path
) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", train_config(tiny_model_dir, chat_file, out, steps=10_000))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not _running_runs(tunelab_home):  # the run is recorded; tokenizer, data and model are still to load
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped before training started; the run is marked cancelled" in err
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists(), "no step ran, so nothing was checkpointed"
    listed = subprocess.run(
        [sys.executable, "-m", "tunelab", "runs", "list", "--json"], capture_output=True, text=True, check=True
    )
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "cancelled" and run["step"] == 0
