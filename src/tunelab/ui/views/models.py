"""Models: base models, fine-tuned adapters and exports with their lineage (base → dataset → run → exports)."""

from __future__ import annotations

import streamlit as st

from tunelab.ui import actions

LINEAGE_SHOWN = 25


def render() -> None:
    """The lineage table, then the same grouped by base model."""
    st.title("Models")
    rows = actions.lineage()
    if not rows:
        st.info("No runs yet, so no fine-tuned models.")
        return
    bases = sorted({row["base"] for row in rows})
    st.caption(
        f"{len(bases)} base models, {sum(1 for r in rows if r['adapter'])} fine-tuned, "
        f"{sum(1 for r in rows if r['exports'])} exported"
    )
    st.dataframe(rows, hide_index=True, width="stretch", key="models_table")
    st.subheader("Lineage")
    for base in bases:
        runs = [r for r in rows if r["base"] == base]
        with st.expander(f"{base} ({len(runs)} runs)", expanded=len(bases) <= 3):
            # Newest first, and only the newest few: the table above holds them all, and a thousand
            # markdown lines would double the page's render time.
            for row in runs[:LINEAGE_SHOWN]:
                st.markdown(" → ".join(chain(row)))
            if len(runs) > LINEAGE_SHOWN:
                st.caption(f"… and {len(runs) - LINEAGE_SHOWN} older runs (in the table above)")


def chain(row: dict[str, str]) -> list[str]:
    """One lineage line: dataset → run → adapter → exports."""
    out = [f"`{row['dataset']}`", f"run `{row['run']}` ({row['status']})"]
    if row["adapter"]:
        out.append(f"`{row['adapter']}`")
    if row["exports"]:
        out.append(row["exports"])
    return out
