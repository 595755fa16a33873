"""The run page's Evaluation tab shows the newest `tunelab eval`: scores beside the base's, and every answer."""

from __future__ import annotations

from tests.ui.conftest import Registry, page_test


def test_the_evaluation_tab_pages_through_the_runs_answers(registry_copy: Registry) -> None:
    from tunelab import services

    run_id = registry_copy.run_ids[0]
    empty = page_test("run", run=run_id).run()
    assert not empty.exception
    assert any(f"tunelab eval {run_id}" in c.value for c in empty.caption)

    report = services.eval_run(run_id, metrics=["exact_match", "rouge_l"], limit=3, max_new_tokens=4)
    at = page_test("run", run=run_id).run()
    assert not at.exception
    scores = next(d.value for d in at.dataframe if "metric" in d.value.columns)
    assert list(scores["metric"]) == ["exact_match", "rouge_l"]
    assert list(scores["fine-tuned"]) == [report.scores["exact_match"], report.scores["rouge_l"]]
    assert report.base_scores is not None and list(scores["base"]) == [report.base_scores[m] for m in scores["metric"]]
    examples = next(d.value for d in at.dataframe if "fine-tuned" in d.value.columns and "where" in d.value.columns)
    assert len(examples) == 3 and examples["where"].iloc[0].endswith(":1")
