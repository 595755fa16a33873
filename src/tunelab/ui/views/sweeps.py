"""Sweeps: a sweep's trials ranked, a parallel-coordinates plot of values against the metric, the best
trial, and a link to compare the chosen trials' runs."""

from __future__ import annotations

from typing import Any

import streamlit as st

from tunelab.errors import TunelabError
from tunelab.services import sweeps
from tunelab.ui import nav


def render() -> None:
    """The sweep named by ``?sweep=ID`` (or the newest)."""
    st.title("Sweeps")
    listed = sweeps.list_sweeps(limit=100)
    if not listed:
        st.info("No sweeps yet: start one with `tunelab sweep CONFIG train.lr=1e-4,3e-4 method.rank=8,16`.")
        return
    ids = [s.id for s in listed]
    wanted = st.query_params.get("sweep")
    labels = {s.id: f"{s.id} {s.name or ''} ({s.status})" for s in listed}
    chosen: str | None = st.selectbox(
        "Sweep",
        ids,
        index=ids.index(wanted) if wanted in ids else 0,
        format_func=lambda sweep_id: labels[sweep_id],
        key="sweep_pick",
    )
    try:
        sweep = sweeps.show_sweep(chosen or ids[0])
    except TunelabError as exc:
        st.error(str(exc))
        return
    cols = st.columns(4)
    cols[0].metric("Status", sweep.status)
    cols[1].metric("Trials", f"{sum(r.status in ('completed', 'pruned') for r in sweep.results)}/{sweep.trials}")
    cols[2].metric("Search", sweep.search)
    best = sweep.best
    cols[3].metric(f"Best {sweep.metric}", f"{best.value:.4g}" if best and best.value is not None else "—")
    if best is not None:
        st.markdown(f"Best trial: **{best.trial}** ([run {best.run_id}](/run?run={best.run_id})) with {best.params}")
    rows = trial_rows(sweep.model_dump())
    figure = parallel_coordinates(rows, list(sweep.space), sweep.metric)
    if figure is not None:
        st.plotly_chart(figure, key="sweep_parcoords")
    st.dataframe(rows, hide_index=True, width="stretch", key="sweep_trials")
    runs = [r.run_id for r in sweep.results if r.run_id and r.value is not None]
    picked = st.multiselect("Compare trials' runs", runs, default=runs[:3], key="sweep_compare")
    if st.button("Compare selected", disabled=len(picked) < 2, key="sweep_compare_go"):
        nav.go("compare", runs=",".join(picked))


def trial_rows(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per trial: rank, trial, status, each searched value, the metric, the run."""
    rows = []
    for r in sweep["results"]:
        values = {key: _plain(r["params"].get(key)) for key in sweep["space"]}
        rows.append(
            {"rank": r["rank"], "trial": r["trial"], "status": r["status"], **values, sweep["metric"]: r["value"]}
            | {"run": r["run_id"]}
        )
    return rows


def parallel_coordinates(rows: list[dict[str, Any]], keys: list[str], metric: str) -> Any:
    """A Plotly parallel-coordinates figure (one axis per searched key and one for the metric), or None."""
    import plotly.graph_objects as go

    scored = [r for r in rows if r.get(metric) is not None and all(r.get(k) is not None for k in keys)]
    if not scored:
        return None
    dims = [_axis(key, [r[key] for r in scored]) for key in keys]
    values = [r[metric] for r in scored]
    dims.append({"label": metric, "values": values})
    line = {"color": values, "colorscale": "Viridis", "showscale": True, "reversescale": True}
    figure = go.Figure(go.Parcoords(line=line, dimensions=dims))
    figure.update_layout(title={"text": f"Trials: values against {metric}"})
    return figure


def _axis(key: str, values: list[Any]) -> dict[str, Any]:
    """A numeric axis, or a categorical one (ticks named after the values) for anything else."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return {"label": key, "values": values}
    names = sorted({str(v) for v in values})
    return {
        "label": key,
        "values": [names.index(str(v)) for v in values],
        "tickvals": list(range(len(names))),
        "ticktext": names,
    }


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str | bool) else str(value)
