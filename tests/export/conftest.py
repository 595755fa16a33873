"""Runs to export: tiny Llama- and Qwen-shaped models, LoRA-trained for a few steps on chat data.

The runs are trained once per session in their own registry home; tests export
them through :func:`tunelab.export.pipeline.export_model` (the CLI test trains
its own run, so that the registry it reads is the test's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.conftest import base_config, chat_data, tiny_model_from

from tunelab.export.pipeline import ExportSource

# (arch, tokenizer form): byte-level BPE on Qwen2, SentencePiece on Llama, as those families ship them.
# "llama-sp" is transformers' modern (non-legacy) SentencePiece flavour, "llama-sp-legacy" Llama 2's own,
# the one llama.cpp reproduces.
__all__ = ["chat_data"]  # the session fixture, shared with the integration tests

MODELS = {
    "qwen2-bpe": ("qwen2", "bpe"),
    "llama-sp": ("llama", "sentencepiece"),
    "llama-sp-legacy": ("llama", "sentencepiece-legacy"),
    "llama-bpe": ("llama", "bpe"),
}


def train_run(chat_data: Path, root: Path, arch: str, tokenizer: str, *, steps: int = 10) -> Path:
    """Train a LoRA run on a fresh tiny checkpoint; return its output folder."""
    from tunelab import services
    from tunelab.config.load import load_config

    legacy = tokenizer.endswith("-legacy")
    model = tiny_model_from(
        chat_data,
        root / "base",
        arch=arch,
        tokenizer=tokenizer.removesuffix("-legacy"),
        **({"sp_legacy": True} if legacy else {}),
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    raw = base_config(model, chat_data, root / "run", steps=steps)
    raw["method"]["targets"] = "all-linear"
    outcome = services.start_run(load_config(raw))
    assert outcome.status == "completed"
    return root / "run"


def source_of(run_dir: Path, base: Path) -> ExportSource:
    from tunelab.hub import load_tokenizer

    adapter = run_dir / "adapter"
    return ExportSource(base, adapter, adapter, load_tokenizer(adapter).chat_template)


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> dict[str, ExportSource]:
    """name -> what each trained run gives the exporter."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_HOME", str(tmp_path_factory.mktemp("export-home")))
        for name, (arch, form) in MODELS.items():
            root = tmp_path_factory.mktemp(name)
            out[name] = source_of(train_run(chat_data, root, arch, form), root / "base")
    return out
