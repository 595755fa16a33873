"""The memory estimate against the measured peak, through `tunelab train` itself, on ~25 configurations.

One command on one lease (the Unsloth tree only supplies bitsandbytes for the QLoRA rows):

    mkdir -p /tmp/site_us && tar -xJf .gpu/unsloth-site-cp312.tar.xz -C /tmp/site_us
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 bench/estimator_train.py --unsloth-site /tmp/site_us

Each row is ``python -m tunelab train CONFIG`` in a process of its own with a fresh ``TUNELAB_HOME``:
the random-initialised bf16 Llama of ``vs_unsloth.py`` (8B- or 1B-shaped, built once under
``--workdir``), LoRA r16 α32 on the seven linears (NF4 base for qlora), AdamW, 3 steps, no eval,
no checkpoints, ``data.cache: false``.  The rows vary ``method`` (lora, qlora),
``train.gradient_checkpointing``, ``train.compile``, ``data.packing`` and B×T (2×2048 for the grid;
1×16384 and 1×32768 with checkpointing for long context; a few 1B rows).  Rows without packing read
a ``text`` file whose every record is longer than the row, so each micro-batch is B full rows;
packed rows read a chat file (``messages``, user and assistant turns of 10-900 words) that packing
fills to B rows of T tokens.  After the run, ``tunelab runs show RUN_ID --json`` gives the two
figures compared: ``estimated_memory_bytes`` (the estimate train makes before loading; on CUDA the
tensor bytes, what ``max_memory_allocated`` should read) and ``peak_memory_bytes``
(``torch.cuda.max_memory_allocated`` over the whole process, loading included).  The error is
estimate / measured - 1; a row passes within 10%.  A row whose run backed off after running out of
memory (``memory_backoffs``) is flagged: its peak is not its configuration's.

Rows run ``--parallel`` at a time on the one GPU (``max_memory_allocated`` is per process, so
neighbours do not change a row's figure), started greedily while the sum of their config estimates
(``tunelab estimate``'s tensor bytes, worst case) stays under ``--cap-gib``.  Each row has a hard
timeout, and no row starts once the whole script's ``--deadline-s`` is near: those are reported as
skipped.  Rows print as they finish and go to ``$OUT/estimator_train.jsonl`` (or ``bench/results/``);
a markdown table closes the output.  ``--tiny`` runs a few tiny fp32 rows on CPU to check the plumbing
(there the peak is the process RSS and the estimate the process total).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_unsloth as vu  # bench/ is on the path now

STEPS = 3


@dataclass(frozen=True)
class Row:
    shape: str
    method: str  # lora | qlora
    batch: int
    seq: int
    gc: bool
    compile: bool = True
    packing: bool = False

    @property
    def name(self) -> str:
        prefix = {"llama8b": "", "llama1b": "1b_", "tiny": "tiny_"}[self.shape]
        flags = ("_gc" if self.gc else "") + ("_pack" if self.packing else "") + ("" if self.compile else "_eager")
        return f"{prefix}{self.method}{flags}_{self.seq // 1024 or self.seq}{'k' if self.seq >= 1024 else ''}"


def all_rows() -> list[Row]:
    """Long rows first (they take longest, so they overlap the short ones), then the 2×2048 grid, then 1B."""
    long = [Row("llama8b", m, 1, s, True, c) for s in (32768, 16384) for m in ("lora", "qlora") for c in (True, False)]
    long = [r for r in long if r.compile or r.seq == 16384]  # eager at 32k: one pair at 16k is enough
    flags = (True, False)
    grid = [Row("llama8b", m, 2, 2048, gc, c, not p) for m, gc, c, p in product(("lora", "qlora"), flags, flags, flags)]
    small = [
        Row("llama1b", "lora", 8, 2048, False),
        Row("llama1b", "qlora", 4, 2048, True, True, True),
        Row("llama1b", "lora", 1, 32768, True),
    ]
    return long + grid + small


TINY = [Row("tiny", "lora", 2, 256, gc, True, p) for gc, p in ((True, False), (False, True), (True, True))]


# -- inputs -------------------------------------------------------------------------------------
def write_chat(path: Path, records: int = 400) -> Path:
    """Chats of mixed lengths (user 10-400 words, assistant 20-900), for the packed rows."""
    if not path.exists():
        rng = random.Random(2)
        lines = []
        for _ in range(records):
            user, answer = int(10 * 40 ** rng.random()), int(20 * 45 ** rng.random())
            turns = [("user", vu._words(rng, user)), ("assistant", vu._words(rng, answer))]
            lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
        path.write_text("".join(lines))
    return path


def row_config(row: Row, model: Path, work: Path, out: Path) -> Path:
    """vs_unsloth's config for the row, plus compile, packing (chat data) and one tokenizer process."""
    import yaml

    if row.packing:
        data = write_chat(work / "est-chat.jsonl")
    else:
        data = vu.write_data(work / f"est-text-{row.seq}.jsonl", row.batch * STEPS + 8, row.seq)
    path = vu.tunelab_config(row, model, data, STEPS, out)  # type: ignore[arg-type]  # duck-typed Row
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(format="chat" if row.packing else "text", packing=row.packing, num_proc=1)
    cfg["train"]["compile"] = row.compile
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def config_estimate(path: Path) -> int | None:
    """`tunelab estimate CONFIG --json`'s tensor bytes, computed in this process (no weights load)."""
    try:
        from tunelab import services
        from tunelab.config.load import load_config

        plan = services.estimate_memory(load_config(path, []))
        return int(plan.estimate.tensor_bytes) if plan.estimate else None
    except Exception as exc:  # schedule it anyway, alone
        print(f"estimate failed for {path}: {exc}", file=sys.stderr)
        return None


def describe(row: Row) -> dict[str, Any]:
    return {"row": row.name, "shape": row.shape, "method": row.method, "gc": row.gc, "compile": row.compile,
            "packing": row.packing, "batch": row.batch, "seq": row.seq}  # fmt: skip


# -- one row --------------------------------------------------------------------------------------
def run_row(row: Row, cfg: Path, out: Path, bnb: Path, timeout: float) -> dict:
    env = vu.tunelab_env(out, bnb)
    result = describe(row)
    started = time.time()
    with (out / "train.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its compile workers: a group this script started
            proc.wait()
            rc = None
    result["wall_s"] = round(time.time() - started, 1)
    text = (out / "train.log").read_text(errors="replace")
    if rc != 0:
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}"
        return {**result, "error": f"{why}\n{vu._tail(text, 12)}"}
    try:
        show_cmd = [sys.executable, "-m", "tunelab", "runs", "show", "--json", vu._run_id(out, env)]
        show = vu._json(subprocess.run(show_cmd, env=env, capture_output=True, text=True))
    except Exception as exc:
        return {**result, "error": f"runs show: {exc}\n{vu._tail(text, 12)}"}
    est, peak = show.get("estimated_memory_bytes"), show.get("peak_memory_bytes")
    result.update(estimate_gib=vu._gib(est), peak_gib=vu._gib(peak), memory_backoffs=show.get("memory_backoffs") or [])
    if est and peak:
        result["error_pct"] = round((est / peak - 1) * 100, 1)
        result["within_10pct"] = abs(est / peak - 1) <= 0.10
    return result


# -- the table ------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    lines = [
        "| row | method | gc | compile | packing | B×T | estimate GiB | measured GiB | error | within 10%? |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for r in results:
        if "error_pct" in r:
            err, ok = f"{r['error_pct']:+.1f}%", ("✓" if r["within_10pct"] else "✗")
            ok += " (backed off)" if r["memory_backoffs"] else ""
        else:
            err, ok = "-", ("skipped" if r.get("skipped") else "failed")
        lines.append(
            f"| {r['row']} | {r['method']} | {yes(r['gc'])} | {yes(r['compile'])} | {yes(r['packing'])} "
            f"| {r['batch']}×{r['seq']} | {r.get('estimate_gib', '-')} | {r.get('peak_gib', '-')} | {err} | {ok} |"
        )
    measured = [r for r in results if "error_pct" in r]
    passed = sum(r["within_10pct"] for r in measured)
    lines.append(f"\n{passed} of {len(measured)} within 10% ({len(results) - len(measured)} failed or skipped)")
    return "\n".join(lines)


def main() -> None:
    t0 = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="", help="comma-separated row names (default: all); see --list")
    p.add_argument("--max-rows", type=int, default=0, help="only the first N rows (0: all)")
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    p.add_argument("--parallel", type=int, default=5, help="rows running at once")
    p.add_argument("--cap-gib", type=float, default=110.0, help="most GiB of config estimates running at once")
    p.add_argument("--row-timeout-s", type=float, default=300.0)
    p.add_argument("--deadline-s", type=float, default=490.0, help="the whole script ends within this")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/tunelab-vs"), help="shared with vs_unsloth.py")
    p.add_argument("--unsloth-site", type=Path, default=Path("/tmp/site_us"))
    p.add_argument("--tiny", action="store_true", help="CPU plumbing check: tiny fp32 rows")
    args = p.parse_args()
    rows = TINY if args.tiny else all_rows()
    if args.list:
        print("\n".join(r.name for r in rows))
        return
    if args.rows:
        wanted = args.rows.split(",")
        rows = [r for r in rows if r.name in wanted]
    rows = rows[: args.max_rows or None]
    out = Path(os.environ.get("OUT", vu.REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    sink = out / "estimator_train.jsonl"
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    plans: dict[Row, tuple[Path, Path, int | None]] = {}
    for row in rows:
        model = vu.build_checkpoint(args.workdir / row.shape, row.shape)
        folder = args.workdir / f"est-{stamp}" / row.name
        folder.mkdir(parents=True)
        cfg = row_config(row, model, args.workdir, folder)
        plans[row] = (cfg, folder, config_estimate(cfg))
    import torch

    torch.cuda.empty_cache()  # building the checkpoints left blocks in this process's pool (no-op on CPU)
    print(f"prepared {len(rows)} rows in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    bnb = vu._bitsandbytes_only(args.unsloth_site, args.workdir / f"est-{stamp}")
    args.parallel = max(1, args.parallel)
    cap, pending, running, results = args.cap_gib * 2**30, list(rows), {}, []
    with ThreadPoolExecutor(args.parallel) as pool:
        while pending or running:
            left = args.deadline_s - (time.time() - t0)
            used = sum(plans[r][2] or cap for r in running.values())
            for row in list(pending):
                if len(running) >= args.parallel:
                    break
                if left < 90:  # too late to load, compile and train a row
                    pending.remove(row)
                    skipped = {**describe(row), "skipped": True, "error": f"not started: {left:.0f} s left"}
                    results.append(skipped)
                    vu._emit(skipped, sink)
                    continue
                need = plans[row][2] or cap
                if running and used + need > cap:
                    continue
                cfg, folder, _ = plans[row]
                timeout = min(args.row_timeout_s, left - 5)
                running[pool.submit(run_row, row, cfg, folder, bnb, timeout)] = row
                pending.remove(row)
                used += need
                print(f"start {row.name}: {need / 2**30:.1f} GiB estimated, {len(running)} running, "
                      f"{used / 2**30:.1f} GiB", file=sys.stderr, flush=True)  # fmt: skip
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                row = running.pop(future)
                try:
                    results.append(future.result())
                except Exception as exc:  # the table still gets the row
                    results.append({**describe(row), "error": repr(exc)})
                vu._emit(results[-1], sink)
    order = {r.name: i for i, r in enumerate(rows)}
    print(table(sorted(results, key=lambda r: order[r["row"]])))
    print(f"{time.time() - t0:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
