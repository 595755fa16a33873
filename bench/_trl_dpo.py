"""The TRL side of ``dpo_vs_trl.py``: DPOTrainer + PEFT LoRA, the way TRL's docs set it up.

Nothing is tuned for speed.  The settings that would otherwise make the two stacks train different
things are pinned to tunelab's: LoRA ``lora_A`` starts from the same numpy draw (tunelab's
``lora_init``, seeded by the module's path; ``lora_B`` is zero in both), batches are taken in file
order (``train_sampling_strategy="sequential"``; tunelab: ``shuffle: false``, ``group_by_length:
false``), a constant learning rate, no dropout, fp32 on the CPU, and the loss logged every step.
Writes ``--result``: per-step losses, the tokenized pairs TRL trained on (to check both stacks saw the
same ids) and wall-clock marks.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files={"train": args.train})["train"]
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                weight = module.lora_A["default"].weight
                init = lora_a_init(args.seed, name.removeprefix("base_model.model."), *weight.shape)
                weight.copy_(torch.from_numpy(init))
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
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    model_ready = time.time()
    trainer.train()
    trained = time.time()
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
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
