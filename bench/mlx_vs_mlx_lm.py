"""tunelab's MLX backend vs ``mlx_lm lora``: LoRA SFT on a CPU (``mlx[cpu]``), both stacks on the same BLAS.

Run ``python bench/mlx_vs_mlx_lm.py`` (``--help`` for the knobs).  Both stacks
fine-tune the same tiny Llama-shaped checkpoint on the same generated chat set
with the same LoRA rank/scale/targets, batch size, length limit, learning rate,
optimizer and number of steps.  Each run is a fresh subprocess timed from
launch to exit; the stacks alternate (tunelab, mlx_lm, tunelab, ...) so a slow
patch on a shared machine hits both, and medians are reported.

The ``mlx[cpu]`` wheel for Linux bundles the reference (netlib) BLAS.  tunelab
loads an optimised one before it imports mlx; mlx_lm does not, so it is started
with ``LD_PRELOAD`` set to the same library (``--blas reference`` runs both on
the bundled one instead).  Each child process reports which library provides
``cblas_sgemm`` to it and how fast MLX multiplies two 512x512 fp32 matrices
there, so the report shows the BLAS each stack really used.

Throughput is given three ways: each stack's own tokens/s (they count
different tokens, see below), real tokens per second of the training loop
(the same count and clock for both: the headline ratio), and real tokens per
second of the whole process.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import DataSpec, make_conversations, median, read_jsonl, spread, write_jsonl  # noqa: E402

RESULTS = BENCH_DIR / "results" / "mlx_vs_mlx_lm.json"
STACKS = ("tunelab", "mlx_lm")
# LoRA targets: every linear layer of every decoder block (mlx_lm's default keys, listed explicitly).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLX_LM_KEYS = tuple(f"self_attn.{t}" for t in TARGETS[:4]) + tuple(f"mlp.{t}" for t in TARGETS[4:])
PAD_MULTIPLE = 32  # mlx_lm pads a batch to 1 + a multiple of 32 (it then drops the last column as the shift)
IGNORE = -100
PHASES = ("startup", "data", "model", "first_step", "steps", "validation", "finish")
PHASE_HELP = {
    "startup": "launch -> imports done (tunelab: run registered)",
    "data": "tunelab: tokenizer load + read + template + tokenize; mlx_lm: read JSONL only (tokenizes lazily)",
    "model": "model (+ mlx_lm: tokenizer) load, LoRA wrap, optimizer",
    "first_step": "step 1 (includes the first compile and, for mlx_lm, tokenizing its batch)",
    "steps": "steps 2..N (mlx_lm: validation time taken out)",
    "validation": "mlx_lm always validates at step 1 and step N (1 batch each here); tunelab: none",
    "finish": "last step -> exit (save adapter, bookkeeping, teardown; BLAS probe taken out)",
}
REFERENCE_STEPS = 3  # default --steps with --blas reference: the bundled BLAS is ~50x slower

# Both children end by reporting which library provides cblas_sgemm to them (glibc dladdr) and
# MLX's fp32 512x512 matmul speed: proof of the BLAS each stack trained with.  It runs after
# training, and the parent takes its duration out of the finish phase and the wall time.
_PROBE = r"""
def _blas_probe():
    import ctypes, os, time
    import mlx.core as mx

    started = time.perf_counter()
    path = None

    class Info(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    try:
        scope = ctypes.CDLL(None)
        address = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p).value
        info = Info()
        if scope.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.fname:
            path = os.fsdecode(info.fname)
    except (AttributeError, OSError):
        pass  # no cblas_sgemm in the global scope: MLX calls the reference BLAS inside libmlx
    a = mx.random.normal((512, 512))
    b = mx.random.normal((512, 512))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return {"cblas": path, "gflops": 2 * 512**3 / best / 1e9, "probe_s": time.perf_counter() - started}
"""

# `python -m tunelab train cfg.yaml`, run through runpy (what -m does) so the BLAS can be probed after it.
_TUNELAB_CHILD = (
    _PROBE
    + r"""
import json, runpy, sys, time

_out, _cfg = sys.argv[1], sys.argv[2]
sys.argv = ["tunelab", "train", _cfg]
try:
    runpy.run_module("tunelab", run_name="__main__", alter_sys=True)
finally:  # the CLI ends with SystemExit; probe before the interpreter tears mlx down
    done = time.time()
    with open(_out, "w") as f:
        json.dump({"done": done, "blas": _blas_probe()}, f)
"""
)

# `mlx_lm.lora -c cfg.yaml` (what `python -m mlx_lm lora` dispatches to).  Instrumentation only
# observes: a TrainingCallback (mlx_lm's own hook) records each step's report with a timestamp, and
# load/load_dataset/train are wrapped to note when they return or start.
_MLX_LM_CHILD = (
    _PROBE
    + r"""
import json, sys, time

_out, _cfg = sys.argv[1], sys.argv[2]
import mlx_lm.lora as lora

marks = {"imported": time.time()}
steps, vals = [], []


class _Recorder(lora.TrainingCallback):
    def on_train_loss_report(self, info):
        steps.append({"t": time.time(), **{k: float(v) for k, v in info.items()}})

    def on_val_loss_report(self, info):
        vals.append({"t": time.time(), **{k: float(v) for k, v in info.items()}})


def _after(name, fn):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        marks[name] = time.time()
        return result
    return wrapped


def _before(name, fn):
    def wrapped(*args, **kwargs):
        marks[name] = time.time()
        return fn(*args, **kwargs)
    return wrapped


lora.get_reporting_callbacks = lambda *args, **kwargs: _Recorder()
lora.load = _after("model_loaded", lora.load)
lora.load_dataset = _after("data_loaded", lora.load_dataset)
lora.train = _before("loop_start", lora.train)
sys.argv = ["mlx_lm.lora", "-c", _cfg]
try:
    lora.main()
finally:
    marks["done"] = time.time()
    with open(_out, "w") as f:
        json.dump({"marks": marks, "steps": steps, "vals": vals, "blas": _blas_probe()}, f)
"""
)


@dataclass(frozen=True)
class Knobs:
    """What both stacks are told to do; one place so they cannot drift apart."""

    steps: int
    batch_size: int
    lr: float
    max_seq_len: int
    rank: int
    alpha: float
    seed: int = 0
    # Ablations only: extra tunelab config values, e.g. (("train.compile", False),).  Empty = the comparison.
    tunelab_options: tuple[tuple[str, Any], ...] = ()

    @property
    def scale(self) -> float:
        """mlx_lm's LoRA ``scale`` multiplies B·A directly; tunelab's (PEFT's) is alpha / rank."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class Blas:
    """The BLAS both stacks are asked to use and the environment that gets it to each."""

    mode: str  # openblas | reference | path
    path: str | None  # the library, None for the bundled reference BLAS

    def env(self, stack: str) -> dict[str, str]:
        if self.path is None:
            return {"TUNELAB_BLAS": "reference"} if stack == "tunelab" else {}
        if stack == "mlx_lm":
            return {"LD_PRELOAD": self.path}
        # tunelab finds OpenBLAS itself (its default); an explicit path is passed as TUNELAB_BLAS.
        return {} if self.mode == "openblas" else {"TUNELAB_BLAS": self.path}


@dataclass
class StepPlan:
    """Per step: real (non-pad) tokens, positions the model computes (padded), supervised targets."""

    real: list[int]
    positions: list[int]
    supervised: list[int]


@dataclass
class Run:
    """One timed subprocess and what it reported."""

    stack: str
    rep: int
    wall_s: float  # launch -> exit, BLAS probe taken out
    cpu_s: float
    others: float | None
    phases: dict[str, float]
    step_s: list[float]  # wall seconds of steps 2..N (between step reports)
    own_tokens_per_s: float  # the stack's own figure (tunelab: real tokens; mlx_lm: supervised targets)
    real_tokens: int
    positions: int
    final_loss: float
    blas: dict[str, Any]
    compute_step_s: list[float] = field(default_factory=list)  # mlx_lm's own per-step timer (steps 2..N)

    @property
    def loop_s(self) -> float:
        """Training-loop seconds: model ready -> last step, validation taken out."""
        return self.phases["first_step"] + self.phases["steps"]


# --------------------------------------------------------------------------- inputs


def prepare_inputs(workdir: Path, data: DataSpec, valid: DataSpec, model: dict[str, int]) -> tuple[Path, Path]:
    """``data/{train,valid}.jsonl`` and ``model/`` under ``workdir``, reused while the specs match."""
    from tunelab.tiny import make_tiny_checkpoint

    data_dir, model_dir, stamp = workdir / "data", workdir / "model", workdir / "inputs.json"
    wanted = json.loads(json.dumps({"data": asdict(data), "valid": asdict(valid), "model": model}))
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return data_dir, model_dir
    rows = make_conversations(data)
    write_jsonl(data_dir / "train.jsonl", rows)
    write_jsonl(data_dir / "valid.jsonl", make_conversations(valid))
    make_tiny_checkpoint(
        model_dir,
        [m["content"] for row in rows for m in row["messages"]],
        arch="llama",
        tokenizer="bpe",
        vocab_size=model["vocab_size"],
        hidden_size=model["hidden_size"],
        num_layers=model["num_layers"],
        num_heads=model["num_heads"],
        num_kv_heads=model["num_kv_heads"],
        intermediate_size=model["intermediate_size"],
        tie_word_embeddings=False,
        seed=0,
    )
    stamp.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return data_dir, model_dir


def tunelab_config(data_dir: Path, model: Path, out: Path, k: Knobs) -> dict[str, Any]:
    # data.train names the file: a folder would make tunelab validate on valid.jsonl at the end.
    cfg: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"train": str(data_dir / "train.jsonl"), "max_seq_len": k.max_seq_len, "mask_prompt": True},
        "method": {"name": "lora", "rank": k.rank, "alpha": k.alpha, "dropout": 0.0, "targets": list(TARGETS)},
        "train": {
            "steps": k.steps,
            "batch_size": k.batch_size,
            "lr": k.lr,
            "scheduler": "constant",
            "warmup": 0,
            "weight_decay": 0.0,
            "eval_every": 0,
            "save_every": 0,
            "seed": k.seed,
        },
        "backend": "mlx",
        "output_dir": str(out),
        "tensorboard": False,
    }
    for dotted, value in k.tunelab_options:
        *parents, leaf = dotted.split(".")
        section = cfg
        for name in parents:
            section = section.setdefault(name, {})
        section[leaf] = value
    return cfg


def mlx_lm_config(data_dir: Path, model: Path, adapters: Path, k: Knobs) -> dict[str, Any]:
    """``mlx_lm lora -c`` options.  AdamW with weight decay 0 and bias correction is tunelab's optimizer."""
    return {
        "model": str(model),
        "train": True,
        "test": False,
        "data": str(data_dir),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "optimizer_config": {
            "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True}
        },
        "seed": k.seed,
        "num_layers": -1,
        "batch_size": k.batch_size,
        "iters": k.steps,
        "val_batches": 1,
        "learning_rate": k.lr,
        "steps_per_report": 1,  # one report per step: per-step timestamps and token counts
        "steps_per_eval": 10**9,
        "save_every": 10**9,
        "adapter_path": str(adapters),
        "max_seq_length": k.max_seq_len,
        "mask_prompt": True,
        "grad_checkpoint": False,
        "lora_parameters": {"rank": k.rank, "scale": k.scale, "dropout": 0.0, "keys": list(MLX_LM_KEYS)},
    }


# --------------------------------------------------------------------------- what each stack trains on


def tunelab_plan(data_dir: Path, model: Path, k: Knobs) -> tuple[Any, StepPlan]:
    """tunelab's tokenized split and the tokens of the micro-batches its first ``k.steps`` steps draw.

    The batch order is a pure function of the seed (tunelab's resume depends on
    it), so recomputing it here gives exactly what the run trains on.  The
    compiled MLX step pads each batch's width to a multiple of 32.
    """
    from tunelab.config.load import load_config
    from tunelab.data.batching import BatchPlan
    from tunelab.data.prepare import prepare_data
    from tunelab.hub import load_tokenizer

    cfg = load_config(tunelab_config(data_dir, model, Path("unused"), k))
    split = prepare_data(cfg.data, load_tokenizer(model)).train
    lengths = split.lengths
    plan = BatchPlan(cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle, cfg.data.group_by_length)
    per_epoch = -(-len(split) // plan.batch_size)
    epochs: dict[int, list[np.ndarray]] = {}
    steps = StepPlan([], [], [])
    multiple = _tunelab_pad_multiple() if cfg.train.compile else 1
    for cursor in range(k.steps):
        epoch, index = divmod(cursor, per_epoch)
        if epoch not in epochs:
            epochs[epoch] = plan.epoch_batches(lengths, epoch)
        batch = epochs[epoch][index]
        width = -(-int(lengths[batch].max()) // multiple) * multiple
        steps.real.append(int(lengths[batch].sum()))
        steps.positions.append(len(batch) * width)
        steps.supervised.append(sum(int((split.labels[i][1:] != IGNORE).sum()) for i in batch))
    return split, steps


def _tunelab_pad_multiple() -> int:
    try:
        from tunelab.backends.mlx import backend
    except ImportError:
        return 1
    return int(getattr(backend, "_PAD_MULTIPLE", 1))


def mlx_lm_tokenize(rows: list[dict[str, Any]], model: Path) -> tuple[list[list[int]], np.ndarray]:
    """mlx_lm's ChatDataset.process: the chat template's ids, and with mask_prompt the prompt length.

    The prompt is every message but the last, plus the assistant header: only
    the last assistant turn is trained.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids, offsets = [], []
    for row in rows:
        messages = row["messages"]
        ids.append(list(tokenizer.apply_chat_template(messages, return_dict=False)))
        generation = messages[-1].get("role") == "assistant"
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=generation, return_dict=False)
        offsets.append(len(prompt))
    return ids, np.asarray(offsets, dtype=np.int64)


def mlx_lm_plan(
    rows: list[dict[str, Any]], ids: list[list[int]], offsets: np.ndarray, k: Knobs, order: str
) -> StepPlan:
    """The tokens of mlx_lm's first ``k.steps`` batches (its ``iterate_batches`` and ``default_loss``).

    ``order`` is how it sorts before cutting batches: ``raw`` is what mlx-lm
    0.32 does (``CacheDataset.itemlen`` is the length of the raw record, 1 for
    every chat row, so the file order stays; ml-explore/mlx-lm#596), ``tokens``
    is the intended sort by token count.  Consecutive batches are then
    shuffled with numpy's global RNG, which ``lora.run`` seeds with ``seed``.
    Targets are positions ``offset..length`` of each row; ``length`` itself is
    one past the end, a padding target mlx_lm counts and trains on
    (ml-explore/mlx-lm#1697).
    """
    n, size = len(rows), k.batch_size
    key: Callable[[int], int] = (lambda i: len(rows[i])) if order == "raw" else (lambda i: len(ids[i]))
    idx = sorted(range(n), key=key)
    batches = [idx[i : i + size] for i in range(0, n - size + 1, size)]
    rng = np.random.RandomState(k.seed)
    drawn: list[list[int]] = []
    while len(drawn) < k.steps:
        drawn.extend(batches[i] for i in rng.permutation(len(batches)))
    steps = StepPlan([], [], [])
    for batch in drawn[: k.steps]:
        raw = [len(ids[i]) for i in batch]
        width = min(1 + PAD_MULTIPLE * (-(-max(raw) // PAD_MULTIPLE)), k.max_seq_len)
        kept = [min(length, k.max_seq_len) for length in raw]
        steps.real.append(sum(kept))
        steps.positions.append(len(batch) * (width - 1))
        # default_loss: targets t + 1 in [offset, length], of which the model sees columns 1 .. width - 1
        ends = [min(length, width - 1) for length in kept]
        starts = [max(int(offsets[i]), 1) for i in batch]
        steps.supervised.append(sum(max(0, end - start + 1) for start, end in zip(starts, ends, strict=True)))
    return steps


def compare_ids(split: Any, ids: list[list[int]], max_len: int) -> dict[str, int]:
    """Input ids must match token for token (after truncation), or the stacks train on different text."""
    if len(split) != len(ids):
        return {"examples": len(ids), "differing": -1, "dropped_by_tunelab": len(ids) - len(split)}
    differing = sum(a.tolist() != b[:max_len] for a, b in zip(split.input_ids, ids, strict=True))
    return {"examples": len(ids), "differing": differing, "dropped_by_tunelab": 0}


# --------------------------------------------------------------------------- running


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``), as cpu_vs_trainer.py."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    launched: float  # epoch seconds, to line up with timestamps the child records
    wall_s: float
    cpu_s: float  # the child's user+system time (os.wait4), its children included
    others: float | None  # mean cores used by other processes meanwhile


def child_env(run_dir: Path, kernels: Path, extra: dict[str, str]) -> dict[str, str]:
    """The inherited environment (thread settings untouched), private state dirs and the stack's BLAS.

    ``TMPDIR`` is where MLX keeps the C++ kernels it compiles for ``mx.compile``
    on a CPU (``$TMPDIR/mlx/<version>/cpu``).  Building them runs the system
    compiler, about 10 s for a cold cache, so the benchmark controls the cache.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNELAB_BLAS")}
    kernels.mkdir(parents=True, exist_ok=True)
    env.update(
        TUNELAB_HOME=str(run_dir / "tunelab-home"),
        TMPDIR=str(kernels),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        **extra,
    )
    return env


def timed(cmd: list[str], run_dir: Path, env: dict[str, str]) -> Timing:
    with (run_dir / "log.txt").open("wb") as log:
        busy_before = _busy_cpu_s()
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy_after = _busy_cpu_s()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} ... exited with {proc.returncode} in {run_dir}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    others = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before - cpu) / wall)
    return Timing(launched, wall, cpu, others)


def _utc(text: str) -> float:
    """A registry timestamp (naive UTC text in SQLite) as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def run_tunelab(
    run_dir: Path, data_dir: Path, model: Path, k: Knobs, blas: Blas, plan: StepPlan, rep: int, kernels: Path
) -> Run:
    """``python -m tunelab train cfg.yaml``; phase marks come from tunelab's run registry.

    The run row is written once the CLI is up, the dataset row right after
    tokenization, the model row once model, LoRA and optimizer are ready, and
    one metrics row per step.
    """
    cfg_path, out, result = run_dir / "cfg.yaml", run_dir / "out", run_dir / "child.json"
    cfg_path.write_text(yaml.safe_dump(tunelab_config(data_dir, model, out, k), sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-c", _TUNELAB_CHILD, str(result), str(cfg_path)]
    timing = timed(cmd, run_dir, child_env(run_dir, kernels, blas.env("tunelab")))
    child = json.loads(result.read_text(encoding="utf-8"))
    losses = [row["train_loss"] for row in read_jsonl(out / "metrics.jsonl") if "train_loss" in row]
    db = sqlite3.connect(run_dir / "tunelab-home" / "tunelab.db")
    try:
        (created, final_metrics) = db.execute("SELECT created_at, final_metrics FROM runs").fetchone()
        (data_ready,) = db.execute("SELECT created_at FROM datasets").fetchone()
        (model_ready,) = db.execute("SELECT created_at FROM models").fetchone()
        rows = db.execute("SELECT created_at FROM metrics WHERE name = 'train_loss' ORDER BY step").fetchall()
    finally:
        db.close()
    ends = [_utc(r[0]) for r in rows]
    probe = child["blas"]["probe_s"]
    phases = {
        "startup": _utc(created) - timing.launched,
        "data": _utc(data_ready) - _utc(created),
        "model": _utc(model_ready) - _utc(data_ready),
        "first_step": ends[0] - _utc(model_ready),
        "steps": ends[-1] - ends[0],
        "validation": 0.0,
        "finish": timing.launched + timing.wall_s - ends[-1] - probe,
    }
    return Run(
        stack="tunelab",
        rep=rep,
        wall_s=timing.wall_s - probe,
        cpu_s=timing.cpu_s,
        others=timing.others,
        phases=phases,
        step_s=list(np.diff(ends)),
        own_tokens_per_s=float(json.loads(final_metrics)["tokens_per_sec"]),
        real_tokens=sum(plan.real),
        positions=sum(plan.positions),
        final_loss=float(losses[-1]),
        blas=child["blas"],
    )


def run_mlx_lm(
    run_dir: Path, data_dir: Path, model: Path, k: Knobs, blas: Blas, rep: int, kernels: Path
) -> tuple[Run, list[int]]:
    """``mlx_lm.lora -c cfg.yaml`` (with the BLAS preloaded); returns the run and its per-step target counts."""
    cfg_path, result = run_dir / "lora.yaml", run_dir / "child.json"
    cfg = mlx_lm_config(data_dir, model, run_dir / "adapters", k)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-c", _MLX_LM_CHILD, str(result), str(cfg_path)]
    timing = timed(cmd, run_dir, child_env(run_dir, kernels, blas.env("mlx_lm")))
    child = json.loads(result.read_text(encoding="utf-8"))
    marks, steps, vals = child["marks"], child["steps"], child["vals"]
    if len(steps) != k.steps:
        raise RuntimeError(f"mlx_lm reported {len(steps)} steps, expected {k.steps}; see {run_dir / 'log.txt'}")
    ends = [s["t"] for s in steps]
    # Validation runs at the start of iterations 1 and N, before the step; it is timed by mlx_lm itself.
    val_first = sum(v["val_time"] for v in vals if v["iteration"] == 0)
    val_rest = sum(v["val_time"] for v in vals if v["iteration"] > 0)
    trained = [int(s["trained_tokens"]) for s in steps]
    targets = [trained[0], *np.diff(trained).tolist()]
    compute = [1.0 / s["iterations_per_second"] for s in steps]  # its train_time per step (steps_per_report=1)
    probe = child["blas"]["probe_s"]
    phases = {
        "startup": marks["imported"] - timing.launched,
        "data": marks["data_loaded"] - marks["model_loaded"],
        "model": (marks["model_loaded"] - marks["imported"]) + (marks["loop_start"] - marks["data_loaded"]),
        "first_step": ends[0] - marks["loop_start"] - val_first,
        "steps": ends[-1] - ends[0] - val_rest,
        "validation": val_first + val_rest,
        "finish": timing.launched + timing.wall_s - ends[-1] - probe,
    }
    run = Run(
        stack="mlx_lm",
        rep=rep,
        wall_s=timing.wall_s - probe,
        cpu_s=timing.cpu_s,
        others=timing.others,
        phases=phases,
        step_s=list(np.diff(ends)),
        own_tokens_per_s=trained[-1] / sum(compute),
        real_tokens=0,  # filled in once the batches are identified
        positions=0,
        final_loss=float(steps[-1]["train_loss"]),
        blas=child["blas"],
        compute_step_s=compute[1:],
    )
    if val_rest:
        run.step_s[-1] -= val_rest  # the last interval holds the closing validation
    return run, [int(t) for t in targets]


# --------------------------------------------------------------------------- setup facts


def resolve_blas(choice: str) -> Blas:
    from tunelab.backends.mlx.blas import candidate_paths

    if choice == "reference":
        return Blas("reference", None)
    if choice != "openblas":
        if not Path(choice).is_file():
            raise SystemExit(f"--blas {choice}: no such file")
        return Blas("path", choice)
    for path in candidate_paths():
        if "openblas" in Path(path).name and Path(path).is_file():
            return Blas("openblas", path)
    raise SystemExit("--blas openblas: no OpenBLAS found (apt-get install libopenblas0-pthread), or pass a path")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mlx", "mlx-lm", "tunelab", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def base_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                total += int(np.prod(f.get_slice(name).get_shape()))
    return total


def lora_params(model_dir: Path, rank: int) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    shapes.append((inter, hidden))
    return config["num_hidden_layers"] * sum(rank * (i + o) for i, o in shapes)


# --------------------------------------------------------------------------- report


def summarise(runs: list[Run], plans: dict[str, StepPlan]) -> dict[str, Any]:
    """Per-stack medians of per-run values, and the ratios (tunelab over mlx_lm, higher = tunelab faster)."""
    out: dict[str, Any] = {}
    for stack in STACKS:
        mine = [r for r in runs if r.stack == stack]
        plan = plans[stack]
        out[stack] = {
            "wall_s": median([r.wall_s for r in mine]),
            "wall_range": spread([r.wall_s for r in mine]),
            "cpu_s": median([r.cpu_s for r in mine]),
            "own_tokens_per_s": median([r.own_tokens_per_s for r in mine]),
            "loop_tokens_per_s": median([r.real_tokens / r.loop_s for r in mine]),
            "loop_positions_per_s": median([r.positions / r.loop_s for r in mine]),
            "wall_tokens_per_s": median([r.real_tokens / r.wall_s for r in mine]),
            "loop_s": median([r.loop_s for r in mine]),
            "before_first_step_s": median([r.phases["startup"] + r.phases["data"] + r.phases["model"] for r in mine]),
            "phases": {p: median([r.phases[p] for r in mine]) for p in PHASES},
            "step_s_median": median([s for r in mine for s in r.step_s]),
            "compute_step_s_median": median([s for r in mine for s in r.compute_step_s]) if stack == "mlx_lm" else None,
            "final_loss": median([r.final_loss for r in mine]),
            "real_tokens": sum(plan.real),
            "positions": sum(plan.positions),
            "supervised": sum(plan.supervised),
            "blas_gflops": median([r.blas["gflops"] for r in mine]),
            "blas_libraries": sorted({str(r.blas["cblas"]) for r in mine}),
            "cpu_per_loop_s": median([r.cpu_s / r.wall_s for r in mine]),
        }
    others = [r.others for r in runs if r.others is not None]
    out["max_other_cores"] = max(others) if others else None
    t, m = out["tunelab"], out["mlx_lm"]
    out["ratio_loop_tokens_per_s"] = t["loop_tokens_per_s"] / m["loop_tokens_per_s"]
    out["ratio_wall_tokens_per_s"] = t["wall_tokens_per_s"] / m["wall_tokens_per_s"]
    out["ratio_own_tokens_per_s"] = t["own_tokens_per_s"] / m["own_tokens_per_s"]
    out["ratio_positions_per_s"] = t["loop_positions_per_s"] / m["loop_positions_per_s"]
    out["ratio_wall"] = m["wall_s"] / t["wall_s"]
    return out


def blas_name(path: str | None) -> str:
    return "reference (bundled in libmlx)" if path in (None, "None") else str(path)


def print_report(summary: dict[str, Any], k: Knobs, reps: int) -> None:
    t, m = summary["tunelab"], summary["mlx_lm"]
    print(f"\n{k.steps} steps x batch {k.batch_size}, {reps} runs per stack; medians:")
    print(
        f"{'stack':<8} {'wall s':>7} {'(range)':>12} {'CPU s':>6} {'own tok/s':>10} {'loop tok/s':>11} "
        f"{'wall tok/s':>11} {'pos/s':>7} {'real tok':>9} {'positions':>10} {'final loss':>10}"
    )
    for name, s in (("tunelab", t), ("mlx_lm", m)):
        print(
            f"{name:<8} {s['wall_s']:>7.2f} {s['wall_range']:>12} {s['cpu_s']:>6.1f} {s['own_tokens_per_s']:>10.0f} "
            f"{s['loop_tokens_per_s']:>11.0f} {s['wall_tokens_per_s']:>11.0f} {s['loop_positions_per_s']:>7.0f} "
            f"{s['real_tokens']:>9} {s['positions']:>10} {s['final_loss']:>10.4f}"
        )
    print("  own tok/s: each stack's report (tunelab: real tokens per step second; mlx_lm: loss targets per")
    print("  second of its step timer), so not comparable with each other.  loop tok/s: real (non-pad) tokens")
    print("  / training-loop seconds (model ready -> last step, validation out), same count and clock for both.")
    print("  wall tok/s: real tokens / whole process.  pos/s: positions computed (padding included) / loop s.")
    print("  Losses differ by construction (different batches and supervised tokens).")
    print("\nwhere the time goes (median seconds):")
    print(f"{'phase':<12} {'tunelab':>8} {'mlx_lm':>8}   what")
    for p in PHASES:
        print(f"{p:<12} {t['phases'][p]:>8.2f} {m['phases'][p]:>8.2f}   {PHASE_HELP[p]}")
    print(
        f"{'to step 1':<12} {t['before_first_step_s']:>8.2f} {m['before_first_step_s']:>8.2f}   startup + data + model"
    )
    print(f"{'loop':<12} {t['loop_s']:>8.2f} {m['loop_s']:>8.2f}   first_step + steps")
    print(f"{'per step':<12} {t['step_s_median']:>8.3f} {m['step_s_median']:>8.3f}   median over steps 2..N")
    print(f"{'  compute':<12} {'':>8} {m['compute_step_s_median']:>8.3f}   mlx_lm's own step timer (no batch build)")
    if summary["max_other_cores"] is not None and summary["max_other_cores"] > 0.25:
        print(
            f"\nnote: other processes used up to {summary['max_other_cores']:.2f} cores during some runs; "
            "wall times are noisy"
        )
    print(
        "\npositions/s ratio (tunelab / mlx_lm, compute speed per padded position): "
        f"{summary['ratio_positions_per_s']:.2f}x"
    )
    print(f"whole-process tokens/s ratio (tunelab / mlx_lm): {summary['ratio_wall_tokens_per_s']:.2f}x")
    print(f"tokens/s ratio (tunelab mlx / mlx_lm lora, median): {summary['ratio_loop_tokens_per_s']:.2f}x")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default 30; {REFERENCE_STEPS} with reference)")
    p.add_argument("--reps", type=int, default=3, help="runs per stack, alternating (default 3)")
    p.add_argument(
        "--blas",
        default="openblas",
        help="openblas (default: the OpenBLAS tunelab finds, LD_PRELOADed for mlx_lm), reference (MLX's bundled "
        "netlib BLAS in both; slow), or a path to a CBLAS library for both",
    )
    p.add_argument(
        "--cold-kernels",
        action="store_true",
        help="give every run an empty MLX kernel cache (times a first run: mx.compile builds its CPU kernels "
        "with the system compiler); default: one cache, filled by an untimed 1-step run of each stack",
    )
    p.add_argument(
        "--tunelab-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ablation: set a tunelab config value, e.g. train.compile=false (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0, help="tunelab alpha; mlx_lm gets scale = alpha / rank")
    p.add_argument("--examples", type=int, default=1000, help="generated training conversations")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=4000, help="requested tokenizer vocabulary")
    p.add_argument("--workdir", type=Path, help="keep data, model and runs here (reused when the specs match)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    blas = resolve_blas(args.blas)
    steps = args.steps or (REFERENCE_STEPS if blas.path is None else 30)
    options = tuple((key, yaml.safe_load(value)) for key, _, value in (o.partition("=") for o in args.tunelab_option))
    k = Knobs(steps, args.batch_size, args.lr, args.max_seq_len, args.rank, args.alpha, 0, options)
    data_spec = DataSpec(examples=args.examples)
    # mlx_lm validates at step 1 and step N whatever its options; one batch of short chats keeps that cheap.
    valid_spec = DataSpec(examples=args.batch_size, seed=1, user_words=(5, 20), assistant_words=(5, 20))
    model_spec = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": 8,
        "num_kv_heads": 4,
        "intermediate_size": 688 * args.hidden // 256,
    }
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunelab-mlx-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        data_dir, model = prepare_inputs(workdir, data_spec, valid_spec, model_spec)
        rows = read_jsonl(data_dir / "train.jsonl")
        split, tl_plan = tunelab_plan(data_dir, model, k)
        mlx_ids, offsets = mlx_lm_tokenize(rows, model)
        candidates = {order: mlx_lm_plan(rows, mlx_ids, offsets, k, order) for order in ("raw", "tokens")}
        check = compare_ids(split, mlx_ids, k.max_seq_len)
        ver = versions()
        params, trainable = base_params(model), lora_params(model, k.rank)
        lengths = split.lengths
        print("versions: " + ", ".join(f"{name} {v}" for name, v in ver.items()))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
        if k.tunelab_options:
            print("ABLATION, tunelab config changed: " + ", ".join(f"{key}={v!r}" for key, v in k.tunelab_options))
        blas_line = "MLX's bundled reference BLAS" if blas.path is None else blas.path
        how = "TUNELAB_BLAS=reference, nothing preloaded" if blas.path is None else "tunelab loads it; LD_PRELOAD"
        print(f"BLAS asked for: {blas_line} ({how}); what each child used is measured inside it")
        print(
            f"model: llama, hidden {args.hidden}, {args.layers} layers, vocab {model_spec['vocab_size']} "
            f"(untied head): {params / 1e6:.2f}M params fp32; LoRA r={k.rank} alpha={k.alpha:g} (mlx_lm scale "
            f"{k.scale:g}) on {', '.join(TARGETS)}: {trainable:,} trainable"
        )
        print(
            f"data: {len(rows)} chat examples, mean {lengths.mean():.0f} tokens (p50 {np.median(lengths):.0f}, "
            f"max {max(len(x) for x in mlx_ids)}, {split.truncated} truncated to {k.max_seq_len}); valid.jsonl: "
            f"{valid_spec.examples} short chats (mlx_lm validates 1 batch at steps 1 and N)"
        )
        if check["differing"] == 0:
            print("data check: input ids identical in both stacks for every example")
        else:
            print(f"WARNING: input ids differ between the stacks: {check}")
        print(f"setup: {time.perf_counter() - started:.1f}s", flush=True)

        shared_kernels = workdir / "mlx-kernels"
        shutil.rmtree(shared_kernels, ignore_errors=True)
        if not args.cold_kernels:
            # Both stacks build their compiled-step kernels into one fresh cache, untimed, so the timed
            # runs see what a user sees from the second run on; --cold-kernels times the first run instead.
            warm = replace(k, steps=1)  # every step runs the same compiled graph
            for stack in STACKS:
                run_dir = workdir / "runs" / f"warmup-{stack}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if stack == "tunelab":
                    run = run_tunelab(run_dir, data_dir, model, warm, blas, tl_plan, -1, shared_kernels)
                else:
                    run, _ = run_mlx_lm(run_dir, data_dir, model, warm, blas, -1, shared_kernels)
                print(f"  warm-up {stack:<8} (1 step, untimed, fills the MLX kernel cache): {run.wall_s:.1f}s")
        print(f"timing {args.reps} x 2 runs ...", flush=True)
        runs: list[Run] = []
        reported: list[list[int]] = []
        for rep in range(args.reps):
            for stack in STACKS:
                run_dir = workdir / "runs" / f"{stack}-{rep}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                kernels = run_dir / "mlx-kernels" if args.cold_kernels else shared_kernels
                if stack == "tunelab":
                    run = run_tunelab(run_dir, data_dir, model, k, blas, tl_plan, rep, kernels)
                else:
                    run, targets = run_mlx_lm(run_dir, data_dir, model, k, blas, rep, kernels)
                    reported.append(targets)
                runs.append(run)
                busy = "" if run.others is None else f", other processes {run.others:.2f} cores"
                print(
                    f"  {stack:<8} rep {rep}: {run.wall_s:6.2f}s wall, {run.cpu_s:6.1f}s CPU, loop "
                    f"{run.loop_s:6.2f}s, loss {run.final_loss:.4f}, BLAS {run.blas['gflops']:.0f} GFLOP/s{busy}",
                    flush=True,
                )

        # Which batches did mlx_lm draw?  Its per-step target counts identify them.
        order = next((o for o, plan in candidates.items() if all(r == plan.supervised for r in reported)), None)
        if order is None:
            print("WARNING: mlx_lm's per-step target counts match no reconstruction of its batches; its real-token")
            print("         counts below assume the mlx-lm 0.32 order and are estimates")
        ml_plan = candidates[order or "raw"]
        for run in runs:
            if run.stack == "mlx_lm":
                run.real_tokens, run.positions = sum(ml_plan.real), sum(ml_plan.positions)
        plans = {"tunelab": tl_plan, "mlx_lm": ml_plan}
        summary = summarise(runs, plans)
        summary["mlx_lm_batch_order"] = order
        print(
            f"\nbatches: tunelab groups by length ({sum(tl_plan.real) / sum(tl_plan.positions):.1%} of computed "
            f"positions are real tokens); mlx_lm "
            + (
                "keeps file order (its length sort is a no-op in this version, mlx-lm#596)"
                if order == "raw"
                else "sorts by token length"
                if order == "tokens"
                else "order unverified"
            )
            + f" ({sum(ml_plan.real) / sum(ml_plan.positions):.1%} real)."
        )
        print(
            f"loss targets: tunelab {sum(tl_plan.supervised):,} (every assistant turn), "
            f"mlx_lm {sum(ml_plan.supervised):,} (last assistant turn only, plus one padding target per row, "
            "mlx-lm#1697)"
        )
        for stack in STACKS:
            s = summary[stack]
            libs = ", ".join(blas_name(p) for p in s["blas_libraries"])
            print(f"BLAS in {stack}: {libs}; MLX 512x512 fp32 matmul {s['blas_gflops']:.0f} GFLOP/s (median of runs)")
        expected = {blas_name(blas.path)}
        for stack in STACKS:
            if {blas_name(p) for p in summary[stack]["blas_libraries"]} != expected:
                print(f"WARNING: {stack} did not run on the BLAS asked for ({blas_name(blas.path)})")
        print_report(summary, k, args.reps)
        print(f"whole benchmark: {time.perf_counter() - started:.0f}s")

        args.results.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": date.today().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": ver,
            "blas": asdict(blas),
            "knobs": {**asdict(k), "scale": k.scale, "targets": list(TARGETS)},
            "model": {**model_spec, "params": params, "trainable": trainable},
            "data": {
                "examples": len(rows),
                "mean_tokens": float(lengths.mean()),
                "truncated": split.truncated,
                "ids_check": check,
                "valid_examples": valid_spec.examples,
            },
            "plans": {name: asdict(plan) for name, plan in plans.items()},
            "summary": summary,
            "runs": [{**asdict(r), "loop_s": r.loop_s} for r in runs],
        }
        args.results.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"results: {args.results}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
