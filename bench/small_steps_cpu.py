"""The small-model regime on CPU: many short steps, where the loop's own work shows.

Run ``python bench/small_steps_cpu.py`` (``--help`` for the knobs; ``--load`` runs
a CPU-bound busy process beside every timed run).  Both stacks fine-tune a
2-layer, hidden-64 Llama on 512 short prompt/completion pairs (about 14 tokens
each) with LoRA r8 on all linears, batch 16, a constant learning rate, a
checkpoint every 100 steps, metrics logged every step and one evaluation at
the end.  Each run is a whole process (``python -m tunelab train`` against
``bench/_hf_trainer_sft.py``, the transformers Trainer + PEFT), timed from
launch to exit; the stacks alternate and medians are reported.

A step here is tens of milliseconds, so per-step bookkeeping (registry rows,
metrics files, TensorBoard, the console, collating the next batch) is a large
share of the wall time unless it is batched or kept off the training thread.
tunelab logs both the wall-clock ``tokens_per_sec`` (between consecutive step
ends) and ``step_tokens_per_sec`` (the step alone), so the loop's own share per
step is ``step_tokens_per_sec / tokens_per_sec - 1``; it is printed too.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import CompletionSpec, ModelSpec, build_checkpoint, make_completions, median, read_jsonl, spread  # noqa: E402
from cpu_vs_trainer import HF_SCRIPT, Timing, _timed, _utc, versions  # noqa: E402

RESULTS = BENCH_DIR / "results" / "small_steps_cpu.json"
STACKS = ("tunelab", "trainer")
BUSY_LIMIT_S = 900  # the busy process stops by itself after this, even if this script dies
_BUSY = (
    "import os, sys, time\n"
    "end = time.time() + float(sys.argv[1])\n"
    "while time.time() < end and os.getppid() != 1:\n"
    "    sum(i * i for i in range(10000))\n"
)


@dataclass(frozen=True)
class Knobs:
    """What both stacks are told to do; one place so they cannot drift apart."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    save_every: int = 100
    max_seq_len: int = 64


@dataclass
class Run:
    stack: str
    rep: int
    wall_s: float
    cpu_s: float
    others: float | None
    final_loss: float | None
    eval_loss: float | None
    overhead: dict[str, float] | None = None  # tunelab: the loop's own share per step
    step_wall_s: float | None = None  # tunelab: median wall seconds between step ends (registry times)


def prepare(workdir: Path, examples: int, model: ModelSpec) -> tuple[Path, Path, Path]:
    """train.jsonl, valid.jsonl and the tiny checkpoint under ``workdir`` (rebuilt when the specs change)."""
    stamp = workdir / "inputs.json"
    wanted = json.loads(json.dumps({"examples": examples, "model": asdict(model)}))
    train, valid, model_dir = workdir / "data" / "train.jsonl", workdir / "data" / "valid.jsonl", workdir / "model"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return train, valid, model_dir
    rows = make_completions(CompletionSpec(examples=examples))
    held_out = make_completions(CompletionSpec(examples=64, seed=1))
    train.parent.mkdir(parents=True, exist_ok=True)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    valid.write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    build_checkpoint(model_dir, rows + held_out, model)
    stamp.write_text(json.dumps(wanted), encoding="utf-8")
    return train, valid, model_dir


@contextmanager
def busy_beside(load: bool) -> Iterator[None]:
    """A CPU-bound process for the duration of one timed run (bounded: it also ends by itself)."""
    if not load:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _BUSY, str(BUSY_LIMIT_S)])
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


def tunelab_config(train: Path, valid: Path, model: Path, out: Path, k: Knobs) -> dict[str, Any]:
    return {
        "model": {"path": str(model)},
        "data": {"train": str(train), "valid": str(valid), "max_seq_len": k.max_seq_len},
        "method": {"name": "lora", "rank": k.rank, "alpha": k.alpha, "targets": "all-linear"},
        "train": {
            "steps": k.steps,
            "batch_size": k.batch_size,
            "lr": k.lr,
            "scheduler": "constant",
            "warmup": 0,
            "save_every": k.save_every,
            "eval_every": 0,  # once, at the end
            "log_every": 1,
        },
        "output_dir": str(out),
    }


def loop_overhead(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The loop's own time as a share of the step's, from the two throughputs tunelab logs per step.

    ``median``: the typical step (steps 2..N); ``mean``: all the wall time of steps 2..N over all their step
    time, so the occasional checkpoint and evaluation count too.
    """
    steps = [r for r in rows if "step_tokens_per_sec" in r and r.get("tokens_per_sec")][1:]
    if not steps:
        return None
    ratios = np.array([r["step_tokens_per_sec"] / r["tokens_per_sec"] for r in steps])
    wall = sum(1.0 / r["tokens_per_sec"] for r in steps)  # seconds per token: the same tokens both ways
    own = sum(1.0 / r["step_tokens_per_sec"] for r in steps)
    return {"median": float(np.median(ratios) - 1), "mean_with_checkpoints": wall / own - 1}


def step_wall(home: Path) -> float:
    """Median wall seconds between consecutive step ends, from the times the registry keeps per metrics row."""
    db = sqlite3.connect(home / "tunelab.db")
    try:
        rows = db.execute("SELECT created_at FROM metrics WHERE name = 'train_loss' ORDER BY step").fetchall()
    finally:
        db.close()
    return float(np.median(np.diff([_utc(r[0]) for r in rows])))


def run_tunelab(
    run_dir: Path, inputs: tuple[Path, Path, Path], k: Knobs, rep: int, load: bool, src: Path | None = None
) -> Run:
    """``python -m tunelab train``; with ``src``, the tunelab package found there (an older tree, "before")."""
    cfg_path, out = run_dir / "cfg.yaml", run_dir / "out"
    cfg_path.write_text(yaml.safe_dump(tunelab_config(*inputs, out, k), sort_keys=False), encoding="utf-8")
    entry = ["-m", "tunelab"]
    if src is not None:
        boot = f"import sys, runpy; sys.path.insert(0, {str(src)!r}); runpy.run_module('tunelab', run_name='__main__')"
        entry = ["-c", boot]
    with busy_beside(load):
        timing = _timed([sys.executable, *entry, "train", str(cfg_path)], run_dir)
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    run = _run("before" if src else "tunelab", rep, timing, losses[-1], evals[-1] if evals else None)
    run.overhead, run.step_wall_s = loop_overhead(rows), step_wall(run_dir / "tunelab-home")
    return run


def run_trainer(run_dir: Path, inputs: tuple[Path, Path, Path], k: Knobs, rep: int, load: bool) -> Run:
    train, valid, model = inputs
    result = run_dir / "result.json"
    cmd = [
        sys.executable, str(HF_SCRIPT), "--model", str(model), "--train", str(train), "--valid", str(valid),
        "--out", str(run_dir / "out"), "--steps", str(k.steps), "--batch-size", str(k.batch_size),
        "--lr", str(k.lr), "--max-seq-len", str(k.max_seq_len), "--rank", str(k.rank), "--alpha", str(k.alpha),
        "--save-steps", str(k.save_every), "--logging-steps", "1", "--result", str(result),
    ]  # fmt: skip
    with busy_beside(load):
        timing = _timed(cmd, run_dir)
    r = json.loads(result.read_text(encoding="utf-8"))
    return _run("trainer", rep, timing, r["final_loss"], r.get("eval_loss"))


def _run(stack: str, rep: int, t: Timing, loss: float | None, val: float | None) -> Run:
    return Run(stack, rep, t.wall_s, t.cpu_s, t.others, loss, val)


def summarise(runs: list[Run], stacks: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stack in stacks:
        mine = [r for r in runs if r.stack == stack]
        out[stack] = {
            "wall_s": median([r.wall_s for r in mine]),
            "wall_range": spread([r.wall_s for r in mine]),
            "cpu_s": median([r.cpu_s for r in mine]),
            "final_loss": median([r.final_loss for r in mine if r.final_loss is not None]),
            "eval_loss": median([r.eval_loss for r in mine if r.eval_loss is not None]),
            "step_wall_s": median([r.step_wall_s for r in mine if r.step_wall_s is not None]),
        }
    own = [r.overhead for r in runs if r.overhead]
    out["loop_overhead_median"] = median([o["median"] for o in own])
    out["loop_overhead_mean"] = median([o["mean_with_checkpoints"] for o in own])
    out["speedup"] = out["trainer"]["wall_s"] / out["tunelab"]["wall_s"]
    by_rep = {(r.stack, r.rep): r.wall_s for r in runs}
    paired = [by_rep[("trainer", i)] / by_rep[("tunelab", i)] for i in {r.rep for r in runs}]
    out["speedup_paired_median"] = median(paired)
    others = [r.others for r in runs if r.others is not None]
    out["max_other_cores"] = max(others) if others else None
    return out


def print_report(s: dict[str, Any], k: Knobs, reps: int, load: bool, stacks: tuple[str, ...]) -> None:
    beside = "beside a CPU-bound busy process" if load else "no added load"
    print(f"\n{k.steps} steps x batch {k.batch_size}, checkpoint every {k.save_every}, {reps} reps, {beside}; medians:")
    print(f"{'stack':<9} {'wall s':>8} {'(range)':>13} {'CPU s':>7} {'last loss':>10} {'eval loss':>10} {'s/step':>7}")
    for name in stacks:
        t = s[name]
        print(
            f"{name:<9} {t['wall_s']:>8.2f} {t['wall_range']:>13} {t['cpu_s']:>7.1f} "
            f"{t['final_loss']:>10.4f} {t['eval_loss']:>10.4f} {t['step_wall_s']:>7.4f}"
        )
    print("  s/step: tunelab's median wall seconds between step ends (its registry's row times)")
    print(f"speedup (Trainer wall / tunelab wall, medians): {s['speedup']:.2f}x")
    print(f"speedup (median of per-repetition ratios):      {s['speedup_paired_median']:.2f}x")
    print(
        f"tunelab's own time per step (wall - step, as a share of the step): median {s['loop_overhead_median']:.1%}"
        f", all steps incl. checkpoints and eval {s['loop_overhead_mean']:.1%}"
    )
    if s["max_other_cores"] is not None:
        print(f"other processes used up to {s['max_other_cores']:.2f} cores during a run (the busy process included)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--reps", type=int, default=3, help="runs per stack, alternating (default 3)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--load", action="store_true", help="run a CPU-bound busy process beside every timed run")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--workdir", type=Path, help="keep data, model and runs here (reused when the specs match)")
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="also time the tunelab package under this folder as 'before' (e.g. `git archive REV src | tar -x -C DIR` "
        "and pass DIR/src)",
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    knobs = Knobs(steps=args.steps, save_every=args.save_every)
    model_spec = ModelSpec(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=172)  # fmt: skip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunelab-small-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        inputs = prepare(workdir, args.examples, model_spec)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; knobs: {asdict(knobs)}", flush=True)
        runs: list[Run] = []
        stacks = STACKS + (("before",) if args.baseline_src else ())
        for rep in range(args.reps):
            for stack in stacks if rep % 2 == 0 else stacks[::-1]:  # alternate who goes first
                run_dir = workdir / "runs" / f"{stack}-{rep}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if stack == "trainer":
                    run = run_trainer(run_dir, inputs, knobs, rep, args.load)
                else:
                    src = args.baseline_src.resolve() if stack == "before" else None
                    run = run_tunelab(run_dir, inputs, knobs, rep, args.load, src)
                runs.append(run)
                own = f", loop's own share {run.overhead['median']:.1%}/step" if run.overhead else ""
                print(f"  {stack:<8} rep {rep}: {run.wall_s:6.2f}s wall, {run.cpu_s:6.1f}s CPU{own}", flush=True)
        summary = summarise(runs, stacks)
        print_report(summary, knobs, args.reps, args.load, stacks)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        payload = {"date": date.today().isoformat(), "load": args.load, "knobs": asdict(knobs),
                   "summary": summary, "runs": [asdict(r) for r in runs]}  # fmt: skip
        args.results.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"results: {args.results}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
