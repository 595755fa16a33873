"""Packing vs padding: supervised tokens/s of the same fine-tune on CPU, with and without ``data.packing``.

Run ``python bench/packing_cpu.py`` (``--help`` for the knobs).  One tiny-but-not-trivial
Llama (hidden 256, 4 layers, 8 heads, 8k vocab: ``_common.ModelSpec``) is LoRA-tuned on
generated chat data whose lengths follow a log-normal law like real instruction data (most
examples short, a long tail up to and past ``max_seq_len``), three ways:

* ``packed``: ``data.packing: true``, micro-batches of ``--packed-batch`` rows of up to
  ``max_seq_len`` tokens, attention kept per example;
* ``grouped``: no packing, tunelab's default length-grouped batches of ``--batch`` examples;
* ``random``: no packing, batches drawn at random and padded to their longest (what most
  trainers do by default; ``data.group_by_length: false``).

Each run is a fresh subprocess running tunelab's own loop (``recipe.setup`` + ``recipe.train``);
the variants alternate (packed, grouped, random, packed, …) so a slow patch on a shared machine
hits all of them, and medians over ``--reps`` runs are printed with their spread.  The figure
is supervised tokens per second (tokens that carry loss) over steps after the first
``--warmup`` (which include MLX's graph compilation), computed from the exact batches the loop
drew; real (non-padding) tokens/s and the share of token slots that are real are shown too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import (  # noqa: E402
    SYSTEM_PROMPTS,
    ModelSpec,
    _Writer,
    build_checkpoint,
    make_vocabulary,
    median,
    spread,
    write_jsonl,
)

VARIANTS = ("packed", "grouped", "random")
RESULTS = BENCH_DIR / "results" / "packing_cpu.json"


@dataclass(frozen=True)
class LengthSpec:
    """Log-normal word counts per turn: the median and the log-space sigma (a long right tail)."""

    examples: int = 3000
    seed: int = 0
    user_median: float = 30.0
    assistant_median: float = 60.0
    sigma: float = 1.0
    max_words: int = 1500


def make_rows(spec: LengthSpec) -> list[dict[str, Any]]:
    """Chat records with a system prompt and one user/assistant exchange of skewed lengths."""
    rng = random.Random(spec.seed)
    writer = _Writer(rng, make_vocabulary(rng, 6000))

    def words(median_words: float) -> int:
        return max(1, min(spec.max_words, int(rng.lognormvariate(math.log(median_words), spec.sigma))))

    return [
        {
            "messages": [
                {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                {"role": "user", "content": writer.text(words(spec.user_median))},
                {"role": "assistant", "content": writer.text(words(spec.assistant_median))},
            ]
        }
        for _ in range(spec.examples)
    ]


def prepare(workdir: Path, spec: LengthSpec, model: ModelSpec) -> tuple[Path, Path]:
    """Data and checkpoint under ``workdir``, rebuilt only when the specs change."""
    data, model_dir, stamp = workdir / "data" / "train.jsonl", workdir / "model", workdir / "inputs.json"
    wanted = json.loads(json.dumps({"data": asdict(spec), "model": asdict(model)}))
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return data, model_dir
    rows = make_rows(spec)
    write_jsonl(data, rows)
    build_checkpoint(model_dir, rows, model)
    stamp.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return data, model_dir


def run_config(args: argparse.Namespace, data: Path, model: Path, variant: str, out: Path) -> dict[str, Any]:
    packed = variant == "packed"
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "train": str(data),
            "max_seq_len": args.max_seq_len,
            "packing": packed,
            "group_by_length": variant != "random",
        },
        "method": {"name": "lora", "rank": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "steps": args.steps,
            "batch_size": args.packed_batch if packed else args.batch,
            "lr": 2e-4,
            "scheduler": "constant",
            "warmup": 0,
            "log_every": 1,
        },
        "backend": args.backend,
        "device": "cpu",
        "output_dir": str(out),
        "tensorboard": False,
    }


# --------------------------------------------------------------------------- one run (subprocess)


def worker(config_path: Path, warmup: int) -> dict[str, float]:
    """Train with tunelab's loop, timing every step; return token rates after ``warmup`` steps."""
    from tunelab.config.load import load_config
    from tunelab.data.prepare import length_stats
    from tunelab.train import recipe
    from tunelab.train.callbacks import BaseCallback
    from tunelab.vocab import IGNORE

    cfg = load_config(json.loads(config_path.read_text(encoding="utf-8")))
    stamps: dict[int, float] = {}

    class Clock(BaseCallback):
        def on_start(self, *, step: int, total_steps: int) -> None:
            stamps[0] = time.perf_counter()

        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            stamps.setdefault(step, time.perf_counter())

    output = Path(cfg.output_dir or ".")
    prep = recipe.setup(cfg, output, resume=False, on_data=lambda _data: None)
    result = recipe.train(prep, output, Clock(), lambda: False)
    steps = result.state.step
    batches = [prep.stream.get(c) for c in range(warmup, steps)]  # grad_accum 1: step s drew cursor s-1
    supervised = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(int(b["input_ids"].size) for b in batches)
    seconds = stamps[steps] - stamps[warmup]
    return {
        "supervised_per_s": supervised / seconds,
        "real_per_s": real / seconds,
        "token_efficiency": real / slots,
        "examples_per_step": sum(_examples(b) for b in batches) / len(batches),
        "seconds": seconds,
        **{f"data_{k}": float(v) for k, v in length_stats(prep.data.train).items()},
    }


def _examples(batch: dict[str, Any]) -> int:
    """Examples in a micro-batch: one per row, or the number of segments of each packed row."""
    if "segment_ids" not in batch:
        return len(batch["input_ids"])
    return int(batch["segment_ids"].max(axis=1).sum())


def run_once(args: argparse.Namespace, data: Path, model: Path, variant: str, scratch: Path) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=scratch))
    cfg = out / "config.json"
    cfg.write_text(json.dumps(run_config(args, data, model, variant, out / "run")), encoding="utf-8")
    env = {**os.environ, "TUNELAB_HOME": str(out / "home")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg), "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def report(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    first = next(iter(results.values()))[0]
    print(
        f"\ndata: {first['data_count']:.0f} examples, tokens mean {first['data_mean']:.0f}, p50 "
        f"{first['data_p50']:.0f}, p95 {first['data_p95']:.0f}, max {first['data_max']:.0f} "
        f"({first['data_truncated']:.0f} truncated)"
    )
    header = ("variant", "supervised tok/s", "spread", "real tok/s", "real/slots", "ex/step")
    print(f"{header[0]:<9} {header[1]:>17} {header[2]:>15} {header[3]:>11} {header[4]:>10} {header[5]:>8}")
    for variant, runs in results.items():
        sup = [r["supervised_per_s"] for r in runs]
        row = {
            "supervised_per_s": median(sup),
            "real_per_s": median([r["real_per_s"] for r in runs]),
            "token_efficiency": median([r["token_efficiency"] for r in runs]),
            "examples_per_step": median([r["examples_per_step"] for r in runs]),
        }
        summary[variant] = row
        print(
            f"{variant:<9} {row['supervised_per_s']:>17.0f} {spread(sup):>15} {row['real_per_s']:>11.0f} "
            f"{row['token_efficiency']:>10.1%} {row['examples_per_step']:>8.1f}"
        )
    for base in ("grouped", "random"):
        if "packed" in summary and base in summary:
            ratio = summary["packed"]["supervised_per_s"] / summary[base]["supervised_per_s"]
            summary[f"packed_vs_{base}"] = ratio
            print(f"packed / {base}: {ratio:.2f}x supervised tokens/s")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the rates")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant (medians are reported)")
    parser.add_argument("--batch", type=int, default=8, help="examples per micro-batch when not packing")
    parser.add_argument("--packed-batch", type=int, default=2, help="rows per micro-batch when packing")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=None, help="keep data/model here (reused while specs match)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.warmup)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="packing-bench-"))
    spec, model_spec = LengthSpec(), ModelSpec()
    data, model = prepare(workdir, spec, model_spec)
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for variant in variants:
            results[variant].append(run_once(args, data, model, variant, workdir))
            last = results[variant][-1]
            print(f"rep {rep + 1} {variant:<8} {last['supervised_per_s']:8.0f} supervised tok/s", flush=True)
    summary = report(results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "data": asdict(spec),
        "model": asdict(model_spec),
        "runs": results,
        "summary": summary,
    }
    args.results.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
