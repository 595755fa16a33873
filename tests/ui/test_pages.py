"""Each dashboard page's logic, run by Streamlit's AppTest against a registry holding two real tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tests.ui.conftest import Registry, page_test

APP = Path(__file__).resolve().parents[2] / "src" / "tunelab" / "ui" / "app.py"


def _charts(at: AppTest) -> list:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def test_app_opens_on_the_runs_table(in_registry: Registry) -> None:
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "Runs"
    ids = list(at.dataframe[0].value["id"])
    assert sorted(ids) == sorted(in_registry.run_ids)
    assert set(at.dataframe[0].value["status"]) == {"completed"}
    model = in_registry.model  # a folder named "model", like most: its parent tells runs apart (issue 22 item 21)
    assert set(at.dataframe[0].value["model"]) == {f"{model.parent.name}/{model.name}"}


def test_runs_filter_and_sort(in_registry: Registry) -> None:
    at = page_test("runs").run()
    at.text_input(key="runs_filter").set_value("ui-test-1").run()
    assert list(at.dataframe[0].value["id"]) == [in_registry.run_ids[1]]
    assert "1 of 2 runs" in at.caption[0].value
    at.text_input(key="runs_filter").set_value("").run()
    at.selectbox(key="runs_sort").set_value("best_val_loss").run()
    losses = list(at.dataframe[0].value["best_val_loss"])
    assert losses == sorted(losses, reverse=True) and all(v is not None for v in losses)
    at.multiselect(key="runs_status").set_value(["completed"])
    at.text_input(key="runs_filter").set_value("no-such-run").run()
    assert at.dataframe[0].value.empty and "0 of 2 runs" in at.caption[0].value


def test_run_page_charts_config_and_artifacts(in_registry: Registry) -> None:
    run_id = in_registry.run_ids[0]
    at = page_test("run", run=run_id).run()
    assert not at.exception
    assert at.selectbox(key="run_pick").value == run_id
    assert at.metric[0].value == "completed"
    charts = {c["layout"]["title"]["text"]: c for c in _charts(at)}
    assert {"Loss", "Learning rate", "Tokens/s"} <= set(charts)
    loss = {trace["name"]: trace for trace in charts["Loss"]["data"]}
    assert len(loss["train_loss"]["x"]) == 6 and len(loss["val_loss"]["x"]) == 2
    assert "lr: 0.005" in at.code[0].value
    artifacts = next(d.value for d in at.dataframe if "kind" in d.value.columns)
    assert "adapter" in set(artifacts["kind"])


def test_compare_overlays_curves_and_diffs_configs(in_registry: Registry) -> None:
    first, second = in_registry.run_ids
    at = page_test("compare", runs=f"{first},{second}").run()
    assert not at.exception
    loss = next(c for c in _charts(at) if c["layout"]["title"]["text"] == "Loss")
    names = {trace["name"] for trace in loss["data"]}
    assert {f"{first} train_loss", f"{second} train_loss", f"{first} val_loss"} <= names
    diff = at.dataframe[0].value.set_index("key")
    assert diff.loc["train.lr", first] == "0.005" and diff.loc["train.lr", second] == "0.01"
    assert diff.loc["method.rank", second] == "8"
    assert "train.steps" not in diff.index  # equal values are not differences


def test_new_fine_tune_validates_previews_and_submits(registry_copy: Registry) -> None:
    from tunelab import services

    at = page_test("new").run()
    assert "model.path" in at.error[0].value  # empty form: the CLI's message names the key to fill
    at.text_input(key="new_model").set_value(str(registry_copy.model))
    at.text_input(key="new_train").set_value(str(registry_copy.data))
    at.text_input(key="new_lr").set_value("-1").run()
    assert "train.lr" in at.error[0].value and "invalid config" in at.error[0].value
    at.text_input(key="new_lr").set_value("3e-3")
    at.number_input(key="new_steps").set_value(4)
    at.number_input(key="new_seq").set_value(128).run()
    assert not at.error
    yaml_text, command = at.code[0].value, at.code[1].value
    assert "lr: 0.003" in yaml_text and "steps: 4" in yaml_text
    assert command.endswith("tunelab jobs submit config.yaml") and yaml_text in command
    assert "GiB" in at.metric[0].value  # the estimator covers the tiny llama
    at.button(key="new_submit").click().run()
    job = next(j for j in services.list_jobs() if j["status"] == "queued")
    assert job["run_id"] in at.success[0].value
    assert services.show_run(job["run_id"])["config"]["train"]["lr"] == 3e-3
    services.cancel_job(job["id"])


def test_datasets_upload_report_and_masking(registry_copy: Registry) -> None:
    at = page_test("datasets").run()
    good_row = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    bad_row = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    at.file_uploader(key="ds_upload").upload("bad.jsonl", good_row + bad_row).run()
    shown = at.error[0].value  # every bad record, grouped by kind, named by the user's file, never the staged one
    assert "conversation has no assistant message" in shown and "bad.jsonl: line 2" in shown, shown
    assert ".incoming" not in shown, shown
    good = (registry_copy.data / "train.jsonl").read_bytes()
    at.file_uploader(key="ds_upload").upload("chat.jsonl", good).run()
    assert not at.error
    stored = at.text_input(key="ds_path").value
    assert stored.endswith(".jsonl") and Path(stored).read_bytes() == good
    at.text_input(key="ds_model").set_value(str(registry_copy.model))
    at.number_input(key="ds_seq").set_value(64).run()
    assert "chat" in at.subheader[0].value and at.metric[0].value == "120"
    assert any(c["layout"]["title"]["text"].startswith("Token lengths") for c in _charts(at))
    shown = "".join(el.proto.body for el in at.get("html"))
    assert shown.count('class="trained"') > 0 and "&lt;" not in shown.split("trained")[0][-5:]


def test_models_lineage(in_registry: Registry) -> None:
    at = page_test("models").run()
    rows = at.dataframe[0].value
    assert set(rows["run"]) == set(in_registry.run_ids)
    assert set(rows["base"]) == {str(in_registry.model)}
    assert all(rows["adapter"].str.len() > 0)
    assert any(in_registry.run_ids[0] in md.value for md in at.markdown)


@pytest.mark.timeout(180)
def test_playground_answers_with_base_and_tuned(in_registry: Registry) -> None:
    at = page_test("playground", timeout=120).run()
    at.selectbox(key="pg_run").set_value(in_registry.run_ids[0])
    at.toggle(key="pg_side").set_value(True).run()
    at.chat_input(key="pg_prompt").set_value("List: tea, milk").run()
    assert not at.exception and not at.error
    messages = at.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    answer = messages[1].markdown[0].value
    assert "**fine-tuned:**" in answer and "**base:**" in answer


def test_system_shows_doctor_and_live_use(in_registry: Registry) -> None:
    at = page_test("system", timeout=60).run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels[:2] == ["CPU", "Memory"] and at.metric[0].value.endswith("%")
    assert any("Auto backend" in md.value for md in at.markdown)
    assert "torch" in set(at.dataframe[0].value["package"])


def test_run_page_cancels_a_queued_job(registry_copy: Registry) -> None:
    from tests.integration.conftest import base_config

    from tunelab import services
    from tunelab.config.load import validate_config

    raw = base_config(registry_copy.model, registry_copy.data, registry_copy.home / "queued-out")
    job = services.submit_job(validate_config(raw))
    at = page_test("run", run=job["run_id"]).run()
    assert at.metric[0].value == "queued"
    assert "No metrics yet" in at.info[0].value
    at.button(key="run_cancel").click().run()
    assert services.show_job(job["id"])["status"] == "cancelled"
