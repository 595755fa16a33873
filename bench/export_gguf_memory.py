"""Peak memory of tunelab's GGUF writer on an 8B-parameter-shaped model, beside llama.cpp's converter.

The model is Llama-3-8B-shaped (hidden 4096, 32 layers, 32 heads / 8 KV heads,
MLP 14336, vocabulary 128256: 8.03B parameters), random-initialised and
written to disk as bf16 safetensors in 4 shards (~16 GB), one tensor at a time
so that building it needs little memory.  Each export then runs in its own
process and its peak resident set size (``ru_maxrss`` from ``wait4``) is
compared with the size of the model on disk.  The target is ≤ 1.2×.

    python bench/export_gguf_memory.py --workdir /tmp/gguf-bench        # bf16 -> bf16 and q8_0
    python bench/export_gguf_memory.py --layers 4 --workdir /tmp/small   # a scaled-down model (say so)
    python bench/export_gguf_memory.py --competitor /path/to/convert_hf_to_gguf.py

The competitor is llama.cpp's ``convert_hf_to_gguf.py`` (from a llama.cpp
checkout, or the llama-cpp-python sdist under ``vendor/llama.cpp``), run on the
same folder with ``--outtype`` set to the same type; it is skipped if not given.
Results are printed and written to ``bench/results/export_gguf_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "mlp": 14336, "vocab": 128256}
SHARDS = 4


def tensor_shapes(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int) -> list[tuple]:
    """(name, shape) of every tensor of a Llama checkpoint, in transformers' names."""
    kv = hidden // heads * kv_heads
    out: list[tuple] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)),
            (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
        ]
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _bf16_random(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Normal(0, 0.02) values as raw bfloat16 bits, generated a slice at a time."""
    if len(shape) == 1:
        return np.full(shape, 0x3F80, dtype=np.uint16)  # 1.0: RMSNorm weights start at one
    out = np.empty(shape, dtype=np.uint16)
    step = max(1, (1 << 24) // shape[1])
    for i in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - i), shape[1]), dtype=np.float32) * 0.02
        out[i : i + step] = (block.view(np.uint32) >> 16).astype(np.uint16)
    return out


def write_model(folder: Path, dims: dict[str, int], seed: int = 0) -> int:
    """Write the checkpoint (config, tokenizer, bf16 shards, index); return its bytes on disk."""
    from tunelab.tiny import train_sentencepiece_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(**dims)
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    per_shard, shard, groups = total / SHARDS, 0.0, [[]]  # type: ignore[var-annotated]
    for name, shape in shapes:
        if shard > per_shard and len(groups) < SHARDS:
            groups.append([])
            shard = 0.0
        groups[-1].append((name, shape))
        shard += int(np.prod(shape)) * 2
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(folder / file, group, rng)
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "intermediate_size": dims["mlp"],
        "vocab_size": dims["vocab"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    words = ["the", "model", "writes", "lists", "of", "items", "and", "answers", "questions", "about", "them"]
    # SentencePiece, so that llama.cpp's converter (which refuses BPE tokenizers it has no hash for) runs too.
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    train_sentencepiece_tokenizer(texts, folder, vocab_size=300, chat_template=None)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _write_shard(path: Path, group: list[tuple], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name, shape in group:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in group:
            _bf16_random(shape, rng).tofile(fh)


def measure(cmd: list[str]) -> tuple[int, float, int]:
    """Run ``cmd``; return (peak RSS bytes, seconds, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and proc.stderr is not None:
        print(proc.stderr.read().decode(errors="replace")[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, seconds, code  # ru_maxrss is in KiB on Linux


def tunelab_cmd(model: Path, out: Path, quant: str) -> list[str]:
    code = (
        "import sys; from pathlib import Path; from tunelab.export.gguf import write_gguf; "
        "write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), quant=sys.argv[3])"
    )
    return [sys.executable, "-c", code, str(model), str(out), quant]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunelab-gguf-bench"))
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="fewer layers scale the model down")
    parser.add_argument("--quant", nargs="+", default=["bf16", "q8_0"])
    parser.add_argument("--competitor", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--keep", action="store_true", help="keep the model and the GGUF files")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "export_gguf_memory.json")
    args = parser.parse_args()
    dims = {**SHAPE, "layers": args.layers}
    params = sum(int(np.prod(s)) for _, s in tensor_shapes(**dims))
    need = params * 2 * 2.1
    free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
    if free < need:
        sys.exit(f"needs ~{need / 1e9:.0f} GB free in {args.workdir}, has {free / 1e9:.0f} GB: pass --layers N")
    model = args.workdir / "model"
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        write_model(model, dims)
        print(f"wrote the model in {time.perf_counter() - t:.0f} s")
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"model: {params / 1e9:.2f}B parameters, {size / 1e9:.2f} GB of bf16 safetensors ({dims})")
    rows = []
    for quant in args.quant:
        stacks = [("tunelab", tunelab_cmd(model, args.workdir / f"tunelab-{quant}.gguf", quant))]
        if args.competitor is not None:
            out = args.workdir / f"llamacpp-{quant}.gguf"
            stacks.append(
                (
                    "llama.cpp convert",
                    [sys.executable, str(args.competitor), str(model), "--outfile", str(out), "--outtype", quant],
                )
            )
        for name, cmd in stacks:
            peak, seconds, code = measure(cmd)
            row = {
                "stack": name,
                "quant": quant,
                "peak_rss_bytes": peak,
                "seconds": round(seconds, 1),
                "ratio_to_model": round(peak / size, 3),
                "exit_code": code,
            }
            rows.append(row)
            print(
                f"{name:>18} {quant:>5}: peak RSS {peak / 1e9:6.2f} GB = {peak / size:.3f}x the model, "
                f"{seconds:5.0f} s, exit {code}"
            )
        for file in args.workdir.glob(f"*-{quant}.gguf"):
            if not args.keep:
                file.unlink()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"params": params, "model_bytes": size, "dims": dims, "runs": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
