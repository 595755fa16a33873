"""`tunelab eval`'s batched greedy answers vs one prompt at a time: speed, and whether every answer is the same.

A tiny Llama is built here (nothing downloaded) and asked the same prompts of mixed lengths at each batch
size through tunelab.evaluate.runner.answers, the function `tunelab eval` calls.  Printed and written to
bench/results/eval_batched.json:

    python bench/eval_batched.py                              # CPU, float32
    python bench/eval_batched.py --device cuda --hidden 1024 --layers 8 --prompts 128

A random model is the hard case for "the same answers": its logits are nearly flat, so a rounding
difference between a padded batch and a lone prompt can flip a near-tie (more so in bfloat16 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunelab-eval-batched"))
    args = parser.parse_args()

    from tunelab.evaluate.examples import EvalExample
    from tunelab.evaluate.runner import answers
    from tunelab.inference import load_generator
    from tunelab.tiny import make_tiny_checkpoint

    rng = random.Random(0)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "red", "green", "blue", "fruit",
             "what", "is", "colour", "apple", "sea", "sky")  # fmt: skip
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(400)]
    folder = args.workdir / f"h{args.hidden}-l{args.layers}-v{args.vocab}"
    if not (folder / "config.json").is_file():
        make_tiny_checkpoint(folder, texts, arch="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                             num_layers=args.layers, num_heads=max(args.hidden // 64, 2), num_kv_heads=2,
                             intermediate_size=args.hidden * 2, seed=0)  # fmt: skip
    generator = load_generator(model=str(folder), backend="torch", device=args.device)
    examples = [
        EvalExample("x", f"bench:{i}", messages=({"role": "user", "content": texts[i]},)) for i in range(args.prompts)
    ]
    answers(generator, examples[:2], max_new_tokens=4, batch_size=2)  # warm-up (kernels, allocator)
    results: dict[str, object] = {
        "device": str(getattr(generator.backend, "device", args.device)),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    reference: list[str] | None = None
    base_s = None
    for size in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        got = answers(generator, examples, max_new_tokens=args.new_tokens, batch_size=size)
        seconds = time.perf_counter() - start
        reference = reference if reference is not None else got
        base_s = base_s if base_s is not None else seconds
        same = sum(a == b for a, b in zip(got, reference, strict=True))
        results[f"batch_{size}"] = {"seconds": round(seconds, 3), "speedup": round(base_s / seconds, 2),
                                    "same_as_batch_1": f"{same}/{len(got)}"}  # fmt: skip
        print(f"batch {size:>3}: {seconds:7.2f} s  x{base_s / seconds:5.1f}  same answers {same}/{len(got)}")
    out = Path(__file__).resolve().parent / "results" / "eval_batched.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
