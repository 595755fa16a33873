"""DPO: tunelab beside TRL's DPOTrainer (the reference implementation), same model, pairs and batches; CPU or one GPU.

Run ``python bench/dpo_vs_trl.py`` (``--help`` for the knobs).  Both stacks DPO-train LoRA r8 on all
linears of the same tiny Llama (random init, BPE tokenizer trained on the data) on the same
synthetic preference pairs: short prompts, a chosen and a rejected completion of a few words.

* Loss curve: one run of each for ``--curve-steps`` steps, batches in file order, no dropout, the
  same initial adapter (tunelab's ``lora_A`` draw, ``lora_B`` = 0): the per-step losses must agree
  within 1e-3.  The token ids each stack trained on are compared first (TRL tokenizes prompt +
  completion together and splits at the common prefix; tunelab tokenizes the pieces).
* Speed: whole processes (``python -m tunelab train`` against ``bench/_trl_dpo.py``), launch to
  exit, ``--reps`` times alternating; medians and the TRL/tunelab wall-time ratio are printed.

GPU mode (``--device cuda --model llama8b|llama1b``): speed and memory on one NVIDIA GPU, one run of each
stack by default.  The checkpoint is ``vs_unsloth.py``'s (random bf16 weights in Llama-3.1-8B's or
Llama-3.2-1B's shape, a 2,000-token BPE tokenizer, built once under ``--model-root``, ``/dev/shm`` by
default); the pairs are ``--prompt-tokens`` / ``--completion-tokens`` long (each within ±``--jitter``);
both stacks train LoRA r16/α32 on the seven linears, bf16, gradient checkpointing on, batch
``--batch-size`` pairs, the same lr and β, for ``--steps`` steps.  Reported per stack: wall time (launch
to exit), the steady-state step time and tokens/s (steps after ``--warm``), and peak CUDA memory
(``torch.cuda.max_memory_allocated`` over the whole process: tunelab's ``peak_memory_gb``, TRL's from
``_trl_dpo.py``); then the TRL/tunelab ratios.  Written to ``results/dpo_vs_trl_gpu.json`` (and
``$OUT/`` when set).  ``--device cuda --tiny`` runs the same code on the CPU with ``vs_unsloth.py``'s
tiny shape in fp32, to check the plumbing without a GPU.

Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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


def tunelab_pairs(model: Path, train: Path, count: int, max_seq_len: int = 512) -> list[list[list[int]]]:
    """The token ids tunelab trains the first ``count`` pairs on (chosen, rejected)."""
    from tunelab.config.schema import DataCfg
    from tunelab.data.prepare import prepare_data
    from tunelab.hub import load_tokenizer

    split = prepare_data(DataCfg(train=str(train), max_seq_len=max_seq_len, cache=False), load_tokenizer(model)).train
    return [[split.input_ids[2 * i].tolist(), split.input_ids[2 * i + 1].tolist()] for i in range(count)]


# --------------------------------------------------------------------------- GPU mode


@dataclass(frozen=True)
class GpuKnobs:
    """What both stacks are told to do in GPU mode."""

    batch_size: int = 2
    lr: float = 1e-4
    beta: float = 0.1
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    prompt_tokens: int = 256
    completion_tokens: int = 256
    jitter: float = 0.2


GPU_RESULTS = BENCH_DIR / "results" / "dpo_vs_trl_gpu.json"


def make_long_pairs(tokenizer: Any, count: int, k: GpuKnobs) -> list[dict[str, str]]:
    """``{prompt, chosen, rejected}`` of about ``k.prompt_tokens`` / ``k.completion_tokens`` tokens (± jitter).

    The words are ``vs_unsloth.py``'s made-up syllables, the text its tokenizer was trained on; a piece's
    word count comes from the tokenizer's measured tokens per word, so lengths are near, not exactly, the target.
    """
    from vs_unsloth import _words

    rng = random.Random(k.seed)
    sample = _words(random.Random(k.seed + 1), 2000)
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000

    def piece(tokens: int) -> str:
        target = tokens * rng.uniform(1 - k.jitter, 1 + k.jitter)
        return _words(rng, max(1, round(target / per_word)))

    return [
        {
            "prompt": piece(k.prompt_tokens).capitalize() + ":",
            "chosen": " " + piece(k.completion_tokens) + ".",
            "rejected": " " + piece(k.completion_tokens) + ".",
        }
        for _ in range(count)
    ]


def gpu_tunelab_config(
    model: Path, train: Path, out: Path, k: GpuKnobs, steps: int, max_seq_len: int, device: str, dtype: str
) -> dict[str, Any]:
    from vs_unsloth import TARGETS

    return {
        "model": {"path": str(model), "dtype": dtype},
        "data": {"train": str(train), "max_seq_len": max_seq_len, "shuffle": False, "group_by_length": False},
        "method": {"name": "lora", "rank": k.rank, "alpha": k.alpha, "dropout": 0.0, "targets": TARGETS},
        "objective": {"name": "dpo", "beta": k.beta},
        "train": {
            "steps": steps, "batch_size": k.batch_size, "lr": k.lr, "scheduler": "constant", "warmup": 0,
            "seed": k.seed, "gradient_checkpointing": True, "log_every": 1, "save_every": 0, "eval_every": 0,
        },
        "backend": "torch",
        "device": device,
        "output_dir": str(out),
        "tensorboard": False,
    }  # fmt: skip


def step_tokens(pairs: list[list[list[int]]], batch_size: int, steps: int) -> list[int]:
    """Tokens (prompt + completion, both sequences of each pair) of each step, batches in file order."""
    sizes = [len(chosen) + len(rejected) for chosen, rejected in pairs]
    return [sum(sizes[(i * batch_size) % len(sizes) :][:batch_size]) for i in range(steps)]


def steady(step_s: list[float], tokens: list[int], warm: int) -> dict[str, float | None]:
    """The steps after ``warm``: median step time, median tokens/s, and all their tokens over all their time."""
    times, toks = step_s[warm:], tokens[warm : len(step_s)]
    if not times:
        return {"step_s": None, "tok_s": None, "tok_s_overall": None}
    return {
        "step_s": round(statistics.median(times), 4),
        "tok_s": round(statistics.median(n / t for n, t in zip(toks, times, strict=True)), 1),
        "tok_s_overall": round(sum(toks) / sum(times), 1),  # a slow step (a recompile, say) counts here
    }


def gpu_run_tunelab(
    run_dir: Path, model: Path, train: Path, k: GpuKnobs, args: argparse.Namespace, max_seq_len: int, tokens: list[int]
) -> dict[str, Any]:
    run_dir.mkdir(parents=True)
    cfg = run_dir / "cfg.yaml"
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    config = gpu_tunelab_config(model, train, run_dir / "out", k, args.steps, max_seq_len, device, dtype)
    config["train"].update(json.loads(args.tunelab_train))  # e.g. {"compile": false}: an A/B
    cfg.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result: dict[str, Any] = {"stack": "tunelab"}
    try:
        timing = _timed([sys.executable, "-m", "tunelab", "train", str(cfg)], run_dir)
    except RuntimeError as exc:
        return {**result, "error": str(exc)[-3000:]}
    metrics = [r for r in read_jsonl(run_dir / "out" / "metrics.jsonl") if "train_loss" in r]
    # tokens_per_sec is the step's tokens over the wall time between step ends (what the user waits for)
    step_s = [tokens[i] / r["tokens_per_sec"] for i, r in enumerate(metrics)]
    peaks = [r["peak_memory_gb"] for r in metrics if "peak_memory_gb" in r]
    return {
        **result,
        "wall_s": round(timing.wall_s, 2),
        **steady(step_s, tokens, args.warm),
        "peak_gib": round(max(peaks), 3) if peaks else None,
        "losses": [r["train_loss"] for r in metrics],
        "step_s_all": [round(x, 4) for x in step_s],
        "logged_tok_s": [r["tokens_per_sec"] for r in metrics],
    }


def gpu_run_trl(
    run_dir: Path, model: Path, train: Path, k: GpuKnobs, args: argparse.Namespace, tokens: list[int]
) -> dict[str, Any]:
    from vs_unsloth import TARGETS

    run_dir.mkdir(parents=True)
    out = run_dir / "result.json"
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    cmd = [
        sys.executable, str(TRL_SCRIPT), "--model", str(model), "--train", str(train), "--out", str(run_dir / "out"),
        "--steps", str(args.steps), "--batch-size", str(k.batch_size), "--lr", str(k.lr), "--beta", str(k.beta),
        "--rank", str(k.rank), "--alpha", str(k.alpha), "--seed", str(k.seed), "--result", str(out),
        "--device", device, "--dtype", dtype, "--targets", ",".join(TARGETS), "--gradient-checkpointing", "true",
    ]  # fmt: skip
    result: dict[str, Any] = {"stack": "trl"}
    try:
        timing = _timed(cmd, run_dir)
    except RuntimeError as exc:
        return {**result, "error": str(exc)[-3000:]}
    r = json.loads(out.read_text(encoding="utf-8"))
    ends = [r["train_begin"], *r["step_ends"]]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    return {
        **result,
        "wall_s": round(timing.wall_s, 2),
        **steady(step_s, tokens, args.warm),
        "peak_gib": round(r["peak_memory_bytes"] / 2**30, 3),
        "peak_reserved_gib": round(r["peak_reserved_bytes"] / 2**30, 3) if r.get("peak_reserved_bytes") else None,
        "gpu": r.get("gpu"),
        "gradient_checkpointing": r.get("gradient_checkpointing"),
        "losses": r["losses"],
        "step_s_all": [round(x, 4) for x in step_s],
        "pairs": r["pairs"],
    }


def _build_model(root: Path, shape: str) -> Path:
    """``vs_unsloth.build_checkpoint`` in a process of its own, so this one never holds GPU memory."""
    folder = root / shape
    if not (folder / "config.json").exists():
        code = f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); from vs_unsloth import build_checkpoint; "
        code += f"from pathlib import Path; build_checkpoint(Path({str(folder)!r}), {shape!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader", "-i", "0"]
    proc = subprocess.run(query, capture_output=True, text=True)
    return proc.stdout.strip() or None


def gpu_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tunelab"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    if found["tunelab"] is None:  # from a checkout on PYTHONPATH, not installed
        import tunelab

        found["tunelab"] = tunelab.__version__
    return found


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def gpu_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The medians over reps of each stack, their TRL/tunelab ratios, and the markdown table of both."""
    med: dict[str, dict[str, float | None]] = {}
    for stack, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        med[stack] = {
            key: (statistics.median(v) if (v := [r[key] for r in ok if r.get(key) is not None]) else None)
            for key in ("wall_s", "step_s", "tok_s", "tok_s_overall", "peak_gib")
        }
    t, u = med.get("tunelab", {}), med.get("trl", {})
    rows = [
        ("wall s (launch to exit)", "wall_s", "{:.1f}"),
        ("steady step s (median)", "step_s", "{:.3f}"),
        ("steady tokens/s (median)", "tok_s", "{:,.0f}"),
        ("steady tokens/s (all tokens / all time)", "tok_s_overall", "{:,.0f}"),
        ("peak CUDA GiB (max allocated)", "peak_gib", "{:.2f}"),
    ]
    lines = ["| | tunelab | TRL | TRL / tunelab |", "|---|---|---|---|"]
    ratios = {}
    for label, key, fmt in rows:
        ratio = _ratio(u.get(key), t.get(key))
        ratios[key] = ratio
        show = [fmt.format(v) if v is not None else "-" for v in (t.get(key), u.get(key))]
        lines.append(f"| {label} | {show[0]} | {show[1]} | {f'{ratio:.2f}x' if ratio else '-'} |")
    return "\n".join(lines), {"median": med, "trl_over_tunelab": ratios}


def main_gpu(args: argparse.Namespace) -> None:
    from vs_unsloth import TARGETS

    k = GpuKnobs(
        batch_size=args.batch_size, lr=args.lr, beta=args.beta, prompt_tokens=args.prompt_tokens,
        completion_tokens=args.completion_tokens, jitter=args.jitter,
    )  # fmt: skip
    shape = "tiny" if args.tiny else args.model
    # The children run in their own folders: a relative PYTHONPATH entry (PYTHONPATH=src) must not dangle there.
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(BENCH_DIR.parent / "src"), *paths]))
    work = args.work or Path(tempfile.mkdtemp(prefix="dpo_vs_trl_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = _build_model(args.model_root, shape)
    print(f"checkpoint {model} ready ({time.time() - started:.0f} s)", flush=True)

    from transformers import AutoTokenizer

    pairs = make_long_pairs(AutoTokenizer.from_pretrained(str(model)), args.pairs or args.steps * k.batch_size, k)
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    ids = tunelab_pairs(model, train, len(pairs), max_seq_len=1_048_576)
    longest = max(len(seq) for pair in ids for seq in pair)
    max_seq_len = -(-(longest + 1) // 64) * 64  # room for every pair: neither stack truncates
    tokens = step_tokens(ids, k.batch_size, args.steps)
    lengths = {
        "prompt_plus_chosen_mean": round(statistics.mean(len(c) for c, _ in ids), 1),
        "prompt_plus_rejected_mean": round(statistics.mean(len(r) for _, r in ids), 1),
        "longest": longest,
        "tokens_per_step_mean": round(statistics.mean(tokens), 1),
    }
    print(f"{len(pairs)} pairs: {lengths}", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {stack: [] for stack in args.stacks.split(",")}
    same_ids: bool | None = None
    for rep in range(args.reps):  # alternate, as in CPU mode
        for stack in runs:
            if stack == "tunelab":
                r = gpu_run_tunelab(work / f"tunelab-{rep}", model, train, k, args, max_seq_len, tokens)
            else:
                r = gpu_run_trl(work / f"trl-{rep}", model, train, k, args, tokens)
                if "pairs" in r:
                    used = args.steps * k.batch_size
                    same_ids = ids[: min(used, len(ids))] == r.pop("pairs")[:used]
            runs[stack].append(r)
            if os.environ.get("OUT") and rep == 0:  # the device tool brings back what is under $OUT
                shutil.copy(work / f"{stack}-{rep}" / "log.txt", Path(os.environ["OUT"]) / f"dpo_vs_trl_{stack}.log")
            brief = {key: v for key, v in r.items() if key not in ("losses", "step_s_all", "logged_tok_s")}
            print(json.dumps(brief), flush=True)
            write_gpu_results(args, k, shape, lengths, max_seq_len, same_ids, runs, work, started)

    table, _ = gpu_table(runs)
    ok = {stack: [r for r in rs if "error" not in r] for stack, rs in runs.items()}
    print(f"\nDPO, {shape}, LoRA r{k.rank}/α{k.alpha:g} on {len(TARGETS)} linears, batch {k.batch_size} pairs, "
          f"{args.steps} steps (steady state: steps {args.warm + 1}..{args.steps}), {args.reps} run(s) each; "
          f"token ids {'identical' if same_ids else 'DIFFERENT' if same_ids is False else 'not compared'}")  # fmt: skip
    print(table)
    for stack, rs in ok.items():
        if rs:
            losses = rs[0]["losses"]
            print(f"  {stack:8s} loss step 1 {losses[0]:.4f}, step {len(losses)} {losses[-1]:.4f}")
    for path in write_gpu_results(args, k, shape, lengths, max_seq_len, same_ids, runs, work, started):
        print(f"results: {path}")


def write_gpu_results(
    args: argparse.Namespace,
    k: GpuKnobs,
    shape: str,
    lengths: dict[str, Any],
    max_seq_len: int,
    same_ids: bool | None,
    runs: dict[str, list[dict[str, Any]]],
    work: Path,
    started: float,
) -> list[Path]:
    """Write what is known so far (after every run, so a run cut short still leaves its figures)."""
    table, summary = gpu_table(runs)
    result = {
        "mode": "gpu" if not args.tiny else "cpu-plumbing",
        "model": shape,
        "device": _gpu_name() if not args.tiny else "cpu",
        "knobs": asdict(k),
        "tunelab_train": json.loads(args.tunelab_train),
        "steps": args.steps,
        "warm": args.warm,
        "reps": args.reps,
        "lengths": lengths,
        "max_seq_len": max_seq_len,
        "same_token_ids": same_ids,
        **summary,
        "runs": runs,
        "table": table,
        "versions": gpu_versions(),
        "total_s": round(time.time() - started, 1),
    }
    targets = [GPU_RESULTS] if not args.tiny else [work / GPU_RESULTS.name]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / GPU_RESULTS.name)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU mode (see above)")
    parser.add_argument(
        "--model", choices=[*sorted(MODELS), "llama1b", "llama8b"], default=None,
        help="cpu: tiny | small (default); cuda: llama8b (default) | llama1b",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=None, help="default: cpu 1024; cuda steps x batch")
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="steps of each timed run (default: cpu 100, cuda 20)")
    parser.add_argument("--reps", type=int, default=None, help="runs of each stack (default: cpu 3, cuda 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: cpu 8, cuda 2)")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    gpu = parser.add_argument_group("GPU mode (--device cuda)")
    gpu.add_argument("--warm", type=int, default=5, help="first steps left out of the steady-state figures")
    gpu.add_argument("--prompt-tokens", type=int, default=256)
    gpu.add_argument("--completion-tokens", type=int, default=256, help="each of chosen and rejected")
    gpu.add_argument("--jitter", type=float, default=0.2, help="lengths vary by up to this fraction either way")
    gpu.add_argument("--lr", type=float, default=1e-4)
    gpu.add_argument("--beta", type=float, default=0.1)
    gpu.add_argument("--stacks", default="tunelab,trl", help="run only some: tunelab | trl")
    gpu.add_argument("--model-root", type=Path, default=Path("/dev/shm/tunelab-vs"), help="where checkpoints live")
    gpu.add_argument(
        "--tunelab-train", default="{}", help="JSON merged into tunelab's train: section, e.g. '{\"compile\": false}'"
    )
    gpu.add_argument("--tiny", action="store_true", help="CPU plumbing check: vs_unsloth's tiny shape, fp32, on CPU")
    args = parser.parse_args()
    if args.device == "cuda":
        if args.model in MODELS:
            parser.error(f"--device cuda trains llama8b or llama1b, not {args.model} (--tiny: the CPU plumbing check)")
        args.model = args.model or "llama8b"
        args.steps = args.steps or 20
        args.reps = args.reps or 1
        args.batch_size = args.batch_size or 2
        main_gpu(args)
        return
    if args.model not in (None, *MODELS):
        parser.error(f"--model {args.model} needs --device cuda")
    args.model = args.model or "small"
    args.pairs = args.pairs or 1024
    args.steps = args.steps or 100
    args.reps = args.reps or 3
    args.batch_size = args.batch_size or 8
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
