"""The TRL side of ``dpo_vs_trl.py``: DPOTrainer + PEFT LoRA, the way TRL's docs set it up.

Nothing is tuned for speed.  The settings that would otherwise make the two stacks train different
things are pinned to tunelab's: LoRA ``lora_A`` starts from the same numpy draw (tunelab's
``lora_init``, seeded by the module's path; ``lora_B`` is zero in both), batches are taken in file
order (``train_sampling_strategy="sequential"``; tunelab: ``shuffle: false``, ``group_by_length:
false``), a constant learning rate, no dropout, fp32 on the CPU, and the loss logged every step.
Writes ``--result``: per-step losses, the tokenized pairs TRL trained on (to check both stacks saw the
same ids) and wall-clock marks.

``--device cuda`` (``dpo_vs_trl.py --device cuda``) trains on the GPU instead: the model loaded in
``--dtype``, the Trainer's ``bf16`` mixed precision when that is bfloat16, and the result also holds
``torch.cuda.max_memory_allocated`` over the whole process (loading included, as tunelab's
``peak_memory_gb``), printed as a ``RESULT {json}`` line too.  Without ``--gradient-checkpointing``
TRL's own default applies (``DPOConfig`` turns it on).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

IMPORTED_AT = time.time()


def lora_a_init(seed: int, module_path: str, rank: int, fan_in: int) -> np.ndarray:
    """tunelab's backend-independent ``lora_A`` draw (src/tunelab/backends/lora_init.py), copied."""
    rng = np.random.default_rng([seed, zlib.crc32(module_path.encode("utf-8"))])
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.began = 0.0

    def on_train_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
        self.began = time.time()

    def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
        self.step_ends.append(time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="train.jsonl with {prompt, chosen, rejected} records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or comma-separated names")
    parser.add_argument(
        "--gradient-checkpointing", choices=("true", "false"), default=None, help="default: DPOConfig's own"
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files={"train": args.train})["train"]
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                weight = module.lora_A["default"].weight
                init = lora_a_init(args.seed, name.removeprefix("base_model.model."), *weight.shape)
                weight.copy_(torch.from_numpy(init))
    extra: dict[str, bool] = {}
    if args.gradient_checkpointing is not None:
        extra["gradient_checkpointing"] = args.gradient_checkpointing == "true"
    config = DPOConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=args.beta,
        loss_type="sigmoid",
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and args.dtype == "bfloat16",
        seed=args.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        **extra,
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    model_ready = time.time()
    trainer.train()
    trained = time.time()
    # Before saving: the peak of loading and training.  On CUDA the counter tunelab's peak_memory_gb reads;
    # on the CPU the process's peak RSS, as tunelab reports there.
    peak: dict[str, object] = {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        peak = {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "gpu": torch.cuda.get_device_name(),
        }
    trainer.save_model(str(Path(args.out) / "adapter"))
    used = trainer.train_dataset.select(range(min(len(trainer.train_dataset), args.steps * args.batch_size)))
    pairs = [[row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]] for row in used]
    result = {
        "imported_at": IMPORTED_AT,
        "model_ready": model_ready,
        "step_ends": clock.step_ends,
        "trained": trained,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "pairs": pairs,
        "torch_threads": torch.get_num_threads(),
        "train_begin": clock.began,
        "gradient_checkpointing": config.gradient_checkpointing,
        **peak,
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k not in ("pairs", "step_ends")}), flush=True)


if __name__ == "__main__":
    main()
