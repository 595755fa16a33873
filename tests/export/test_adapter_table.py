"""The export regression table's adapter-only rows: a LoRA run's gguf-adapter and mlx-adapter exports answer its
held-out chats over the run's base (llama.cpp with ``lora_path`` on a GGUF of the base; mlx-lm with
``adapter_path``), beside the run itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_adapter_exports_get_their_rows_in_the_table(lora_run: tuple[Path, str], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("mlx_lm")
    home, run_id = lora_run
    for target, out, extra in (("gguf-adapter", "adapter.gguf", ("--quantize", "f32")), ("mlx-adapter", "mlx", ())):
        written = run_cli("export", run_id, "--to", target, "--out", tmp_path / out, *extra, home=home, timeout=600)
        assert written.returncode == 0, written.stderr[-2000:]

    done = run_cli("eval", run_id, "--exports", "--limit", "6", "--max-new-tokens", "8", "--json", home=home,
                   timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["target"]: row for row in json.loads(done.stdout)["rows"]}
    assert {"reference", "gguf-adapter float32", "mlx-adapter float32"} <= set(rows), set(rows)
    assert rows["gguf-adapter float32"]["path"] == str(tmp_path / "adapter.gguf")
    for name in ("gguf-adapter float32", "mlx-adapter float32"):
        print(name, {k: rows[name][k] for k in ("agreement", "perplexity_ratio", "scores")})
        # The adapter applied by each runtime over the run's base answers as the run does.
        assert rows[name]["agreement"] >= 5 / 6, rows[name]
        assert rows[name]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3), rows[name]
    assert not list(tmp_path.glob(".tunelab-base-*"))  # the base GGUF staged for llama.cpp is gone

    table = run_cli("export", run_id, "--to", "mlx-adapter", "--out", tmp_path / "again", "--eval", "--limit", "4",
                    "--max-new-tokens", "8", "--max-drop", "0.3", "--json", home=home, timeout=600)  # fmt: skip
    assert table.returncode == 0, table.stderr[-2000:]
    assert [r["target"] for r in json.loads(table.stdout)["eval"]["rows"]] == ["reference", "mlx-adapter float32"]
