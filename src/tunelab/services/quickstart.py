"""`tunelab quickstart`: a whole fine-tune, offline, in about a minute on a laptop CPU.

It uses tunelab exactly as a user would, in two recorded runs:
1. build a tiny Llama-shaped model and a BPE tokenizer from the shipped text, and
   "pretrain" it briefly (``method: full``) so the base knows the words and the
   chat markers, like a small instruct model;
2. fine-tune that base with LoRA on a task it has never seen (turn a request into
   a bulleted shopping list with a count), and show held-out prompts answered by
   the base and by the fine-tuned model side by side.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.load import load_config
from tunelab.config.schema import RunConfig
from tunelab.inference import load_generator
from tunelab.services.runs import start_run
from tunelab.settings import get_settings
from tunelab.tiny import make_tiny_checkpoint


@dataclass(frozen=True)
class QuickstartSample:
    """One held-out prompt answered by the base and by the fine-tuned model."""

    prompt: str
    before: str
    after: str


@dataclass(frozen=True)
class QuickstartResult:
    """What the quickstart did, for the interface to show."""

    root: Path
    base_run: str
    lora_run: str
    loss_first: float
    loss_last: float
    val_loss: float | None
    adapter: Path
    samples: list[QuickstartSample]


def run_quickstart(
    *,
    workdir: Path | None,
    steps: int | None,
    callbacks: Sequence[Any],
    on_stage: Callable[[str], None] = lambda _text: None,
) -> QuickstartResult:
    """Run both stages and answer held-out prompts before and after; ``on_stage`` hears each stage."""
    root = (workdir or get_settings().quickstart_dir).expanduser()
    data = _copy_data(root / "data")
    on_stage(f"working in {root}")
    on_stage("1/3 building a tiny Llama-shaped model and a tokenizer from the shipped text")
    init = root / "base-init"
    shutil.rmtree(init, ignore_errors=True)
    texts = _texts(data)
    make_tiny_checkpoint(
        init,
        texts,
        arch="llama",
        vocab_size=400,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        seed=0,
    )
    on_stage(f"2/3 pretraining the base briefly on {data / 'corpus.jsonl'} (full fine-tune)")
    base_cfg = _preset("base", init, {"train": str(data / "corpus.jsonl")}, root / "runs" / "base", steps)
    base = start_run(base_cfg, callbacks=callbacks)
    assert base.result_dir is not None  # it ran to completion
    on_stage("3/3 fine-tuning it with LoRA on the shopping-list task")
    splits = {"train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl")}
    lora_cfg = _preset("lora", base.result_dir, splits, root / "runs" / "lora", steps)
    tuned = start_run(lora_cfg, callbacks=callbacks)
    assert tuned.result_dir is not None
    curve = _loss_curve(tuned.output_dir / "metrics.jsonl")
    prompts = [json.loads(line)["messages"][0]["content"] for line in (data / "valid.jsonl").open()][:3]
    before = load_generator(model=str(base.result_dir), chat=True)
    after = load_generator(model=str(base.result_dir), adapter=str(tuned.result_dir), chat=True)
    samples = [
        QuickstartSample(p, before.complete(p, max_new_tokens=48), after.complete(p, max_new_tokens=48))
        for p in prompts
    ]
    return QuickstartResult(
        root, base.run_id, tuned.run_id, curve[0], curve[-1], tuned.metrics["val_loss"], tuned.result_dir, samples
    )


def _preset(name: str, model: Path, data: dict[str, str], out: Path, steps: int | None) -> RunConfig:
    """The stage's shipped YAML preset with this machine's paths (and ``steps``, when given) filled in."""
    raw = yaml.safe_load(files("tunelab.assets").joinpath("quickstart", f"{name}.yaml").read_text(encoding="utf-8"))
    raw["model"] = {"path": str(model)}
    raw["data"].update(data)
    raw["output_dir"] = str(_fresh(out))
    if steps:
        raw["train"]["steps"] = steps
    return load_config(raw)


def _copy_data(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "train.jsonl", "valid.jsonl"):
        with as_file(files("tunelab.assets").joinpath("quickstart", name)) as src:
            shutil.copyfile(src, dest / name)
    return dest


def _texts(data: Path) -> list[str]:
    texts = [json.loads(line)["text"] for line in (data / "corpus.jsonl").open(encoding="utf-8")]
    for line in (data / "train.jsonl").open(encoding="utf-8"):
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts


def _fresh(path: Path) -> Path:
    """The quickstart may be run again: its own previous outputs are replaced (never a user's)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def _loss_curve(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.open(encoding="utf-8")]
    return [r["train_loss"] for r in rows if "train_loss" in r]
