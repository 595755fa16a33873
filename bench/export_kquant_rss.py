"""Peak memory of K-quantizing a large f16 GGUF through tunelab's path (llama.cpp's quantizer).

Writes an f16 GGUF shaped like a given model (default: Llama 3 8B; weights are
random, which does not change what quantizing costs), then quantizes it in a
child process with :func:`tunelab.export.gguf_kquant.quantize_file`, sampling
the child's /proc status every 20 ms.  Prints the input and output sizes, the
largest tensor (as the f32 rows llama.cpp converts it to), and the child's peak
resident memory split into anonymous (private, what the quantizer allocates)
and file-backed (the memory-mapped input, page cache the kernel can reclaim),
against the target: peak <= 1.2 x output + one tensor.

Measured (2-core shared machine, 1 thread, nice 19; llama-cpp-python 0.3.36), q4_k_m:
* Llama 3 8B shape: 14.96 GiB f16 -> 4.58 GiB; peak RSS 3.38 GiB (anon 2.38, file-backed 1.00)
  against a 7.45 GiB target (4.58 x 1.2 + 1.96 GiB for token_embd in f32): 0.45x; 1355 s.
* Llama 3.2 1B shape: 2.79 GiB -> 0.88 GiB; peak 1.71 GiB (anon 1.20) of 2.04 GiB: 0.84x; 123 s.

    python bench/export_kquant_rss.py --dir /tmp/kq8b                     # 8B shape, q4_k_m
    python bench/export_kquant_rss.py --dir /tmp/kq1b --layers 16 --hidden 2048 --ffn 8192 --threads 1  # 1B shape
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_f16(path: Path, args: argparse.Namespace) -> int:
    """An f16 llama GGUF of the given shape, tensor by tensor (random values drawn from a reused pool)."""
    import gguf

    head = args.hidden // args.heads
    kv = head * args.kv_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (args.vocab, args.hidden))]
    for i in range(args.layers):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (args.hidden,)),
            (f"blk.{i}.attn_q.weight", (args.hidden, args.hidden)),
            (f"blk.{i}.attn_k.weight", (kv, args.hidden)),
            (f"blk.{i}.attn_v.weight", (kv, args.hidden)),
            (f"blk.{i}.attn_output.weight", (args.hidden, args.hidden)),
            (f"blk.{i}.ffn_norm.weight", (args.hidden,)),
            (f"blk.{i}.ffn_gate.weight", (args.ffn, args.hidden)),
            (f"blk.{i}.ffn_up.weight", (args.ffn, args.hidden)),
            (f"blk.{i}.ffn_down.weight", (args.hidden, args.ffn)),
        ]
    shapes += [("output_norm.weight", (args.hidden,)), ("output.weight", (args.vocab, args.hidden))]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(args.vocab)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    for name, shape in shapes:
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16
        itemsize = 4 if len(shape) == 1 else 2
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * itemsize, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pool = (np.random.default_rng(0).standard_normal(1 << 24) * 0.02).astype(np.float16)
    for _, shape in shapes:
        n = int(np.prod(shape))
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        reps = -(-n // pool.size)
        writer.write_tensor_data(np.tile(pool, reps)[:n].reshape(shape))
    writer.close()
    return max(int(np.prod(s)) for _, s in shapes)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def quantize_in_child(src: Path, out: Path, quant: str, threads: int) -> dict[str, int]:
    """Run the quantizer in a child and return its peak VmRSS / RssAnon / RssFile (bytes)."""
    code = (
        "import sys; from pathlib import Path; from tunelab.export.gguf_kquant import quantize_file; "
        "print('\\n'.join(quantize_file(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], threads=int(sys.argv[4]))))"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(src), str(out), quant, str(threads)])
    peak: dict[str, int] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        for key, value in _status(child.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.02)
    if child.returncode != 0:
        raise SystemExit(f"quantizing failed (exit {child.returncode})")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src, out = args.dir / "model-f16.gguf", args.dir / f"model-{args.quant}.gguf"
    start = time.perf_counter()
    largest = write_f16(src, args)
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    peak = quantize_in_child(src, out, args.quant, args.threads)
    took = time.perf_counter() - start
    out_size, tensor_f32 = out.stat().st_size, largest * 4
    target = 1.2 * out_size + tensor_f32
    gib = 1 << 30
    result = {
        "quant": args.quant,
        "input_gib": round(src.stat().st_size / gib, 3),
        "output_gib": round(out_size / gib, 3),
        "largest_tensor_f32_gib": round(tensor_f32 / gib, 3),
        "target_gib": round(target / gib, 3),
        "peak_rss_gib": round(peak["VmRSS"] / gib, 3),
        "peak_anon_gib": round(peak["RssAnon"] / gib, 3),
        "peak_file_backed_gib": round(peak["RssFile"] / gib, 3),
        "peak_rss_over_target": round(peak["VmRSS"] / target, 3),
        "peak_anon_over_target": round(peak["RssAnon"] / target, 3),
        "write_f16_s": round(wrote, 1),
        "quantize_s": round(took, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
