"""Shared helpers for the benchmarks: a seeded chat SFT set, a tiny checkpoint and timing maths.

The benchmarks must not depend on a model hub or a downloaded dataset, so the
data is generated here.  It is synthetic but shaped like real chat SFT data:
a system prompt, one or two user/assistant exchanges, prompt and answer
lengths that vary by more than an order of magnitude (so padding and masking
matter as they do on real data), and a Zipf-distributed vocabulary large
enough for the BPE tokenizer to learn a realistic ~8k-token vocabulary.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Function words and common English words: real text is dominated by these.
_COMMON_TEXT = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or "
    "had by not word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father "
    "model data train loss token learn answer question explain example result value function system"
)
COMMON_WORDS: tuple[str, ...] = tuple(_COMMON_TEXT.split())
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and precisely.",
    "You are an expert tutor who explains things step by step.",
    "You are a friendly support agent for a software company.",
    "You answer questions about cooking, travel and everyday life.",
    "You are a careful assistant; say so when you are not sure.",
)
_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
    "ch",
)
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck")


@dataclass(frozen=True)
class DataSpec:
    """What to generate; the same spec and seed always give byte-identical files."""

    examples: int = 2000
    seed: int = 0
    user_words: tuple[int, int] = (10, 200)
    assistant_words: tuple[int, int] = (5, 150)
    two_turn_fraction: float = 0.25
    synthetic_words: int = 6000


def make_vocabulary(rng: random.Random, count: int) -> list[str]:
    """Common English words followed by ``count`` pronounceable made-up words (distinct)."""
    words = list(dict.fromkeys(COMMON_WORDS))
    seen = set(words)
    while len(words) < len(COMMON_WORDS) + count:
        syllables = rng.choice((1, 2, 2, 3, 3, 4))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class _Writer:
    """Draws Zipf-distributed words and strings them into sentences."""

    def __init__(self, rng: random.Random, vocabulary: Sequence[str]) -> None:
        self.rng = rng
        self.vocabulary = list(vocabulary)
        # Zipf-Mandelbrot (q=2.7, s=1.1), the classic fit to English word frequencies: a few
        # words are very common, a long tail is rare.
        self.weights = [1.0 / ((rank + 2.7) ** 1.1) for rank in range(1, len(self.vocabulary) + 1)]

    def text(self, n_words: int) -> str:
        words = self.rng.choices(self.vocabulary, weights=self.weights, k=n_words)
        sentences: list[str] = []
        i = 0
        while i < len(words):
            size = self.rng.randint(5, 16)
            chunk = words[i : i + size]
            i += size
            if len(chunk) > 6 and self.rng.random() < 0.3:
                chunk[len(chunk) // 2] += ","
            end = self.rng.choice((".", ".", ".", "?", "!")) if self.rng.random() < 0.9 else ":"
            sentences.append(" ".join(chunk).capitalize() + end)
        return " ".join(sentences)


def _length(rng: random.Random, bounds: tuple[int, int], skew: float) -> int:
    """A length in ``bounds`` skewed towards short ones (most prompts are short, a few are long)."""
    low, high = bounds
    return low + int((high - low) * rng.random() ** skew)


def make_conversations(spec: DataSpec) -> list[dict[str, Any]]:
    """``spec.examples`` chat records ``{"messages": [...]}``: system, then 1-2 user/assistant turns."""
    rng = random.Random(spec.seed)
    writer = _Writer(rng, make_vocabulary(rng, spec.synthetic_words))
    rows = []
    for _ in range(spec.examples):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
        for _turn in range(2 if rng.random() < spec.two_turn_fraction else 1):
            messages.append({"role": "user", "content": writer.text(_length(rng, spec.user_words, 1.6))})
            messages.append({"role": "assistant", "content": writer.text(_length(rng, spec.assistant_words, 1.3))})
        rows.append({"messages": messages})
    return rows


@dataclass(frozen=True)
class CompletionSpec:
    """Short prompt/completion pairs (the small-model regime: many short steps)."""

    examples: int = 512
    seed: int = 0
    prompt_words: tuple[int, int] = (4, 8)
    completion_words: tuple[int, int] = (1, 4)
    synthetic_words: int = 600


def make_completions(spec: CompletionSpec) -> list[dict[str, Any]]:
    """``spec.examples`` records ``{"prompt", "completion"}``, a few words each (about 14 tokens together)."""
    rng = random.Random(spec.seed)
    words = make_vocabulary(rng, spec.synthetic_words)
    weights = [1.0 / ((rank + 2.7) ** 1.1) for rank in range(1, len(words) + 1)]  # Zipf, as in _Writer
    rows = []
    for _ in range(spec.examples):
        prompt = rng.choices(words, weights=weights, k=rng.randint(*spec.prompt_words))
        answer = rng.choices(words, weights=weights, k=rng.randint(*spec.completion_words))
        rows.append({"prompt": " ".join(prompt).capitalize() + ":", "completion": " " + " ".join(answer) + "."})
    return rows


def record_texts(row: dict[str, Any]) -> list[str]:
    """The texts of a chat or prompt/completion record (what a tokenizer is trained on)."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    return [row["prompt"], row["completion"]]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class ModelSpec:
    """The tiny Llama-shaped model both stacks fine-tune."""

    vocab_size: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 688


def build_checkpoint(out: Path, rows: Sequence[dict[str, Any]], spec: ModelSpec) -> Path:
    """Train a BPE tokenizer (ChatML template) on the record texts and save a random-init Llama.

    The tokenizer learns from the very texts it will encode, like a real
    tokenizer on in-domain text, so token counts per word are realistic.
    Chat records give their message contents; prompt/completion records both fields.
    """
    from tunelab.tiny import make_tiny_checkpoint

    texts = [text for row in rows for text in record_texts(row)]
    return make_tiny_checkpoint(
        out,
        texts,
        arch="llama",
        tokenizer="bpe",
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        seed=0,
    )


def prepare_inputs(workdir: Path, data: DataSpec, model: ModelSpec) -> tuple[Path, Path]:
    """Write ``data/train.jsonl`` and ``model/`` under ``workdir``; reuse them when the specs match.

    Reuse keeps repeated invocations with ``--workdir`` quick; the stamp file
    holds the specs, so changing a size flag rebuilds instead of silently
    benchmarking a stale model.
    """
    data_dir, model_dir, stamp = workdir / "data", workdir / "model", workdir / "inputs.json"
    wanted = {"data": asdict(data), "model": asdict(model)}
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as they come back from the file
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return data_dir / "train.jsonl", model_dir
    rows = make_conversations(data)
    write_jsonl(data_dir / "train.jsonl", rows)
    build_checkpoint(model_dir, rows, model)
    stamp.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return data_dir / "train.jsonl", model_dir


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min-max`` of a sample, so a reader sees how noisy a median is."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"
