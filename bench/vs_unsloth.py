"""`tunelab train` beside Unsloth on one GPU: the same checkpoint, shapes and steps; tok/s, peak memory, ratios.

One command on one lease (see ../shared/gpu/README.md for the Unsloth tree it needs):

    mkdir -p /tmp/site_us && tar -xJf .gpu/unsloth-site-cp312.tar.xz -C /tmp/site_us
    PYTHONUNBUFFERED=1 python3 bench/vs_unsloth.py --unsloth-site /tmp/site_us --rows lora_gc,qlora_gc

What each side runs, as its users run it:

* **tunelab**: ``python -m tunelab train CONFIG`` in a process of its own (a fresh ``TUNELAB_HOME``),
  on a ``text`` dataset whose every record is longer than the row, so each micro-batch is B full rows
  of T tokens with every position supervised: bf16 base (NF4 for qlora), LoRA r16 α32 on the seven
  linears, AdamW, constant LR, ``train.steps`` steps, everything else tunelab's defaults (compiled
  layers, fused loss; with checkpointing, offloaded checkpoints where they apply).  tok/s is the
  median of the per-step ``tokens_per_sec`` that the run logs, after the warm-up steps; peak is the
  run's recorded ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` over the whole process,
  loading included); the estimate is ``tunelab estimate CONFIG --json``'s tensor bytes.
* **Unsloth**: ``unsloth_step.py`` (from ../shared/gpu/): ``FastLanguageModel`` on the same folder, the
  same LoRA, ``use_gradient_checkpointing="unsloth"`` for the checkpointed rows, fused AdamW, random
  tokens B×T with every position supervised, median step after the same warm-up, peak reset after
  loading.  It runs in a process of its own because importing Unsloth patches transformers.

Checkpoints are random-initialised from Llama-3.1-8B's and Llama-3.2-1B's config numbers, saved once
under ``--workdir`` (``/dev/shm`` by default: a RAM disk, so building them takes seconds).  Each row
prints as it finishes and is appended to ``$OUT/vs_unsloth.jsonl`` (or ``bench/results/``).
``--longest`` also searches, for 8B QLoRA with checkpointing at batch 1, the longest row each stack
trains in ``--cap-gib`` of GPU memory (``torch.cuda.set_per_process_memory_fraction`` in each process).
``--tiny`` runs the tunelab side on a small CPU model to check the plumbing (no Unsloth).
``--repeat N`` runs every stack N times per row, the order reversed every other round (in session 48 the
stack that ran first in a call was 0.4–2.8% the slower), and the summary gives each stack's median.
``VS_TRAIN='{"offload_mlp": false}'`` merges settings into tunelab's ``train:`` section, for an A/B, and
``VS_DATA='{"packing": true}'`` into its ``data:`` section (packed, the same full rows reach the model with
per-example positions and take the varlen attention).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # tunelab from this checkout, also where it is not installed
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "llama1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "small": dict(
        vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    shape: str
    method: str  # lora | qlora
    batch: int
    seq: int
    gc: bool

    @property
    def unsloth_mode(self) -> str:
        return f"{self.method}_gc" if self.gc else self.method


ROWS = {
    r.name: r
    for r in (
        Row("lora", "llama8b", "lora", 2, 2048, False),
        Row("lora_gc", "llama8b", "lora", 2, 2048, True),
        Row("qlora_gc", "llama8b", "qlora", 2, 2048, True),
        Row("qlora_gc_16k", "llama8b", "qlora", 1, 16384, True),
        Row("1b_lora", "llama1b", "lora", 8, 2048, False),
        Row("tiny_lora_gc", "tiny", "lora", 2, 256, True),
        Row("small_lora_gc", "small", "lora", 4, 512, True),  # a CPU A/B (--stacks tunelab,base), no Unsloth
    )
}


# -- inputs -------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, shape: str) -> Path:
    """A random-initialised bf16 Llama with a small byte-level BPE tokenizer (ids below its vocabulary)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.tiny import train_bpe_tokenizer

    train_bpe_tokenizer(_words(random.Random(0), 20_000).split(), folder, vocab_size=2000)
    config = AutoConfig.for_model("llama", max_position_embeddings=131072, **SHAPES[shape])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder)
    del model
    return folder


def _words(rng: random.Random, n: int) -> str:
    vocab = [f"{a}{b}{c}" for a in "bcdfgklmnprstv" for b in "aeiou" for c in ("", "n", "r", "s", "l")]
    return " ".join(rng.choice(vocab) for _ in range(n))


def write_data(path: Path, rows: int, seq: int) -> Path:
    """Records longer than ``seq`` tokens (truncated to it), so every micro-batch is full rows.

    A file left by an earlier row of the same length is reused only if it holds ``rows`` records.
    """
    if path.exists() and len(path.read_text().splitlines()) >= rows:
        return path
    rng = random.Random(1)
    path.write_text("".join(json.dumps({"text": _words(rng, int(seq * 1.2))}) + "\n" for _ in range(rows)))
    return path


def tunelab_config(row: Row, model: Path, data: Path, steps: int, out: Path) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model), "dtype": "float32" if row.shape in ("tiny", "small") else "bfloat16"},
        "data": {"train": str(data), "format": "text", "max_seq_len": row.seq, "cache": False},
        "method": {"name": row.method, "rank": 16, "alpha": 32, "targets": TARGETS},
        "train": {
            "steps": steps, "batch_size": row.batch, "lr": 1e-4, "scheduler": "constant", "warmup": 0,
            "gradient_checkpointing": row.gc, "log_every": 1, "save_every": 0, "eval_every": 0,
        },
        "tensorboard": False,
        "output_dir": str(out / "run"),
    }  # fmt: skip
    cfg["train"].update(json.loads(os.environ.get("VS_TRAIN", "{}")))  # e.g. {"offload_mlp": false}: an A/B
    cfg["data"].update(json.loads(os.environ.get("VS_DATA", "{}")))  # e.g. {"packing": true}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- the two stacks -----------------------------------------------------------------------------
def run_tunelab(
    row: Row,
    model: Path,
    data: Path,
    steps: int,
    warm: int,
    work: Path,
    cap: float | None,
    site: str,
    src: Path = REPO / "src",
    stack: str = "tunelab",
) -> dict:
    """``tunelab train`` from ``src`` (another tree's, for the ``base`` stack: an A/B on one lease)."""
    out = work / f"tl-{row.name}-{row.seq}-{int(time.time())}"
    out.mkdir(parents=True)
    cfg = tunelab_config(row, model, data, steps, out)
    env = tunelab_env(out, _bitsandbytes_only(Path(site), work), src)
    estimate = _json(subprocess.run([sys.executable, "-m", "tunelab", "estimate", str(cfg), "--json"],
                                    env=env, capture_output=True, text=True))  # fmt: skip
    entry = [sys.executable, "-m", "tunelab", "train", str(cfg)]
    if cap is not None:  # the same process, the same CLI, with the memory cap a smaller card has
        entry = [sys.executable, "-c", _capped_main(cap), "train", str(cfg)]
    started = time.time()
    proc = subprocess.run(entry, env=env, capture_output=True, text=True)
    wall = time.time() - started
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    result: dict[str, Any] = {"stack": stack, "row": row.name, "seq": row.seq, "wall_s": round(wall, 1)}
    if os.environ.get("VS_TRAIN"):
        result["train"] = json.loads(os.environ["VS_TRAIN"])
    if proc.returncode != 0:
        return {**result, "error": _tail(proc.stdout + proc.stderr)}
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    speeds = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m][warm:]
    show = _json(subprocess.run([sys.executable, "-m", "tunelab", "runs", "show", "--json", _run_id(out, env)],
                                env=env, capture_output=True, text=True))  # fmt: skip
    # tokens_per_sec is wall clock between step ends (the loop's own work included); step_tokens_per_sec
    # is the step alone, so their ratio is the loop's overhead (issue 23's GPU figure).
    step_speeds = [m["step_tokens_per_sec"] for m in metrics if "step_tokens_per_sec" in m][warm:]
    step_tok_s = statistics.median(step_speeds) if step_speeds else None
    return {
        **result,
        "tok_s": round(statistics.median(speeds)),
        "step_tok_s": round(step_tok_s) if step_tok_s else None,
        "loop_overhead_pct": round(100 * (step_tok_s / statistics.median(speeds) - 1), 2) if step_tok_s else None,
        "peak_gib": _gib(show.get("peak_memory_bytes")),
        "estimate_gib": _gib((estimate.get("estimate") or estimate).get("tensor_bytes")),
        "estimate_total_gib": _gib(show.get("estimated_memory_bytes")),
        "losses": [round(m["train_loss"], 3) for m in metrics if "train_loss" in m][:: max(1, steps // 4)],
    }


def tunelab_env(out: Path, bnb: Path, src: Path = REPO / "src") -> dict[str, str]:
    """The environment of one `tunelab` process: a fresh TUNELAB_HOME under ``out``, ``src`` and bitsandbytes."""
    path = f"{src}:{bnb}:{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "TUNELAB_HOME": str(out / "home"), "PYTHONPATH": path}


def run_driver(name: str, driver: str, argv: list[str], env: dict[str, str], prefix: str) -> list[str]:
    """``python -c DRIVER ARGV`` (a `tunelab` command wrapped by a bench script); its lines that start with
    ``prefix``, headed by the exit status, with the output's tail when it failed or printed none."""
    proc = subprocess.run([sys.executable, "-c", driver, *argv], env=env, capture_output=True, text=True)
    lines = [f"== {name}: exit {proc.returncode}"]
    lines += [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or len(lines) == 1:
        lines.append(_tail(proc.stdout + proc.stderr, 15))
    return lines


def report_rows(names: list[str], stem: str, one: Any) -> None:
    """Print ``one(name)`` for each row as it finishes, and save it as ``$OUT/<stem>_<name>.txt``."""
    sink = Path(os.environ.get("OUT", REPO / "bench" / "results"))
    sink.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = one(name)
        print(text, flush=True)
        (sink / f"{stem}_{name}.txt").write_text(text + "\n")


def _bitsandbytes_only(site: Path, work: Path) -> Path:
    """A folder holding only the Unsloth tree's bitsandbytes (QLoRA's kernels), for tunelab's side.

    The device image has no bitsandbytes; the tree carried for Unsloth has one.  Putting the whole
    tree on tunelab's path would also swap in that tree's transformers patches and libraries, so
    only bitsandbytes is linked in.
    """
    folder = work / "bnb-only"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in [*site.glob("bitsandbytes"), *site.glob("bitsandbytes-*.dist-info")]:
        link = folder / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return folder


def run_unsloth(row: Row, model: Path, steps: int, site: str, cap: float | None) -> dict:
    script = REPO / ".gpu" / "unsloth_step.py"
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "US_STEPS": str(steps)}
    args = [str(script), row.unsloth_mode, str(model), str(row.batch), str(row.seq)]
    entry = [sys.executable, *args] if cap is None else [sys.executable, "-c", _capped_script(cap), *args]
    started = time.time()
    proc = subprocess.run(entry, env=env, capture_output=True, text=True)
    wall = round(time.time() - started, 1)
    result: dict[str, Any] = {"stack": "unsloth", "row": row.name, "seq": row.seq, "wall_s": wall}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {**result, "error": _tail(proc.stdout + proc.stderr)}
    data = json.loads(line.removeprefix("RESULT "))
    return {**result, "tok_s": data["tok_s"], "peak_gib": data["peak_gib"], "losses": data["losses"]}


def _capped_main(gib: float) -> str:
    return (
        "import sys, torch; torch.cuda.set_per_process_memory_fraction("
        f"{gib} * 2**30 / torch.cuda.get_device_properties(0).total_memory); "
        "sys.argv[0] = 'tunelab'; from tunelab.cli.main import main; main()"
    )


def _capped_script(gib: float) -> str:
    return (
        "import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction("
        f"{gib} * 2**30 / torch.cuda.get_device_properties(0).total_memory); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )


def longest(stack: str, fits: Any, lo: int = 4096, hi: int = 131072, resolution: int = 16) -> int:
    """The longest multiple of 1,024 tokens that ``fits(seq)`` trains (doubling, then bisection to best/resolution)."""
    best = 0
    seq = lo
    while seq <= hi and fits(seq):
        best, seq = seq, seq * 2
    top = min(seq, hi + 1024)
    while top - best > 1024 * max(1, best // (resolution * 1024)):
        mid = (best + top) // 2 // 1024 * 1024
        if fits(mid):
            best = mid
        else:
            top = mid
    return best


# -- helpers ------------------------------------------------------------------------------------
def _json(proc: subprocess.CompletedProcess[str]) -> dict:
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}


def _run_id(out: Path, env: dict[str, str]) -> str:
    """The one run under this fresh TUNELAB_HOME, as `tunelab runs list --json` gives it."""
    runs = subprocess.run([sys.executable, "-m", "tunelab", "runs", "list", "--json"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    return str(json.loads(runs.stdout)[0]["id"])


def _gib(n: int | None) -> float | None:
    return round(n / 2**30, 2) if n else None


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _emit(result: dict, sink: Path) -> None:
    print(json.dumps(result), flush=True)
    with sink.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


def _pooled(results: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Each (stack, row, length)'s runs as one: the median tok/s, the highest peak, and every tok/s in run order."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for r in results:
        if "tok_s" in r:
            runs.setdefault((r["stack"], r["row"], r["seq"]), []).append(r)
    pooled = {}
    for key, group in runs.items():
        speeds = [r["tok_s"] for r in group]
        pooled[key] = {**group[0], "tok_s": round(statistics.median(speeds)), "runs": speeds,
                       "peak_gib": max(r["peak_gib"] for r in group)}  # fmt: skip
    return pooled


def table(results: list[dict]) -> str:
    """The summary: tunelab against Unsloth per row, then each other stack against this tree (medians over
    ``--repeat`` runs, each run's tok/s listed where there were several)."""
    by = _pooled(results)
    lines = [
        "| row | tunelab tok/s | tunelab peak GiB | estimate GiB | Unsloth tok/s | Unsloth peak GiB | speed | memory |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def speed_of(r: dict) -> str:
        runs = r.get("runs", [])
        return f"{r['tok_s']} ({' / '.join(map(str, runs))})" if len(runs) > 1 else str(r.get("tok_s", "fail"))

    for stack, name, seq in sorted({(r["stack"], r["row"], r["seq"]) for r in results}):
        if stack != "tunelab":
            continue
        t, u = by.get(("tunelab", name, seq), {}), by.get(("unsloth", name, seq), {})
        speed = f"{t['tok_s'] / u['tok_s']:.3f}x" if t.get("tok_s") and u.get("tok_s") else "-"
        memory = f"{t['peak_gib'] / u['peak_gib']:.2f}x" if t.get("peak_gib") and u.get("peak_gib") else "-"
        lines.append(
            f"| {name} ({seq}) | {speed_of(t)} | {t.get('peak_gib', '-')} | {t.get('estimate_gib', '-')} "
            f"| {speed_of(u) if u else '-'} | {u.get('peak_gib', '-')} | {speed} | {memory} |"
        )
    others = {(r["stack"], r["row"], r["seq"]) for r in results if r["stack"] not in ("tunelab", "unsloth")}
    for stack, name, seq in sorted(others):
        b, t = by.get((stack, name, seq), {}), by.get(("tunelab", name, seq), {})
        if b.get("tok_s") and t.get("tok_s"):
            lines.append(f"A/B {name} ({seq}): {stack} {speed_of(b)} tok/s at {b['peak_gib']} GiB, "
                         f"this tree {speed_of(t)} at {t['peak_gib']} ({t['tok_s'] / b['tok_s']:.3f}x)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="lora,lora_gc,qlora_gc,qlora_gc_16k,1b_lora")
    p.add_argument("--stacks", default="tunelab,unsloth", help="tunelab, unsloth, base (tunelab from --base-src)")
    p.add_argument("--base-src", type=Path, help="another tunelab tree's src/, run as the stack 'base' (an A/B)")
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="another tunelab tree's src/, run as the stack NAME (repeatable; list NAME in --stacks)",
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/tunelab-vs"))
    p.add_argument("--unsloth-site", default="/tmp/site_us")
    p.add_argument("--longest", action="store_true", help="also the longest 8B QLoRA row in --cap-gib")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--longest-from", type=int, default=4096, help="first length --longest tries (then doubles)")
    p.add_argument("--resolution", type=int, default=16, help="--longest bisects to 1/RESOLUTION of the best length")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing check: the tiny row, tunelab only")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each stack per row, the order reversed every other round (the first process of a call has "
        "run slower); the summary gives medians",
    )
    args = p.parse_args()
    if args.tiny:
        args.rows, args.stacks, args.steps, args.warm = "tiny_lora_gc", "tunelab", 6, 2
    out = Path(os.environ.get("OUT", REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    sink = out / "vs_unsloth.jsonl"
    args.workdir.mkdir(parents=True, exist_ok=True)
    stacks = args.stacks.split(",")
    trees = {"tunelab": REPO / "src", **({"base": args.base_src} if args.base_src else {})}
    trees.update({name: Path(src) for name, _, src in (t.partition("=") for t in args.tree)})
    unknown = [s for s in stacks if s != "unsloth" and s not in trees]
    if unknown:
        p.error(f"no tree for stack(s) {', '.join(unknown)}: pass --base-src or --tree NAME=SRC")
    results: list[dict] = []
    if args.longest:
        row = ROWS["qlora_gc_16k"]
        model = build_checkpoint(args.workdir / row.shape, row.shape)
        for stack in stacks:

            def fits(seq: int, stack: str = stack) -> bool:
                at = Row(row.name, row.shape, row.method, 1, seq, True)
                if stack == "tunelab":
                    data = write_data(args.workdir / f"text-{seq}.jsonl", 4 + 8, seq)
                    result = run_tunelab(at, model, data, 2, 1, args.workdir, args.cap_gib, args.unsloth_site)
                else:  # two steps: the second runs with AdamW's state allocated, where the peak is
                    result = run_unsloth(at, model, 2, args.unsloth_site, args.cap_gib)
                _emit({**result, "cap_gib": args.cap_gib}, sink)
                return "tok_s" in result

            best = longest(stack, fits, args.longest_from, resolution=args.resolution)
            _emit({"stack": stack, "longest_seq": best, "cap_gib": args.cap_gib}, sink)
    for name in filter(None, args.rows.split(",")):
        row = ROWS[name]
        model = build_checkpoint(args.workdir / row.shape, row.shape)
        data = write_data(args.workdir / f"text-{row.seq}.jsonl", row.batch * args.steps + 8, row.seq)
        for round_ in range(args.repeat):
            for stack in stacks if round_ % 2 == 0 else stacks[::-1]:
                if stack in trees:
                    result = run_tunelab(row, model, data, args.steps, args.warm, args.workdir, None,
                                         args.unsloth_site, trees[stack], stack)  # fmt: skip
                else:
                    result = run_unsloth(row, model, args.steps, args.unsloth_site, None)
                if args.repeat > 1:
                    result["round"] = round_
                results.append(result)
                _emit(result, sink)
    print(table(results))


if __name__ == "__main__":
    main()
