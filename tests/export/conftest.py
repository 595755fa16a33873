"""Runs to export: tiny Llama- and Qwen-shaped models, LoRA-trained for a few steps on chat data.

The runs are trained once per session in their own registry home; tests export
them through :func:`tunelab.export.pipeline.export_model` (the CLI test trains
its own run, so that the registry it reads is the test's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.integration.conftest import base_config, chat_data, tiny_model_from

from tunelab.export.gguf_runtime import GGUFRuntime
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
def lora_run(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> tuple[Path, str]:
    """A LoRA run of a tiny Llama (10 steps, chat data with a validation file) in its own home: (home, run id).

    Tests export it through the CLI; each adds its own export artifacts, so none asserts on the full list."""
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("lora-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_HOME", str(root / "home"))
        train_run(chat_data, root, "llama", "bpe", steps=10)
    listed = run_cli("runs", "list", "--json", home=root / "home")
    return root / "home", json.loads(listed.stdout)[0]["id"]


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


@pytest.fixture(scope="session")
def wide(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> ExportSource:
    """A Llama with hidden 256 and intermediate 512 (K-quant rows), fully fine-tuned until it has learned the chats.

    Trained (val perplexity ~3.5 after 20 steps), so perplexity drift means something: a random model's
    near-flat logits make any quantization look harmless or harmful by chance.
    """
    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.hub import load_tokenizer

    root = tmp_path_factory.mktemp("kquant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_HOME", str(root / "home"))
        base = tiny_model_from(
            chat_data, root / "base", arch="llama", tokenizer="bpe", hidden_size=256, num_heads=4, intermediate_size=512
        )
        raw = base_config(base, chat_data, root / "run", steps=20, lr=2e-3)
        raw["method"] = {"name": "full"}
        assert services.start_run(load_config(raw)).status == "completed"
    model = root / "run" / "model"
    return ExportSource(model, None, model, load_tokenizer(model).chat_template)


def perplexity(path: Path, chats: list[tuple[list[int], int]]) -> float:
    """Perplexity of the assistant replies (what training taught; the prompts are random words)."""
    runtime = GGUFRuntime(path)
    nll, count = 0.0, 0
    for ids, start in chats:
        logits = runtime.logits(ids).astype(np.float64)[start - 1 : -1]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(logp)), ids[start:]].sum())
        count += len(logp)
    return float(np.exp(nll / count))


def held_out(source: ExportSource, chat_data: Path) -> list[tuple[list[int], int]]:
    """(token ids of a held-out chat, where its last reply starts), for 12 validation chats."""
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(source.tokenizer_dir)
    out = []
    for line in (chat_data / "valid.jsonl").read_text().splitlines()[:12]:
        messages = json.loads(line)["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        out.append((list(ids), len(prompt)))
    return out


def greedy(path: Path, prompt: list[int], steps: int = 8) -> list[int]:
    runtime = GGUFRuntime(path)
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(runtime.logits(seq)[-1])))
    return seq[len(prompt) :]
