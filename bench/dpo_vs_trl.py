"""DPO on CPU: tunelab beside TRL's DPOTrainer (the reference implementation), same model, pairs and batches.

Run ``python bench/dpo_vs_trl.py`` (``--help`` for the knobs).  Both stacks DPO-train LoRA r8 on all
linears of the same tiny Llama (random init, BPE tokenizer trained on the data) on the same
synthetic preference pairs: short prompts, a chosen and a rejected completion of a few words.

* Loss curve: one run of each for ``--curve-steps`` steps, batches in file order, no dropout, the
  same initial adapter (tunelab's ``lora_A`` draw, ``lora_B`` = 0): the per-step losses must agree
  within 1e-3.  The token ids each stack trained on are compared first (TRL tokenizes prompt +
  completion together and splits at the common prefix; tunelab tokenizes the pieces).
* Speed: whole processes (``python -m tunelab train`` against ``bench/_trl_dpo.py``), launch to
  exit, ``--reps`` times alternating; medians and the TRL/tunelab wall-time ratio are printed.

Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import CompletionSpec, ModelSpec, build_checkpoint, make_completions, median, read_jsonl, spread  # noqa: E402
from cpu_vs_trainer import _timed, versions  # noqa: E402

TRL_SCRIPT = BENCH_DIR / "_trl_dpo.py"
RESULTS = BENCH_DIR / "results" / "dpo_vs_trl.json"
MODELS = {
    "tiny": ModelSpec(
        vocab_size=2000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172
    ),
    "small": ModelSpec(vocab_size=2000),  # hidden 256, 4 layers
}


@dataclass(frozen=True)
class Knobs:
    """What both stacks are told to do."""

    batch_size: int = 8
    lr: float = 1e-3
    beta: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


def make_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """``{prompt, chosen, rejected}``: a prompt of a few words, two different completions of a few words."""
    rows = make_completions(CompletionSpec(examples=2 * count, seed=seed))
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        first, second = rows[2 * i], rows[2 * i + 1]
        if first["completion"] == second["completion"]:
            second = {**second, "completion": second["completion"].rstrip(".") + " again."}
        chosen, rejected = (first, second) if rng.random() < 0.5 else (second, first)
        pairs.append({"prompt": first["prompt"], "chosen": chosen["completion"], "rejected": rejected["completion"]})
    return pairs


def tunelab_config(model: Path, train: Path, out: Path, k: Knobs, steps: int) -> dict[str, Any]:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(train), "max_seq_len": 512, "shuffle": False, "group_by_length": False},
        "method": {"name": "lora", "rank": k.rank, "alpha": k.alpha, "dropout": 0.0},
        "objective": {"name": "dpo", "beta": k.beta},
        "train": {"steps": steps, "batch_size": k.batch_size, "lr": k.lr, "scheduler": "constant", "seed": k.seed},
        "backend": "torch",
        "device": "cpu",
        "output_dir": str(out),
        "tensorboard": False,
    }


def run_tunelab(run_dir: Path, model: Path, train: Path, k: Knobs, steps: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True)
    cfg = run_dir / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tunelab_config(model, train, run_dir / "out", k, steps)), encoding="utf-8")
    timing = _timed([sys.executable, "-m", "tunelab", "train", str(cfg)], run_dir)
    losses = [r["train_loss"] for r in read_jsonl(run_dir / "out" / "metrics.jsonl") if "train_loss" in r]
    return {"wall_s": timing.wall_s, "cpu_s": timing.cpu_s, "others": timing.others, "losses": losses}


def run_trl(run_dir: Path, model: Path, train: Path, k: Knobs, steps: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    cmd = [
        sys.executable, str(TRL_SCRIPT), "--model", str(model), "--train", str(train), "--out", str(run_dir / "out"),
        "--steps", str(steps), "--batch-size", str(k.batch_size), "--lr", str(k.lr), "--beta", str(k.beta),
        "--rank", str(k.rank), "--alpha", str(k.alpha), "--seed", str(k.seed), "--result", str(result),
    ]  # fmt: skip
    timing = _timed(cmd, run_dir)
    r = json.loads(result.read_text(encoding="utf-8"))
    return {"wall_s": timing.wall_s, "cpu_s": timing.cpu_s, "others": timing.others, **r}


def tunelab_pairs(model: Path, train: Path, count: int) -> list[list[list[int]]]:
    """The token ids tunelab trains the first ``count`` pairs on (chosen, rejected)."""
    from tunelab.config.schema import DataCfg
    from tunelab.data.prepare import prepare_data
    from tunelab.hub import load_tokenizer

    split = prepare_data(DataCfg(train=str(train), max_seq_len=512, cache=False), load_tokenizer(model)).train
    return [[split.input_ids[2 * i].tolist(), split.input_ids[2 * i + 1].tolist()] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="steps of each timed run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    k = Knobs(batch_size=args.batch_size)
    work = args.work or Path(tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.pairs, k.seed)
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    texts = [{"prompt": p["prompt"], "completion": p["chosen"] + p["rejected"]} for p in pairs]
    model = build_checkpoint(work / "model", texts, MODELS[args.model])

    ours = run_tunelab(work / "curve-tunelab", model, train, k, args.curve_steps)
    theirs = run_trl(work / "curve-trl", model, train, k, args.curve_steps)
    used = args.curve_steps * k.batch_size
    same_ids = tunelab_pairs(model, train, used) == theirs["pairs"][:used]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)]
    print(f"token ids of the {used} pairs trained on: {'identical' if same_ids else 'DIFFERENT'}")
    print(f"loss curve over {args.curve_steps} steps: max |tunelab - TRL| = {max(diffs):.2e} (target <= 1e-3)")
    for step in (0, len(diffs) // 2, len(diffs) - 1):
        print(f"  step {step + 1:3d}: tunelab {ours['losses'][step]:.6f}  TRL {theirs['losses'][step]:.6f}")

    runs: dict[str, list[dict[str, Any]]] = {"tunelab": [], "trl": []}
    for rep in range(args.reps):  # alternate, so drift on a shared machine hits both
        runs["tunelab"].append(run_tunelab(work / f"tunelab-{rep}", model, train, k, args.steps))
        runs["trl"].append(run_trl(work / f"trl-{rep}", model, train, k, args.steps))
    walls = {stack: [r["wall_s"] for r in rs] for stack, rs in runs.items()}
    ratio = median(walls["trl"]) / median(walls["tunelab"])
    paired = median([t / u for t, u in zip(walls["trl"], walls["tunelab"], strict=True)])
    others = [r["others"] for rs in runs.values() for r in rs if r["others"] is not None]
    print(f"whole process, {args.steps} steps of {k.batch_size} pairs, model {args.model}, {args.reps} reps:")
    for stack, w in walls.items():
        print(f"  {stack:8s} wall {median(w):6.2f} s (range {spread(w)})")
    print(f"  speed ratio TRL/tunelab: {ratio:.2f}x (paired median {paired:.2f}x; target >= 1.3x)")
    print(f"  other processes used up to {max(others) if others else float('nan'):.2f} cores meanwhile")
    summary = {
        "knobs": asdict(k),
        "model": args.model,
        "pairs": args.pairs,
        "curve_steps": args.curve_steps,
        "same_token_ids": same_ids,
        "curve_max_abs_diff": max(diffs),
        "curve": {"tunelab": ours["losses"], "trl": theirs["losses"]},
        "steps": args.steps,
        "wall_s": {stack: median(w) for stack, w in walls.items()},
        "wall_all": walls,
        "speed_ratio": ratio,
        "speed_ratio_paired": paired,
        "versions": versions(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
