"""Runs: every run with its status, backend, model, data, method, progress, best val loss and duration."""

from __future__ import annotations

import streamlit as st

from tunelab.ui import actions, nav

SORTABLE = ("created_at", "status", "best_val_loss", "duration_s", "model", "dataset", "method", "backend")


def render() -> None:
    """The runs table with a text filter, a status filter, a sort, and links to each run and to compare."""
    st.title("Runs")
    rows = actions.run_rows()
    if not rows:
        st.info("No runs yet: start one on the **New fine-tune** page or with `tunelab train CONFIG`.")
        return
    left, mid, right, order = st.columns([3, 3, 2, 1])
    text = left.text_input("Filter", placeholder="id, model, dataset, method…", key="runs_filter")
    statuses = mid.multiselect("Status", sorted({r["status"] for r in rows}), key="runs_status")
    by = right.selectbox("Sort by", SORTABLE, key="runs_sort")
    descending = order.toggle("Desc", value=True, key="runs_desc")
    shown = sort_rows(actions.filter_rows(rows, text=text, statuses=statuses), by, descending=descending)
    st.caption(f"{len(shown)} of {len(rows)} runs")
    table = [{**row, "open": f"/run?run={row['id']}"} for row in shown]
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_order=[
            "open",
            "id",
            "name",
            "status",
            "backend",
            "device",
            "model",
            "dataset",
            "method",
            "steps",
            "best_val_loss",
            "duration_s",
            "created_at",
        ],
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open"),
            "best_val_loss": st.column_config.NumberColumn("best val loss", format="%.4f"),
            "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
        },
        key="runs_table",
    )
    chosen = st.multiselect("Compare runs", [r["id"] for r in shown], key="runs_compare")
    if st.button("Compare selected", disabled=len(chosen) < 2, key="runs_compare_go"):
        nav.go("compare", runs=",".join(chosen))


def sort_rows(rows: list[dict], by: str, *, descending: bool) -> list[dict]:
    """Rows sorted on ``by``; empty values (a run still queued has no loss) always go last."""
    present = [r for r in rows if r.get(by) not in (None, "")]
    missing = [r for r in rows if r.get(by) in (None, "")]
    return sorted(present, key=lambda r: r[by], reverse=descending) + missing
