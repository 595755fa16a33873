"""tunelab vs the plain transformers Trainer + PEFT: LoRA SFT on CPU, whole-process wall time.

Run ``python bench/cpu_vs_trainer.py`` (``--help`` for the knobs).  Both stacks
fine-tune the same tiny Llama-shaped checkpoint on the same generated chat set
with the same LoRA rank/alpha/targets, batch size, length limit, learning rate
and number of optimizer steps.  Each run is a fresh subprocess and is timed
from launch to exit, because imports, data preparation and model loading are
part of what a user waits for; the two stacks alternate (A B A B ...) so a
slow patch on a shared machine hits both, and medians are reported.

Besides the totals, every run is split into phases from timestamps the stacks
already record (tunelab's run registry) or that the Trainer script writes
(``bench/_hf_trainer_sft.py``), so the report shows *where* a difference comes
from: startup, data preparation, model loading or the steps themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import DataSpec, ModelSpec, median, prepare_inputs, read_jsonl, spread  # noqa: E402

HF_SCRIPT = BENCH_DIR / "_hf_trainer_sft.py"
RESULTS = BENCH_DIR / "results" / "cpu_vs_trainer.json"
STACKS = ("tunelab", "trainer")
PHASES = ("startup", "data", "model", "first_step", "steps", "finish")
PHASE_HELP = {
    "startup": "launch -> ready to read data (interpreter, imports, config; tunelab: registry too)",
    "data": "tokenizer load + read + chat template + tokenize + mask",
    "model": "model load + LoRA wrap + optimizer/Trainer set-up",
    "first_step": "first optimizer step (includes loop entry)",
    "steps": "optimizer steps 2..N",
    "finish": "last step -> process exit (save adapter, bookkeeping, teardown)",
}


@dataclass(frozen=True)
class Knobs:
    """What the stacks are told to do; one place so they cannot drift apart.

    Everything is shared except ``trainer_sampling``, an opt-in ablation of the
    Trainer's sampler (its default, ``random``, is what the benchmark compares).
    """

    steps: int
    batch_size: int
    lr: float
    max_seq_len: int
    rank: int
    alpha: float
    trainer_sampling: str = "random"


@dataclass
class Run:
    """One timed subprocess and what it reported."""

    stack: str
    rep: int
    wall_s: float
    cpu_s: float
    others: float | None
    final_loss: float | None
    last10_loss: float | None
    real_tokens: int
    padded_tokens: int
    phases: dict[str, float] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)
    torch_threads: int | None = None  # as the child reported it (the Trainer script does; tunelab can't)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.wall_s

    @property
    def loop_s(self) -> float:
        """Seconds from "model ready" to the end of the last step: the training loop alone."""
        return self.phases["first_step"] + self.phases["steps"]


# --------------------------------------------------------------------------- running


def _child_env(run_dir: Path) -> dict[str, str]:
    """The same environment for both stacks, with private state dirs per run.

    Offline flags keep either stack from waiting on network timeouts.  A fresh
    ``HF_DATASETS_CACHE`` makes every Trainer run tokenize from scratch, as
    tunelab always does; otherwise repetitions 2..N would silently reuse the
    cached ``map`` output.  Thread settings are inherited untouched, so both
    stacks get torch's default (all cores).
    """
    env = dict(os.environ)
    env.update(
        TUNELAB_HOME=str(run_dir / "tunelab-home"),
        HF_DATASETS_CACHE=str(run_dir / "hf-datasets-cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def _busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux ``/proc/stat``), if readable."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    """How long a child ran, what it used, and how busy the rest of the machine was meanwhile."""

    launched: float  # epoch seconds, to line up with timestamps the child records
    wall_s: float
    cpu_s: float  # the child's own user+system time (os.wait4)
    others: float | None  # mean cores used by other processes during the run


def _timed(cmd: list[str], run_dir: Path) -> Timing:
    """Run ``cmd`` in ``run_dir`` and time it.

    The child's CPU time is inflated far less than wall time by a busy shared
    machine, and ``others`` (machine-wide busy CPU minus the child's) says
    whether a run was disturbed, so a reader can tell noise from signal.
    """
    with (run_dir / "log.txt").open("wb") as log:
        busy_before = _busy_cpu_s()
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=_child_env(run_dir), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy_after = _busy_cpu_s()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    others = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before - cpu) / wall)
    return Timing(launched, wall, cpu, others)


def _tunelab_config(train: Path, model: Path, out: Path, k: Knobs) -> dict[str, Any]:
    return {
        "model": {"path": str(model)},
        "data": {"train": str(train), "max_seq_len": k.max_seq_len, "mask_prompt": True},
        "method": {"name": "lora", "rank": k.rank, "alpha": k.alpha, "targets": "all-linear"},
        "train": {
            "steps": k.steps,
            "batch_size": k.batch_size,
            "lr": k.lr,
            "scheduler": "constant",
            "warmup": 0,
            "eval_every": 0,
            "save_every": 0,
        },
        "output_dir": str(out),
        "tensorboard": False,
    }


def _utc(text: str) -> float:
    """A registry timestamp (naive UTC text in SQLite) as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def _phases(timing: Timing, marks: list[float], step_ends: list[float]) -> dict[str, float]:
    """Phase durations from ``marks`` = [ready, data ready, model ready] and the step end times."""
    ready, data_ready, model_ready = marks
    return {
        "startup": ready - timing.launched,
        "data": data_ready - ready,
        "model": model_ready - data_ready,
        "first_step": step_ends[0] - model_ready,
        "steps": step_ends[-1] - step_ends[0],
        "finish": timing.launched + timing.wall_s - step_ends[-1],
    }


def run_tunelab(
    run_dir: Path, train: Path, model: Path, k: Knobs, batches: list[np.ndarray], lengths: np.ndarray, rep: int
) -> Run:
    """``python -m tunelab train cfg.yaml`` (what the ``tunelab`` console script runs), then read its records.

    Phase boundaries come from tunelab's own registry: the run row is created
    once the CLI is up, the dataset row right after tokenization, the model row
    after the model, LoRA and optimizer are ready, and one metrics row per step.
    """
    cfg_path = run_dir / "cfg.yaml"
    out = run_dir / "out"
    cfg_path.write_text(yaml.safe_dump(_tunelab_config(train, model, out, k), sort_keys=False), encoding="utf-8")
    timing = _timed([sys.executable, "-m", "tunelab", "train", str(cfg_path)], run_dir)

    losses = [row["train_loss"] for row in read_jsonl(out / "metrics.jsonl") if "train_loss" in row]
    db = sqlite3.connect(run_dir / "tunelab-home" / "tunelab.db")
    try:
        (created,) = db.execute("SELECT created_at FROM runs").fetchone()
        (data_ready,) = db.execute("SELECT created_at FROM datasets").fetchone()
        (model_ready,) = db.execute("SELECT created_at FROM models").fetchone()
        rows = db.execute("SELECT created_at FROM metrics WHERE name = 'train_loss' ORDER BY step").fetchall()
    finally:
        db.close()
    step_ends = [_utc(r[0]) for r in rows]
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return Run(
        stack="tunelab",
        rep=rep,
        wall_s=timing.wall_s,
        cpu_s=timing.cpu_s,
        others=timing.others,
        final_loss=losses[-1],
        last10_loss=float(np.mean(losses[-10:])),
        real_tokens=real,
        padded_tokens=padded,
        phases=_phases(timing, [_utc(created), _utc(data_ready), _utc(model_ready)], step_ends),
        step_s=list(np.diff(step_ends)),
    )


def run_trainer(run_dir: Path, train: Path, model: Path, k: Knobs, rep: int) -> Run:
    """``python bench/_hf_trainer_sft.py ...``; the script writes its marks and losses to result.json."""
    result_path = run_dir / "result.json"
    cmd = [
        sys.executable, str(HF_SCRIPT),
        "--model", str(model), "--train", str(train), "--out", str(run_dir / "out"),
        "--steps", str(k.steps), "--batch-size", str(k.batch_size), "--lr", str(k.lr),
        "--max-seq-len", str(k.max_seq_len), "--rank", str(k.rank), "--alpha", str(k.alpha),
        "--sampling", k.trainer_sampling, "--result", str(result_path),
    ]  # fmt: skip
    timing = _timed(cmd, run_dir)
    r = json.loads(result_path.read_text(encoding="utf-8"))
    step_ends = r["step_ends"]
    return Run(
        stack="trainer",
        rep=rep,
        wall_s=timing.wall_s,
        cpu_s=timing.cpu_s,
        others=timing.others,
        final_loss=r["final_loss"],
        last10_loss=r["final_loss"],  # the Trainer's logged loss already averages its last logging_steps=10
        real_tokens=sum(r["real_tokens"]),
        padded_tokens=sum(r["padded_tokens"]),
        phases=_phases(timing, [r["imported_at"], r["data_ready"], r["model_ready"]], step_ends),
        step_s=list(np.diff(step_ends)),
        torch_threads=r["torch_threads"],
    )


# --------------------------------------------------------------------------- setup facts


def versions() -> dict[str, str]:
    import datasets
    import peft
    import torch
    import transformers

    import tunelab

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "tunelab": tunelab.__version__,
    }


def base_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                total += int(np.prod(f.get_slice(name).get_shape()))
    return total


def compare_tokenization(rows: list[dict[str, Any]], split: Any, tokenizer: Any, max_len: int) -> dict[str, int]:
    """Diff tunelab's tokenized split against the Trainer script's ``tokenize_example``, token by token.

    Input ids must be identical, or the stacks would train on different data.
    Labels may differ in one known, deliberate way: tunelab leaves the
    whitespace a template puts *after* an assistant's end-of-turn marker
    unsupervised (generation stops at the marker), while the usual
    prefix-rendering recipe trains it.  Those tokens are counted apart from
    any other difference, which would be a real discrepancy.
    """
    from _hf_trainer_sft import tokenize_example

    out = {
        "examples_differing_ids": abs(len(rows) - len(split)),
        "trailing_ws_labels": 0,
        "other_labels": 0,
        "supervised_trainer": 0,
        "supervised_tunelab": 0,
    }
    if len(rows) != len(split):
        return out
    for row, ids, labels in zip(rows, split.input_ids, split.labels, strict=True):
        ref = tokenize_example(row["messages"], tokenizer, max_len)
        if ref["input_ids"] != ids.tolist():
            out["examples_differing_ids"] += 1
            continue
        mine, theirs = labels.tolist(), ref["labels"]
        out["supervised_tunelab"] += sum(x != -100 for x in mine[1:])
        out["supervised_trainer"] += sum(x != -100 for x in theirs[1:])
        for pos, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a == b:
                continue
            trailing = a == -100 and pos > 0 and ids[pos - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
            if trailing and not tokenizer.decode([int(ids[pos])]).strip():
                out["trailing_ws_labels"] += 1
            else:
                out["other_labels"] += 1
    return out


def data_facts(train: Path, model: Path, k: Knobs) -> tuple[dict[str, Any], np.ndarray, list[np.ndarray]]:
    """Tokenize once each way, check both stacks train on the same tokens, and describe the data.

    Also returns tunelab's lengths and the exact micro-batches its loop draws
    for the first ``k.steps`` steps (its order is a pure function of the
    seed), from which tunelab's real and padded token counts follow.
    """
    from tunelab.config.load import load_config
    from tunelab.data.batching import BatchPlan
    from tunelab.data.prepare import length_stats, prepare_data
    from tunelab.hub import load_tokenizer

    cfg = load_config(_tunelab_config(train, model, Path("unused"), k))
    tokenizer = load_tokenizer(model)
    split = prepare_data(cfg.data, tokenizer).train
    rows = read_jsonl(train)
    check = compare_tokenization(rows, split, tokenizer, k.max_seq_len)
    lengths = split.lengths
    plan = BatchPlan(cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle, cfg.data.group_by_length)
    per_epoch = -(-len(split) // plan.batch_size)
    epochs: dict[int, list[np.ndarray]] = {}
    batches = []
    for cursor in range(k.steps):
        epoch, index = divmod(cursor, per_epoch)
        if epoch not in epochs:
            epochs[epoch] = plan.epoch_batches(lengths, epoch)
        batches.append(epochs[epoch][index])
    stats = length_stats(split)
    facts = {
        "examples": len(rows),
        "mean_tokens": stats["mean"],
        "p50_tokens": stats["p50"],
        "max_tokens": stats["max"],
        "truncated": stats["truncated"],
        "supervised_fraction": stats["supervised_tokens"] / float(lengths.sum()),
        "vocab_size": len(tokenizer),
        "check": check,
    }
    return facts, lengths, batches


def describe_check(check: dict[str, int]) -> str:
    """One line saying how equal the two stacks' training tokens are."""
    if check["examples_differing_ids"] or check["other_labels"]:
        return (
            f"WARNING: the stacks train on different tokens: {check['examples_differing_ids']} examples "
            f"with different ids, {check['other_labels']} unexplained label differences"
        )
    line = "data check: identical input ids in both stacks; "
    if not check["trailing_ws_labels"]:
        return line + "identical labels"
    share = check["trailing_ws_labels"] / max(check["supervised_trainer"], 1)
    return line + (
        f"labels identical except {check['trailing_ws_labels']} whitespace tokens after assistant end "
        f"markers, trained by the Trainer recipe and not by tunelab ({share:.1%} of supervised tokens)"
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- report


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Per-stack medians (of per-run values, so each figure comes from whole runs) and the ratios."""
    out: dict[str, Any] = {}
    for stack in STACKS:
        mine = [r for r in runs if r.stack == stack]
        out[stack] = {
            "wall_s": median([r.wall_s for r in mine]),
            "wall_range": spread([r.wall_s for r in mine]),
            "cpu_s": median([r.cpu_s for r in mine]),
            "tokens_per_s": median([r.tokens_per_s for r in mine]),
            "final_loss": median([r.final_loss for r in mine if r.final_loss is not None]),
            "last10_loss": median([r.last10_loss for r in mine if r.last10_loss is not None]),
            "real_tokens": median([r.real_tokens for r in mine]),
            "padded_tokens": median([r.padded_tokens for r in mine]),
            "phases": {p: median([r.phases[p] for r in mine]) for p in PHASES},
            "step_s_median": median([s for r in mine for s in r.step_s]),
            "before_first_step_s": median([r.phases["startup"] + r.phases["data"] + r.phases["model"] for r in mine]),
            "loop_s": median([r.loop_s for r in mine]),
            "loop_real_tok_s": median([r.real_tokens / r.loop_s for r in mine]),
            "loop_padded_tok_s": median([r.padded_tokens / r.loop_s for r in mine]),
        }
    others = [r.others for r in runs if r.others is not None]
    out["max_other_cores"] = max(others) if others else None
    out["speedup"] = out["trainer"]["wall_s"] / out["tunelab"]["wall_s"]
    out["speedup_cpu"] = out["trainer"]["cpu_s"] / out["tunelab"]["cpu_s"]
    # The samplers differ, so N steps do not cover the same number of real tokens: tok/s corrects for that.
    out["speedup_tokens_per_s"] = out["tunelab"]["tokens_per_s"] / out["trainer"]["tokens_per_s"]
    return out


def print_report(summary: dict[str, Any], k: Knobs, reps: int) -> None:
    t, h = summary["tunelab"], summary["trainer"]
    print(
        f"\n{k.steps} steps x batch {k.batch_size}, {reps} repetitions per stack, Trainer sampling "
        f"{k.trainer_sampling!r}; medians:"
    )
    print(
        f"{'stack':<9} {'wall s':>8} {'(range)':>13} {'CPU s':>7} {'tok/s':>7} {'final loss':>11} "
        f"{'last-10 loss':>13} {'real tok':>9} {'padded tok':>11}"
    )
    for name, s in (("tunelab", t), ("trainer", h)):
        print(
            f"{name:<9} {s['wall_s']:>8.2f} {s['wall_range']:>13} {s['cpu_s']:>7.1f} {s['tokens_per_s']:>7.0f} "
            f"{s['final_loss']:>11.4f} {s['last10_loss']:>13.4f} {s['real_tokens']:>9.0f} "
            f"{s['padded_tokens']:>11.0f}"
        )
    print("  tok/s = real (non-pad) tokens trained on / whole-process wall time; final loss = tunelab's last step,")
    print("  the Trainer's last log (mean of steps N-9..N); last-10 loss = the same window for both.")
    print("\nwhere the time goes (median seconds):")
    print(f"{'phase':<12} {'tunelab':>8} {'trainer':>8}   what")
    for p in PHASES:
        print(f"{p:<12} {t['phases'][p]:>8.2f} {h['phases'][p]:>8.2f}   {PHASE_HELP[p]}")
    print(f"{'per step':<12} {t['step_s_median']:>8.3f} {h['step_s_median']:>8.3f}   median over steps 2..N")
    print(
        f"{'to step 1':<12} {t['before_first_step_s']:>8.2f} {h['before_first_step_s']:>8.2f}   "
        "startup + data + model: fixed cost before training"
    )
    print(f"{'loop':<12} {t['loop_s']:>8.2f} {h['loop_s']:>8.2f}   first_step + steps")
    print(f"{'loop tok/s':<12} {t['loop_real_tok_s']:>8.0f} {h['loop_real_tok_s']:>8.0f}   real tokens / loop seconds")
    print(
        f"{'padded/s':<12} {t['loop_padded_tok_s']:>8.0f} {h['loop_padded_tok_s']:>8.0f}   "
        "padded tokens / loop seconds (compute speed per position, ignoring padding waste)"
    )
    print("  (tunelab imports transformers/torch lazily, so its import time lands in 'data' and 'model')")
    if summary["max_other_cores"] is not None and summary["max_other_cores"] > 0.25:
        print(
            f"\nnote: other processes used up to {summary['max_other_cores']:.2f} cores during some runs; "
            "wall times are noisy (CPU times less so)"
        )
    print(f"\nCPU-time ratio (Trainer / tunelab, median): {summary['speedup_cpu']:.2f}x")
    print(f"throughput ratio (tunelab tok/s / Trainer tok/s, median): {summary['speedup_tokens_per_s']:.2f}x")
    print(f"speedup (Trainer wall / tunelab wall, median): {summary['speedup']:.2f}x")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--reps", type=int, default=3, help="runs per stack, alternating (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument(
        "--trainer-sampling",
        default="random",
        choices=["random", "group_by_length"],
        help="the Trainer's train_sampling_strategy; its default is random (an ablation: group_by_length pads "
        "about as little as tunelab's length-grouped batches)",
    )
    p.add_argument("--examples", type=int, default=2000, help="generated conversations")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=8000, help="requested tokenizer vocabulary")
    p.add_argument("--workdir", type=Path, help="keep data, model and runs here (reused when the specs match)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    knobs = Knobs(args.steps, args.batch_size, args.lr, args.max_seq_len, args.rank, args.alpha, args.trainer_sampling)
    data_spec = DataSpec(examples=args.examples)
    model_spec = ModelSpec(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        train, model = prepare_inputs(workdir, data_spec, model_spec)
        facts, lengths, batches = data_facts(train, model, knobs)
        ver = versions()
        threads = torch_threads()
        params = base_params(model)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch threads {threads} in both stacks "
            "(torch's default: neither stack nor this script sets a thread count; same environment)"
        )
        print(
            f"model: llama, hidden {model_spec.hidden_size}, {model_spec.num_layers} layers, vocab "
            f"{facts['vocab_size']}: {params / 1e6:.2f}M params (fp32); LoRA r={knobs.rank} alpha={knobs.alpha:g} "
            "all-linear"
        )
        print(
            f"data: {facts['examples']} chat examples, mean {facts['mean_tokens']:.0f} tokens "
            f"(p50 {facts['p50_tokens']:.0f}, max {facts['max_tokens']}, {facts['truncated']} truncated to "
            f"{knobs.max_seq_len}), {facts['supervised_fraction']:.0%} of tokens supervised"
        )
        print(describe_check(facts["check"]))
        print(f"setup: {time.perf_counter() - started:.1f}s; timing {args.reps} x 2 runs ...", flush=True)

        runs: list[Run] = []
        for rep in range(args.reps):
            for stack in STACKS:
                run_dir = workdir / "runs" / f"{stack}-{rep}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if stack == "tunelab":
                    run = run_tunelab(run_dir, train, model, knobs, batches, lengths, rep)
                else:
                    run = run_trainer(run_dir, train, model, knobs, rep)
                runs.append(run)
                busy = "" if run.others is None else f", other processes used {run.others:.2f} cores meanwhile"
                print(
                    f"  {stack:<8} rep {rep}: {run.wall_s:6.2f}s wall, {run.cpu_s:6.1f}s CPU, "
                    f"loss {run.final_loss:.4f}{busy}",
                    flush=True,
                )

        reported = {r.torch_threads for r in runs if r.torch_threads is not None}
        if reported != {threads}:
            print(f"WARNING: the Trainer process ran with {sorted(reported)} torch threads, this process has {threads}")
        summary = summarise(runs)
        print_report(summary, knobs, args.reps)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": date.today().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads},
            "versions": ver,
            "knobs": asdict(knobs),
            "model": {**asdict(model_spec), "params": params},
            "data": facts,
            "summary": summary,
            "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in runs],
        }
        args.results.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"results: {args.results}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
