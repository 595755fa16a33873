"""New fine-tune: a form that builds a config, validates it like the CLI, estimates memory and queues a job."""

from __future__ import annotations

from typing import Any, get_args

import streamlit as st

from tunelab.config.schema import BackendName, Scheduler
from tunelab.errors import TunelabError
from tunelab.ui import actions, nav
from tunelab.vocab import DATA_FORMATS, LORA_METHODS, METHODS


def render() -> None:
    """Form → validated config → YAML, memory estimate and CLI command → submit as a job."""
    st.title("New fine-tune")
    raw = _form()
    try:
        cfg = actions.build_config(raw)
    except TunelabError as exc:
        st.error(str(exc))  # the very text `tunelab train` prints for the same config
        return
    yaml_col, info_col = st.columns(2)
    yaml_col.subheader("Config")
    yaml_col.code(actions.config_yaml(cfg.to_dict()), language="yaml")
    with info_col:
        st.subheader("Memory")
        _estimate(cfg)
        st.subheader("The same from a terminal")
        st.code(actions.cli_command(cfg), language="bash")
    if st.button("Submit job", type="primary", key="new_submit"):
        try:
            st.session_state["new_last_job"] = actions.submit(cfg)
        except TunelabError as exc:
            st.error(str(exc))
            return
    job = st.session_state.get("new_last_job")
    if job:
        st.success(f"Queued job {job['id']} (run {job['run_id']}). A `tunelab worker` picks it up.")
        if st.button("Open its run page", key="new_open_run"):
            nav.go("run", run=job["run_id"])


def _form() -> dict[str, Any]:
    """The widgets; values go to the schema unchecked, so every message comes from validation."""
    st.subheader("Model and data")
    model = st.text_input("Model (local checkpoint folder or hub id)", key="new_model")
    uploads = actions.uploaded_datasets()
    picked = st.selectbox("Uploaded dataset", ["(type a path below)", *uploads], key="new_upload")
    train = st.text_input("Training data (file or folder)", key="new_train")
    train = train or (picked if picked in uploads else "")
    cols = list(st.columns(3))
    fmt = cols[0].selectbox("Format", DATA_FORMATS, key="new_format")
    seq = cols[1].number_input("Max sequence length", value=1024, step=64, key="new_seq")
    backend = cols[2].selectbox("Backend", get_args(BackendName), key="new_backend")
    st.subheader("Method")
    cols = list(st.columns(4))
    method: dict[str, Any] = {"name": cols[0].selectbox("Method", METHODS, key="new_method")}
    if method["name"] in LORA_METHODS:
        method["rank"] = cols[1].number_input("Rank", value=8, step=1, key="new_rank")
        method["alpha"] = cols[2].number_input("Alpha", value=16.0, step=1.0, key="new_alpha")
        method["dropout"] = cols[3].number_input("Dropout", value=0.0, step=0.05, key="new_dropout")
    st.subheader("Training")
    cols = list(st.columns(5))
    train_cfg = {
        "steps": cols[0].number_input("Steps", value=100, step=10, key="new_steps"),
        "batch_size": cols[1].number_input("Batch size", value=4, step=1, key="new_batch"),
        "lr": _number(cols[2].text_input("Learning rate", value="2e-4", key="new_lr")),
        "scheduler": cols[3].selectbox("Schedule", get_args(Scheduler), index=2, key="new_sched"),
        "eval_every": cols[4].number_input("Eval every (0 = end)", value=0, step=10, key="new_eval"),
    }
    name = st.text_input("Run name (optional)", key="new_name")
    raw: dict[str, Any] = {
        "model": {"path": model},
        "data": {"train": train, "format": fmt, "max_seq_len": int(seq)},
        "method": method,
        "train": train_cfg,
        "backend": backend,
    }
    if name:
        raw["name"] = name
    return raw


def _number(text: str) -> float | str:
    """A float when the text is one; otherwise the text itself, for the schema to reject with its message."""
    try:
        return float(text)
    except ValueError:
        return text


def _estimate(cfg: Any) -> None:
    try:
        plan = actions.estimate_memory(cfg)
    except TunelabError as exc:
        st.caption(f"No estimate: {exc.message}")
        return
    est = plan.get("estimate")
    if not est:
        st.caption(f"No estimate: {plan.get('problem') or 'this architecture is not covered'}")
        return
    budget = plan["budget"]["bytes"]
    st.metric(
        "Estimated peak",
        f"{est['total_bytes'] / 2**30:.2f} GiB",
        help="The same figure `tunelab estimate` prints for this config.",
    )
    if budget:
        st.caption(f"Budget {budget / 2**30:.1f} GiB — {'fits' if plan['fits'] else 'does NOT fit'}")
