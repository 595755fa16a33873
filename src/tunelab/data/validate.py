"""`tunelab data validate`: the same checks training runs, alone, with a report."""

from __future__ import annotations

from typing import Any

from tunelab.config.schema import DataCfg
from tunelab.data.formats import to_samples
from tunelab.data.prepare import length_stats, load_records
from tunelab.data.templates import template_for
from tunelab.data.tokenize import tokenize_samples


def validate_dataset(
    path: str,
    *,
    valid: str | None = None,
    fmt: str = "auto",
    model: str | None = None,
    max_seq_len: int = 1024,
    mask_prompt: bool = True,
) -> dict[str, Any]:
    """Validate every record (raising :class:`DataError` on the first bad one) and summarise.

    With ``model`` (a checkpoint folder or hub id) the report adds token-length
    statistics computed with that model's tokenizer and chat template.
    """
    cfg = DataCfg(train=path, valid=valid, format=fmt, max_seq_len=max_seq_len, mask_prompt=mask_prompt)  # type: ignore[arg-type,call-arg]
    loaded = load_records(cfg)
    splits = {"train": (loaded.train, loaded.train_path), "valid": (loaded.valid, loaded.valid_path)}
    report: dict[str, Any] = {"format": loaded.format, "splits": {}}
    tokenizer, template = None, None
    if model is not None:
        from tunelab.hub import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(model))
        template, report["chat_template"] = template_for(tokenizer)
    for name, (records, where) in splits.items():
        if records is None:
            continue
        entry: dict[str, Any] = {"path": str(where), "records": len(records)}
        if tokenizer is not None and template is not None:
            tokenized = tokenize_samples(
                to_samples(records, loaded.format),
                tokenizer,
                template=template,
                max_seq_len=max_seq_len,
                mask_prompt=mask_prompt,
                sources=[(r.path, r.line) for r in records],
            )
            entry["tokens"] = length_stats(tokenized)
        else:
            entry["chars"] = _char_stats(records)
        report["splits"][name] = entry
    return report


def _char_stats(records: list[Any]) -> dict[str, float]:
    sizes = [len(str(r.data)) for r in records]
    return {"min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)}


__all__ = ["validate_dataset"]
