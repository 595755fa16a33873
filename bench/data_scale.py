"""Data at scale: a ~2 GB chat JSONL trains with bounded memory; tokenization throughput; cache-hit time.

Run ``python bench/data_scale.py`` (``--help`` for the knobs).  It writes a
synthetic chat JSONL of ``--gb`` gigabytes (1-3 turns, word counts drawn from
a log-normal, so lengths are skewed like real instruction data) and a tiny
Llama-shaped model whose tokenizer is trained on the same words, then runs,
each in a fresh subprocess whose resident memory is sampled every 50 ms:

1. tokenization alone on the first ``--subset-mb`` MB, ``data.num_proc`` 1 vs
   every core (cache off): tokens/s of each, and their ratio;
2. the old path on the same subset (every record read into a list, tokenized
   in memory, as tunelab did before the cache): its peak RSS, scaled to the
   full file, beside the streaming path's;
3. ``tunelab train`` on the whole file, cold (tokenize + cache) and again
   (cache hit): wall time, and peak RSS of the main process and of the whole
   process tree (tokenizer workers included).  Peak RSS must stay <= 4 GB.

Figures are printed and written to ``bench/results/data_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / f"data_scale-{os.cpu_count()}cores.json"
WORDS = [
    "the",
    "a",
    "an",
    "cat",
    "dog",
    "bird",
    "fish",
    "sat",
    "on",
    "mat",
    "ran",
    "fast",
    "slowly",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "house",
    "tree",
    "river",
    "model",
    "data",
    "train",
    "loss",
    "token",
    "learns",
    "reads",
    "writes",
    "quiet",
    "bright",
    "over",
    "under",
    "near",
    "what",
    "is",
    "answer",
    "question",
    "please",
    "tell",
    "me",
    "hello",
    "hi",
    "thanks",
    "you",
    "are",
    "helpful",
    "assistant",
    "user",
    "system",
    "tool",
    "result",
    "sum",
    "two",
    "three",
    "four",
]
RSS_LIMIT = 4 * 2**30


# --------------------------------------------------------------------------- inputs


def make_pool(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct chat records as JSON lines; user turns ~e^3 words, answers ~e^5 (long tail)."""
    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)
    lines = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(int(rng.integers(1, 4))):
            for role, mu in (("user", 3.0), ("assistant", 5.0)):
                count = int(min(4000, rng.lognormal(mu, 0.9))) + 1
                messages.append({"role": role, "content": " ".join(rng.choice(words, count))})
        lines.append(json.dumps({"messages": messages}) + "\n")
    return lines


def write_jsonl(path: Path, size_bytes: int, pool: list[str]) -> int:
    """Cycle the pool until the file holds ``size_bytes``; returns the record count."""
    block = "".join(pool).encode()
    records = 0
    with path.open("wb") as fh:
        while fh.tell() < size_bytes:
            fh.write(block)
            records += len(pool)
    return records


def make_model(out: Path) -> Path:
    from tunelab.tiny import make_tiny_checkpoint

    texts = [" ".join(WORDS[i : i + 12]) for i in range(len(WORDS))] * 20
    sizes = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
    return make_tiny_checkpoint(out, texts, vocab_size=400, **sizes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    """One subprocess: wall time, peak memory, and what it printed.

    ``peak_rss`` is the main process's; ``peak_tree_rss`` adds every child's
    (tokenizer workers, fork server), which counts pages they share with each
    other once per process; ``peak_tree_pss`` splits shared pages between the
    processes that map them, so it is the tree's real footprint.
    """

    wall_s: float
    peak_rss: int
    peak_tree_rss: int
    peak_tree_pss: int
    report: dict[str, Any]


def measure(cmd: list[str], env: dict[str, str], log: Path) -> Measured:
    """Run ``cmd``, sampling memory every 50 ms; its last stdout line may be a JSON report."""
    import psutil

    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
        peaks = [0, 0, 0]
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    now = [_memory(root, "rss"), sum(_memory(p, "rss") for p in tree)]
                    now.append(sum(_memory(p, "pss") for p in tree))
                except psutil.Error:
                    break
                peaks[:] = [max(a, b) for a, b in zip(peaks, now, strict=True)]
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    log.write_text(log.read_text() + stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return Measured(wall, *peaks, json.loads(lines[-1]) if lines else {})


def _memory(proc: Any, kind: str) -> int:
    """RSS, or PSS where the platform reports it (Linux); 0 for a process that just exited."""
    try:
        if kind == "pss":
            info = proc.memory_full_info()
            return int(getattr(info, "pss", info.rss))
        return int(proc.memory_info().rss)
    except Exception:
        return 0


# --------------------------------------------------------------------------- child modes


def child_tokenize(data: str, model: str, num_proc: int, max_seq_len: int) -> None:
    """Streaming path (what training uses), cache off: print tokens, rows and seconds."""
    from tunelab.config.schema import DataCfg
    from tunelab.data.prepare import prepare_data
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(Path(model))
    cfg = DataCfg(train=data, max_seq_len=max_seq_len, cache=False, num_proc=num_proc)
    start = time.perf_counter()
    prepared = prepare_data(cfg, tokenizer)
    seconds = time.perf_counter() - start
    tokens = int(prepared.train.lengths.sum())
    print(json.dumps({"tokens": tokens, "rows": len(prepared.train), "seconds": seconds}))


def child_in_memory(data: str, model: str, max_seq_len: int) -> None:
    """The old path: every record in a list, tokenized into in-memory arrays."""
    from tunelab.data.formats import to_samples
    from tunelab.data.sources import read_records
    from tunelab.data.templates import template_for
    from tunelab.data.tokenize import tokenize_samples
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(Path(model))
    start = time.perf_counter()
    records = read_records(Path(data))
    template, _ = template_for(tokenizer)
    split = tokenize_samples(
        to_samples(records, "chat"), tokenizer, template=template, max_seq_len=max_seq_len, mask_prompt=True
    )
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": int(split.lengths.sum()), "rows": len(split), "seconds": seconds}))


# --------------------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunelab-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNELAB_HOME": str(work / "home"), "TOKENIZERS_PARALLELISM": "true"}
    env.pop("TUNELAB_DB_URL", None)
    model = make_model(work / "model") if not (work / "model" / "config.json").exists() else work / "model"
    pool = make_pool(4000)
    big, subset = work / "train.jsonl", work / "subset.jsonl"
    if not big.exists() or big.stat().st_size < args.gb * 1e9:
        print(f"writing {args.gb:g} GB of chat JSONL to {big} ...", flush=True)
        write_jsonl(big, int(args.gb * 1e9), pool)
    write_jsonl(subset, int(args.subset_mb * 1e6), pool)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    me = [sys.executable, str(Path(__file__).resolve())]
    out: dict[str, Any] = {"gb": big.stat().st_size / 1e9, "subset_mb": subset.stat().st_size / 1e6, "cores": cores}

    for n in sorted({1, cores}):
        print(f"tokenizing {out['subset_mb']:.0f} MB with num_proc={n} ...", flush=True)
        m = measure(
            [*me, "--child", "tokenize", str(subset), str(model), str(n), str(args.max_seq_len)],
            env,
            work / f"tokenize-{n}.log",
        )
        mb_per_s = out["subset_mb"] / m.report["seconds"]
        out[f"tokenize_np{n}"] = {
            **asdict(m),
            "tokens_per_s": m.report["tokens"] / m.report["seconds"],
            "mb_per_s": mb_per_s,
        }
    print("old in-memory path on the subset ...", flush=True)
    m = measure(
        [*me, "--child", "memory", str(subset), str(model), "1", str(args.max_seq_len)], env, work / "in-memory.log"
    )
    out["in_memory_subset"] = asdict(m)

    train = [sys.executable, "-m", "tunelab", "train", str(_config(work, model, big, args))]
    for name in ("cold", "warm"):
        print(f"tunelab train on {out['gb']:.2f} GB ({name}) ...", flush=True)
        shutil.rmtree(work / f"run-{name}", ignore_errors=True)
        m = measure([*train, f"output_dir={work / f'run-{name}'}"], env, work / f"train-{name}.log")
        out[f"train_{name}"] = asdict(m)
    if not (args.keep or args.workdir):
        shutil.rmtree(work, ignore_errors=True)
    return out


def _config(work: Path, model: Path, data: Path, args: argparse.Namespace) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": args.max_seq_len},
        "method": {"name": "lora", "rank": 4, "alpha": 8},
        "train": {"steps": args.steps, "batch_size": 4, "lr": 1e-3},
        "backend": "torch",
        "tensorboard": False,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def report(out: dict[str, Any]) -> None:
    gib = 2**30
    print(f"\n== data at scale: {out['gb']:.2f} GB chat JSONL, {out['cores']} cores ==")
    one, alln = out["tokenize_np1"], out[f"tokenize_np{out['cores']}"]
    print(f"tokenization ({out['subset_mb']:.0f} MB subset, streaming, cache off; tokens kept after truncation):")
    print(f"  num_proc=1           {one['tokens_per_s']:>12,.0f} tokens/s  {one['mb_per_s']:6.1f} MB/s")
    print(
        f"  num_proc={out['cores']:<3}         {alln['tokens_per_s']:>12,.0f} tokens/s  {alln['mb_per_s']:6.1f} MB/s  "
        f"({alln['tokens_per_s'] / one['tokens_per_s']:.2f}x)"
    )
    mem = out["in_memory_subset"]
    scale = out["gb"] * 1e3 / out["subset_mb"]
    print(
        f"peak RSS on the subset: old in-memory path {mem['peak_rss'] / gib:.2f} GiB, "
        f"streaming {one['peak_rss'] / gib:.2f} GiB"
    )
    print(
        f"  old path scaled to the full file: ~{mem['peak_rss'] * scale / gib:.1f} GiB; "
        f"its tokenization time ~{mem['report']['seconds'] * scale:.0f} s on one core"
    )
    cold, warm = out["train_cold"], out["train_warm"]
    print(f"tunelab train: {out['gb'] * 1e3 / cold['wall_s']:.1f} MB/s of JSONL end to end when cold")
    for name, m in (("cold (tokenize + cache)", cold), ("warm (cache hit)", warm)):
        print(
            f"tunelab train {name:<24} {m['wall_s']:>8.1f} s   peak RSS {m['peak_rss'] / gib:.2f} GiB "
            f"(tree: RSS {m['peak_tree_rss'] / gib:.2f} GiB, PSS {m['peak_tree_pss'] / gib:.2f} GiB)"
        )
    print(f"  cache hit is {cold['wall_s'] / warm['wall_s']:.1f}x faster end to end")
    worst = max(cold["peak_rss"], warm["peak_rss"])
    print(f"peak RSS {'within' if worst <= RSS_LIMIT else 'ABOVE'} the 4 GiB limit ({worst / gib:.2f} GiB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="size of the generated JSONL (GB)")
    p.add_argument("--subset-mb", type=float, default=64, help="size of the throughput / old-path subset (MB)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each training run")
    p.add_argument("--workdir", help="keep inputs here (reused across runs) instead of a temp dir")
    p.add_argument("--keep", action="store_true", help="do not delete the work dir")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, data, model, num_proc, max_len = args.child
        if mode == "tokenize":
            child_tokenize(data, model, int(num_proc), int(max_len))
        else:
            child_in_memory(data, model, int(max_len))
        return
    out = run(args)
    report(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
