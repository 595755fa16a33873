"""A run's data in the registry: hash, counts, tokenization cache key and stats; the second run hits the cache."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import base_config

from tunelab import services
from tunelab.config.load import validate_config
from tunelab.train.callbacks import BaseCallback


class Messages(BaseCallback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, text: str) -> None:
        self.lines.append(text)


def test_runs_record_their_data_and_reuse_the_tokenization(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    raw = base_config(e2e_model, chat_data / "train.jsonl", tmp_path / "first", steps=2)
    raw["data"]["valid_split"] = 0.25  # no valid file given: a quarter of train is held out
    first_log, second_log = Messages(), Messages()
    first = services.start_run(validate_config(raw), callbacks=[first_log])
    shown = services.show_run(first.run_id)
    dataset = shown["dataset"]
    assert dataset["num_train"] == 90 and dataset["num_valid"] == 30  # 120 records, exactly a quarter carved
    assert dataset["format"] == "chat" and len(dataset["content_hash"]) == 64
    assert dataset["cache_key"] and any(f"cache miss ({dataset['cache_key']})" in line for line in first_log.lines)
    assert dataset["stats"]["valid_split"] == 0.25 and dataset["stats"]["train"]["count"] == 90
    assert isinstance(first.metrics["val_loss"], float)  # the carved split was used for validation

    raw["output_dir"] = str(tmp_path / "second")
    second = services.start_run(validate_config(raw), callbacks=[second_log])
    assert any(f"cache hit ({dataset['cache_key']})" in line for line in second_log.lines)
    assert services.show_run(second.run_id)["dataset"]["cache_key"] == dataset["cache_key"]
