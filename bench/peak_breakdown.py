"""What is alive on the GPU at `tunelab train`'s peak: the estimator's missing terms, found rather than guessed.

    python3 bench/peak_breakdown.py qlora_gc_32k 1b_qlora_gc_pack_2k --unsloth-site /tmp/site_us

Each row (named as in ``estimator_train.py --list``) runs ``tunelab train`` in a process of its own,
as ``estimator_train.py`` runs it, with torch's allocator history recorded
(``torch.cuda.memory._record_memory_history``, Python frames).  At exit the process replays the
trace to the moment of most allocated bytes and prints the blocks alive then, grouped by the
innermost frame in tunelab, PEFT, transformers or bitsandbytes that allocated them, largest first,
beside the estimate's own lines (``tunelab estimate CONFIG --json``).  The history slows the run; the
figures are bytes, not times.  Output also goes to ``$OUT/peak_<row>.txt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import estimator_train as et  # bench/ is on the path now
import vs_unsloth as vu

# Runs inside the training process: record, then at exit replay the trace to its peak.
DRIVER = r"""
import atexit, collections, sys, torch
torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
OURS = ("tunelab/", "peft/", "transformers/", "bitsandbytes/", "torch/_inductor/", "torch/utils/checkpoint")

def where(frames):
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in OURS):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(other)"

def report():
    snap = torch.cuda.memory._snapshot()
    events = [e for trace in snap["device_traces"] for e in trace]
    live, total, peak, at = {}, 0, 0, 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]; total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
        if total > peak:
            peak, at = total, i
    live = {}
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for e in live.values():
        g = groups[where(e.get("frames", []))]
        g[0] += e["size"]; g[1] += 1; g[2][e["size"]] += 1
    print(f"PEAK traced {peak / 2**30:.3f} GiB at event {at} of {len(events)}; "
          f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB", flush=True)
    for key, (size, n, sizes) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        # the commonest block sizes (MiB x count) say which tensors they are: width = bytes / tokens / 2
        common = " ".join(f"{b / 2**20:.1f}Mx{c}" for b, c in sizes.most_common(4))
        print(f"PEAK {size / 2**30:8.3f} GiB {n:6d}  {key}  [{common}]", flush=True)
    # The largest single blocks, each with the frames that allocated it (innermost first), for what a
    # group's sizes alone don't name (a 512 MiB block inside SDPA at 1B 32k, 2026-12-06).
    for e in sorted(live.values(), key=lambda e: -e["size"])[:8]:
        frames = [f"{f.get('filename', '').split('site-packages/')[-1].split('/src/')[-1]}:{f.get('line')}"
                  f" {f.get('name')}" for f in e.get("frames", [])[:6]]
        print(f"PEAK block {e['size'] / 2**20:9.1f} MiB  " + " < ".join(frames), flush=True)

atexit.register(report)
sys.argv[0] = "tunelab"
from tunelab.cli.main import main
main()
"""


def breakdown(name: str, work: Path, site: Path) -> str:
    row = next(r for r in et.all_rows() if r.name == name)
    model = vu.build_checkpoint(work / row.shape, row.shape)
    out = work / f"peak-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier left its output_dir: train refuses to reuse it
    out.mkdir(parents=True)
    cfg = et.row_config(row, model, work, out)
    env = vu.tunelab_env(out, vu._bitsandbytes_only(site, work))
    est = vu._json(subprocess.run([sys.executable, "-m", "tunelab", "estimate", str(cfg), "--json"],
                                  env=env, capture_output=True, text=True))  # fmt: skip
    lines = vu.run_driver(name, DRIVER, ["train", str(cfg)], env, "PEAK")
    estimate = est.get("estimate") or est
    for item in estimate.get("lines", []):
        lines.append(f"EST  {item.get('bytes', 0) / 2**30:8.3f} GiB  {item.get('label')}  {item.get('note', '')}")
    lines.append(f"EST peak at: {estimate.get('peak_at')}; workload {json.dumps(est.get('workload'))[:600]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/tunelab-vs"))
    p.add_argument("--unsloth-site", type=Path, default=Path("/tmp/site_us"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    vu.report_rows(args.rows, "peak", lambda name: breakdown(name, args.workdir, args.unsloth_site))


if __name__ == "__main__":
    main()
