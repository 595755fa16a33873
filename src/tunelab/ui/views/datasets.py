"""Datasets: upload (validated, errors name the line), format, counts, token lengths and the masking preview."""

from __future__ import annotations

import html
from typing import Any

import streamlit as st

from tunelab.errors import TunelabError
from tunelab.ui import actions
from tunelab.vocab import UPLOAD_SUFFIXES


def render() -> None:
    """Upload or pick a data file, then inspect it with a model's tokenizer."""
    st.title("Datasets")
    upload = st.file_uploader("Upload a data file", type=[s.lstrip(".") for s in UPLOAD_SUFFIXES], key="ds_upload")
    if upload is not None and st.session_state.get("ds_uploaded_name") != upload.name:
        try:
            stored = actions.upload(upload.getvalue(), upload.name)
        except TunelabError as exc:
            st.error(str(exc))  # DataError says which line is wrong and why
        else:
            st.session_state["ds_uploaded_name"] = upload.name
            st.session_state["ds_path"] = stored["path"]
            st.success(f"Stored as {stored['path']} ({stored['format']})")
    choices = actions.uploaded_datasets()
    hint = "Uploads are stored under $TUNELAB_HOME/datasets: " + ", ".join(choices[-3:])
    path = st.text_input("Dataset (file or folder)", key="ds_path", help=hint)
    model = st.text_input("Model whose tokenizer to use (optional)", key="ds_model")
    seq = st.number_input("Max sequence length", value=1024, min_value=8, step=64, key="ds_seq")
    if not path:
        st.info("Upload a file or type a path to inspect it.")
        return
    try:
        report = actions.dataset_report(path, model=model or None, max_seq_len=int(seq))
    except TunelabError as exc:
        st.error(str(exc))
        return
    _summary(report)
    if model:
        _masking(path, model, int(seq))


def _summary(report: dict[str, Any]) -> None:
    st.subheader(f"Format: {report['format']}")
    cols = st.columns(len(report["splits"]))
    for col, (split, entry) in zip(cols, report["splits"].items(), strict=True):
        col.metric(f"{split} records", entry["records"])
        tokens = entry.get("tokens")
        if tokens:
            col.caption(
                f"tokens: mean {tokens.get('mean', 0):.0f}, max {tokens.get('max')}, "
                f"truncated {tokens.get('truncated', 0)}"
            )
    train = report["splits"]["train"]
    histogram = train.get("histogram")
    if histogram:
        import plotly.graph_objects as go

        labels = [f"{b['low']}–{b['high']}" if b["high"] else f"> {b['low'] - 1}" for b in histogram]
        fig = go.Figure(go.Bar(x=labels, y=[b["count"] for b in histogram]))
        fig.update_layout(title="Token lengths (train)", xaxis_title="tokens", yaxis_title="examples", height=300)
        st.plotly_chart(fig, key="ds_hist")


def _masking(path: str, model: str, max_seq_len: int) -> None:
    st.subheader("What the model is trained on")
    st.caption("Highlighted tokens carry loss; the rest are read but not learned.")
    try:
        preview = actions.masking_preview(path, model=model, max_seq_len=max_seq_len)
    except TunelabError as exc:
        st.error(str(exc))
        return
    for example in preview["examples"]:
        st.markdown(f"**line {example['line']}** — {example['trained']}/{example['total']} tokens trained")
        st.html(highlight(example["tokens"]))


def highlight(tokens: list[list[Any]]) -> str:
    """HTML with trained tokens on a green background (escaped: the data is the user's, not markup)."""
    parts = []
    for text, _, trained in tokens:
        safe = html.escape(text).replace("\n", "↵<br>")
        parts.append(f'<span class="trained" style="background:#b7f5c0">{safe}</span>' if trained else safe)
    return f'<div style="font-family:monospace;white-space:pre-wrap">{"".join(parts)}</div>'
