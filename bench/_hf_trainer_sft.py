"""The plain-stack fine-tune that ``cpu_vs_trainer.py`` times against ``tunelab train``.

This is deliberately the script a user of transformers + PEFT writes from the
docs: ``datasets`` to load the JSONL, the tokenizer's chat template for the
text, assistant-only labels found by rendering conversation prefixes, the
``Trainer`` with its default optimizer and sampler, and ``save_model`` at the
end (tunelab also writes its adapter at the end, so both do the same work).
Nothing is tuned for speed and nothing is slowed down.

The only additions are measurement, kept negligible on purpose: wall-clock
marks between phases, one timestamp per optimizer step (a callback) and a
per-batch token count (a thin wrapper around the collator).  They are written
to ``--result`` so the benchmark can break the run into startup, data prep,
model load and per-step time without a profiler.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

IMPORTED_AT = time.time()  # the benchmark subtracts its launch time: interpreter start + imports


def tokenize_example(messages: list[dict[str, Any]], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """Chat-template a conversation; labels are the assistant turns (with their end marker), -100 elsewhere.

    Each assistant turn spans from the end of the prefix rendered with a
    generation prompt to the end of the prefix that includes the turn: the
    usual way to find assistant tokens for any template that renders a
    conversation as a prefix of its continuation.
    """

    def ids(msgs: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = ids(messages, False)
    labels = [-100] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(ids(messages[:i], True))
            end = len(ids(messages[: i + 1], False))
            labels[start:end] = input_ids[start:end]
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_completion(prompt: str, completion: str, tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """A prompt/completion pair: prompt tokens then completion tokens then EOS; loss on completion + EOS only.

    The pieces are tokenized apart (no special tokens) so the prompt/completion
    boundary is exact, which is how the usual recipes mask the prompt.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and tokenizer.add_bos_token else []
    input_ids = (bos + prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * (len(bos) + len(prompt_ids)) + answer_ids)[:max_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_record(record: dict[str, Any], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """A chat record (``messages``) or a prompt/completion record, tokenized with its labels."""
    if "messages" in record:
        return tokenize_example(record["messages"], tokenizer, max_len)
    return tokenize_completion(record["prompt"], record["completion"], tokenizer, max_len)


class StepClock(TrainerCallback):
    """Wall-clock time at the start of training and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.train_begin = 0.0
        self.step_ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_begin = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.time())


class CountingCollator:
    """Delegates to the real collator and records real (non-pad) and padded tokens per batch.

    The dataloader may collate one batch ahead of the step being trained, so
    the benchmark keeps only the first ``max_steps`` entries.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.real: list[int] = []
        self.padded: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(int(batch["input_ids"].numel()))
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="train.jsonl with {'messages': [...]} records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument(
        "--sampling",
        default="random",
        choices=["random", "group_by_length"],
        help="TrainingArguments.train_sampling_strategy (random is the Trainer's default)",
    )
    parser.add_argument("--valid", help="valid.jsonl: evaluated once, after the last step")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--result", required=True, help="JSON file for losses, timings and token counts")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    files = {"train": args.train, **({"valid": args.valid} if args.valid else {})}
    splits = load_dataset("json", data_files=files)
    splits = splits.map(
        lambda ex: tokenize_record(ex, tokenizer, args.max_seq_len), remove_columns=splits["train"].column_names
    )
    dataset = splits["train"]
    data_ready = time.time()

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        per_device_eval_batch_size=args.batch_size,
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        train_sampling_strategy=args.sampling,
    )
    clock = StepClock()
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    model_ready = time.time()

    trainer.train()
    evaluation = trainer.evaluate(splits["valid"]) if args.valid else {}
    trained = time.time()
    trainer.save_model(str(Path(args.out) / "adapter"))
    saved = time.time()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if not losses:  # fewer steps than logging_steps: only the run-average summary was logged
        losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    result = {
        "imported_at": IMPORTED_AT,
        "data_ready": data_ready,
        "model_ready": model_ready,
        "train_begin": clock.train_begin,
        "step_ends": clock.step_ends,
        "trained": trained,
        "saved": saved,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evaluation.get("eval_loss"),
        "log_history": trainer.state.log_history,
        "examples": len(dataset),
        "real_tokens": collator.real[: args.steps],
        "padded_tokens": collator.padded[: args.steps],
        "torch_threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": str(training_args.optim),
    }
    Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
