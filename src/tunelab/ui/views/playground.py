"""Playground: chat with a finished run's model, or ask its base and the fine-tune the same prompt."""

from __future__ import annotations

import streamlit as st

from tunelab.errors import TunelabError
from tunelab.ui import actions


@st.cache_resource(max_entries=2, show_spinner="loading the model…")
def _generator(run_id: str, base: bool) -> object:
    # Loading a model takes seconds; keep the last two so each prompt costs only the generation.
    return actions.load_generator(run_id, base=base)


def render() -> None:
    """Pick a finished run, then chat with it or compare it with its base model."""
    st.title("Playground")
    models = actions.chat_models()
    if not models:
        st.info("No finished run with an adapter or a model yet.")
        return
    run_id = st.selectbox("Run", [m["id"].removeprefix("run:") for m in models], key="pg_run")
    tokens = st.slider("Max new tokens", 8, 512, 64, key="pg_tokens")
    side_by_side = st.toggle("Base vs fine-tuned", key="pg_side")
    history = st.session_state.setdefault("pg_history", [])
    for turn in history:
        with st.chat_message(turn["role"]):
            st.markdown(turn["text"])
    prompt = st.chat_input("Ask something", key="pg_prompt")
    if not prompt:
        return
    history.append({"role": "user", "text": prompt})
    try:
        tuned = actions.complete(_generator(run_id, False), prompt, max_new_tokens=tokens)
        base = actions.complete(_generator(run_id, True), prompt, max_new_tokens=tokens) if side_by_side else None
    except TunelabError as exc:
        st.error(str(exc))
        return
    if base is None:
        history.append({"role": "assistant", "text": tuned})
    else:
        history.append({"role": "assistant", "text": f"**fine-tuned:** {tuned}\n\n**base:** {base}"})
    st.rerun()
