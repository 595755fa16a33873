"""The dashboard's entry script: `streamlit run` executes this file (``tunelab ui`` does it for you)."""

from __future__ import annotations

import streamlit as st

from tunelab.ui.nav import sections

st.set_page_config(page_title="tunelab", layout="wide")
st.navigation(sections()).run()
