"""Where `tunelab train`'s step time goes on a GPU: kernel time by kind, the GPU's idle share, the top kernels.

    python3 bench/step_profile.py lora_gc qlora_gc --unsloth-site /tmp/site_us
    python3 bench/step_profile.py tiny_lora_gc --warm 4 --span 2      # CPU plumbing check

Each row (named as in ``vs_unsloth.py``) runs ``tunelab train`` on vs_unsloth's checkpoint, config and
data, in a process of its own.  Inside it, the backend's ``optimizer_step`` is wrapped (nothing else
changes): after ``--warm`` steps the GPU is synchronised and torch's profiler starts, and ``--span``
steps later it stops and the process prints, per step, the wall time, the kernel time of each kind
(matrix products, attention, Triton kernels inductor generated, bitsandbytes' dequantization,
copies, the optimizer, other aten kernels) and the time the GPU had no kernel running, then the 25
kernels that took longest, and on a GPU the host's 20 costliest ops (self time).  Before the profiler
starts, the steps after the first are timed unprofiled, with how long the host waited for the GPU in
each: near zero means the GPU waits for the host.  The kinds are told apart by kernel name.  Profiling itself slows the
host side a little, so the wall time here is a bit above the run's own tokens/s; the shares are what
to read.  Output also goes to ``$OUT/profile_<row>.txt``, every GPU kernel of the profiled steps
(start, length, stream, name) to ``$OUT/kernels_<row>.csv.gz``, and the host's ops and CUDA calls (with
``--stack``, its Python functions too) on the same clock to ``$OUT/host_<row>.csv.gz``, for reading the
timelines offline; ``gpu_gaps.py`` reads them at once, and its report (the idle GPU's gaps, and what the
training thread did in them) is printed and kept with the rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_gaps  # bench/ is on the path now
import vs_unsloth as vu

# Runs inside the training process: the profiler around steps WARM+1 .. WARM+SPAN of the backend's loop.
DRIVER = r"""
import collections, csv, gc, gzip, json, os, sys, tempfile, time, torch, warnings
from torch.profiler import ProfilerActivity, profile
from tunelab.backends.torch.backend import TorchBackend

WARM, SPAN = int(sys.argv.pop(1)), int(sys.argv.pop(1))
CUDA = torch.cuda.is_available()
KINDS = [  # first match wins; names of CUDA kernels (or aten ops on a CPU)
    # First: inductor names its kernels after the ops they fuse, "_to_copy" and "dequantize" among them.
    ("inductor (triton)", ("triton_", "cpp_fused")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "aten::_scaled_dot_product")),  # before sm90_ below
    ("matrix products", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "aten::mm", "aten::addmm")),
    ("bitsandbytes", ("dequant", "kDequantize", "kgemm_4bit")),
    ("copies", ("memcpy", "memset", "copy_", "aten::copy_", "aten::to")),
    ("optimizer", ("multi_tensor_apply", "fused_adam", "adam")),
]
state = {"steps": 0, "prof": None, "t0": 0.0, "last": None, "walls": [], "waits": [], "wait": 0.0, "syncs": 0}
# Python's garbage collector stops the host thread that triggers it: its passes during the profiled steps, by
# generation, and how long they took (a host-bound step pays them in full).
collections_seen = {"on": False, "start": 0.0, "ms": collections.Counter(), "count": collections.Counter()}


def gc_timed(phase, info):
    if phase == "start":  # always, so a pass that began just before the profiler is not counted from 0
        collections_seen["start"] = time.perf_counter()
    elif collections_seen["on"]:
        generation = info.get("generation", -1)
        collections_seen["ms"][generation] += (time.perf_counter() - collections_seen["start"]) * 1e3
        collections_seen["count"][generation] += 1


gc.callbacks.append(gc_timed)


def kind(name):
    low = name.lower()
    for label, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return label
    return "other"


def report(prof, wall):
    device = torch.autograd.DeviceType.CUDA if CUDA else torch.autograd.DeviceType.CPU
    by_kind, by_name = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for evt in prof.key_averages():
        if CUDA and evt.device_type != device:
            continue
        t = (evt.self_device_time_total if CUDA else evt.self_cpu_time_total) / 1e3  # ms
        if t <= 0 or (not CUDA and not evt.key.startswith("aten::")):
            continue
        by_kind[kind(evt.key)] += t
        by_name[evt.key] += t
        calls[evt.key] += evt.count
    busy = sum(by_kind.values())
    print(f"PROFILE {SPAN} steps, {wall / SPAN * 1e3:.1f} ms a step (wall, profiled)", flush=True)
    for label, t in by_kind.most_common():
        print(f"PROFILE {label:<20} {t / SPAN:8.1f} ms a step  {100 * t / wall / 1e3:5.1f}% of wall", flush=True)
    if CUDA:
        idle = wall * 1e3 - busy
        share = 100 * idle / wall / 1e3
        print(f"PROFILE {'no kernel running':<20} {idle / SPAN:8.1f} ms a step  {share:5.1f}% of wall", flush=True)
    for name, t in by_name.most_common(25):
        print(f"PROFILE   {t / SPAN:7.2f} ms {calls[name] // SPAN:5d}x  {name[:110]}", flush=True)
    if CUDA:
        host_ops(prof)
    seen = collections_seen
    passes = ", ".join(f"generation {g}: {seen['count'][g]} in {seen['ms'][g]:.1f} ms" for g in sorted(seen["count"]))
    print(f"PROFILE garbage collection over {SPAN} steps: {passes or 'none'}", flush=True)
    if os.environ.get("PROFILE_KERNELS"):
        timeline(prof, os.environ["PROFILE_KERNELS"])


def host_ops(prof):
    # The host's side: which torch ops (and Python-registered ops) took its time, self time per step.
    # The profiler inflates every op by about the same few microseconds, so counts matter as much as times.
    by_name, calls = collections.Counter(), collections.Counter()
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CPU and evt.self_cpu_time_total > 0:
            by_name[evt.key] += evt.self_cpu_time_total / 1e3
            calls[evt.key] += evt.count
    total = sum(by_name.values())
    print(f"PROFILE host: {total / SPAN:.1f} ms of op self time a step, {sum(calls.values()) // SPAN} ops", flush=True)
    for name, t in by_name.most_common(20):
        print(f"PROFILE   host {t / SPAN:7.2f} ms {calls[name] // SPAN:5d}x  {name[:100]}", flush=True)


def unprofiled(walls, waits, syncs):
    # Steps before the profiler: how long each took and how long the host spent in its explicit waits for
    # the GPU (the loop's reads of a step's numbers, torch.cuda.synchronize): a lower bound, so the
    # synchronising calls CUDA's sync debug mode saw (.item(), a copy to pageable memory...) are counted
    # too.  A host that waits for nothing, explicitly or not, is what the GPU waits for: host-bound.
    walls, waits = walls[1:], waits[1:]  # the first timed step may still compile
    if not walls:
        print("PROFILE unprofiled: no step to time (--warm 3 or more)", flush=True)
        return
    mid = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
    few = "" if len(walls) >= 3 else " (too few for a median: raise --warm)"
    print(f"PROFILE unprofiled: {len(walls)} steps{few}, {walls[mid] * 1e3:.1f} ms a step (median), "
          f"explicit waits for the GPU {waits[mid] * 1e3:.1f} ms of it, "
          f"{syncs / len(walls):.1f} other synchronising calls a step", flush=True)


def timeline(prof, path):
    # Every GPU kernel, copy and fill of the profiled steps (start, length, stream, name) as gzipped CSV.
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
    def pick(cats):
        rows = [(e["ts"], e.get("dur", 0), e.get("tid", ""), e.get("cat", ""), e.get("name", "")[:160])
                for e in events if e.get("cat") in cats]
        return sorted(rows, key=lambda r: (float(r[0]), -float(r[1])))  # an enclosing event before its children

    gpu = pick(("kernel", "gpu_memcpy", "gpu_memset"))
    write(path, ["start_us", "dur_us", "stream", "kind", "name"], gpu)
    print(f"PROFILE {len(gpu)} GPU events written to {path}", flush=True)
    # The host's side on the same clock: torch ops, the CUDA calls (launches, copies, waits) and, with
    # PROFILE_STACK=1, Python functions, per thread. Read beside the GPU's to see what the host was doing
    # while the GPU had nothing queued.
    host = pick(("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"))
    where = os.path.join(os.path.dirname(path), os.path.basename(path).replace("kernels_", "host_"))
    write(where, ["start_us", "dur_us", "thread", "kind", "name"], host)
    print(f"PROFILE {len(host)} host events written to {where}", flush=True)


def write(path, header, rows):
    with gzip.open(path, "wt", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)


original = TorchBackend.optimizer_step


def waited(read):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return read(*args, **kwargs)
        finally:
            state["wait"] += time.perf_counter() - start
    return timed


from tunelab.backends.torch import readback  # the trainer's reads of a step's numbers
readback.Pending.__float__ = waited(readback.Pending.__float__)
torch.cuda.synchronize = waited(torch.cuda.synchronize)
shown = warnings.showwarning


def counted(message, *args, **kwargs):
    if "synchroniz" in str(message):  # CUDA's sync debug mode: "called a synchronizing CUDA operation"
        state["syncs"] += 1
        return None
    return shown(message, *args, **kwargs)


warnings.showwarning = counted


def stepped(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    state["steps"] += 1
    now = time.perf_counter()
    if state["last"] is not None and state["steps"] <= WARM:
        state["walls"].append(now - state["last"])
        state["waits"].append(state["wait"])
    state["last"], state["wait"] = now, 0.0
    if CUDA and state["steps"] == 2:  # the first timed interval is dropped: count from here
        state["syncs"] = 0
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    if state["steps"] == WARM:
        unprofiled(state["walls"], state["waits"], state["syncs"])
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        # with_stack: Python functions too (PROFILE_STACK=1), at a cost in host time that distorts the wall
        state["prof"] = profile(activities=acts, with_stack=os.environ.get("PROFILE_STACK") == "1")
        state["prof"].__enter__()
        state["t0"] = time.perf_counter()
        collections_seen["on"] = True
    elif state["steps"] == WARM + SPAN and state["prof"] is not None:
        if CUDA:
            torch.cuda.synchronize()
        wall = time.perf_counter() - state["t0"]
        collections_seen["on"] = False
        prof, state["prof"] = state["prof"], None
        prof.__exit__(None, None, None)
        report(prof, wall)
    return out


TorchBackend.optimizer_step = stepped
sys.argv[0] = "tunelab"
from tunelab.cli.main import main
main()
"""


def profile_row(name: str, work: Path, site: Path, warm: int, span: int, stack: bool = False) -> str:
    row = vu.ROWS[name]
    model = vu.build_checkpoint(work / row.shape, row.shape)
    steps = warm + span + 1
    data = vu.write_data(work / f"prof-text-{row.seq}.jsonl", row.batch * steps + 8, row.seq)
    out = work / f"prof-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier profile of this row would refuse to start
    out.mkdir(parents=True)
    cfg = vu.tunelab_config(row, model, data, steps, out)
    env = vu.tunelab_env(out, vu._bitsandbytes_only(site, work))
    sink = os.environ.get("OUT")
    if sink:  # the kernel and host timelines, for reading offline (device time is scarce)
        env["PROFILE_KERNELS"] = str(Path(sink) / f"kernels_{name}.csv.gz")
    if stack:
        env["PROFILE_STACK"] = "1"
    lines = vu.run_driver(name, DRIVER, [str(warm), str(span), "train", str(cfg)], env, "PROFILE ")
    text = "\n".join(ln.removeprefix("PROFILE ") for ln in lines)
    kernels = Path(env.get("PROFILE_KERNELS", "-"))
    if kernels.exists():  # the idle GPU's gaps and what the training thread did in them (gpu_gaps.py)
        host = kernels.with_name(kernels.name.replace("kernels_", "host_"))
        timeline = gpu_gaps.read_rows(host) if host.exists() else None
        text += "\n" + gpu_gaps.report(gpu_gaps.read_rows(kernels), timeline, 50.0, span, 20)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+")
    p.add_argument("--warm", type=int, default=6, help="steps before the profiler starts (compiles, warm-up)")
    p.add_argument("--span", type=int, default=3, help="steps profiled")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/tunelab-vs"))
    p.add_argument("--unsloth-site", type=Path, default=Path("/tmp/site_us"))
    p.add_argument("--stack", action="store_true", help="record Python functions too (slows the host)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    one = lambda name: profile_row(name, args.workdir, args.unsloth_site, args.warm, args.span, args.stack)  # noqa: E731
    vu.report_rows(args.rows, "profile", one)


if __name__ == "__main__":
    main()
