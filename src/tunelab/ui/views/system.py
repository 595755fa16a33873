"""System: what `tunelab doctor` knows, plus live CPU, memory and GPU use."""

from __future__ import annotations

from typing import Any

import streamlit as st

from tunelab.ui import actions


@st.cache_data(ttl=300, show_spinner="checking the machine…")
def _doctor() -> dict[str, Any]:
    return actions.doctor()  # probes torch and mlx once; cached since the answer rarely changes


def render() -> None:
    """Doctor facts (hardware, packages, backend choice, capabilities) and a live usage panel."""
    st.title("System")
    _usage()
    report = _doctor()
    hw = report["hardware"]
    st.subheader("Machine")
    memory = f"{hw['memory_bytes'] / 2**30:.1f} GiB" if hw.get("memory_bytes") else "unknown"
    st.write(f"{hw['os']} · {hw['machine']} · {hw['cpu']} · {hw['cores']} cores · {memory} · Python {hw['python']}")
    auto = report["auto"]
    st.write(f"Auto backend: **{auto['backend'] or 'none'}** — {auto['reason']}")
    st.subheader("Installed")
    st.dataframe([{"package": k, "version": v or "missing"} for k, v in report["installed"].items()], hide_index=True)
    st.subheader("Capabilities")
    st.dataframe(report["capabilities"], hide_index=True, width="stretch")


@st.fragment(run_every=2.0)
def _usage() -> None:
    usage = actions.live_usage()
    cols = st.columns(2 + len(usage["gpus"]))
    cols[0].metric("CPU", f"{usage['cpu_percent']:.0f}%")
    cols[0].progress(min(usage["cpu_percent"] / 100, 1.0))
    used, total = usage["memory_used_bytes"] / 2**30, usage["memory_total_bytes"] / 2**30
    cols[1].metric("Memory", f"{used:.1f} / {total:.1f} GiB")
    cols[1].progress(min(usage["memory_percent"] / 100, 1.0))
    for col, gpu in zip(cols[2:], usage["gpus"], strict=True):
        memory = f"{gpu['used_mib'] / 1024:.1f} / {gpu['total_mib'] / 1024:.1f} GiB"
        col.metric(gpu["name"], f"{gpu['percent']:.0f}% · {memory}")
