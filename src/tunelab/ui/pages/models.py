"""Models: base models, fine-tuned adapters and exports with their lineage (base → dataset → run → exports)."""

from __future__ import annotations

import streamlit as st

from tunelab.ui import data


def render() -> None:
    """The lineage table, then the same grouped by base model."""
    st.title("Models")
    rows = data.lineage()
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
        with st.expander(base, expanded=len(bases) <= 3):
            for row in (r for r in rows if r["base"] == base):
                chain = [f"`{row['dataset']}`", f"run `{row['run']}` ({row['status']})"]
                if row["adapter"]:
                    chain.append(f"`{row['adapter']}`")
                if row["exports"]:
                    chain.append(row["exports"])
                st.markdown(" → ".join(chain))
