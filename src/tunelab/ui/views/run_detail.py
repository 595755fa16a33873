"""One run (live charts, config, logs, checkpoints, artifacts) and the compare view of several runs."""

from __future__ import annotations

from typing import Any

import streamlit as st

from tunelab.errors import TunelabError
from tunelab.ui import actions, charts
from tunelab.vocab import ACTIVE_STATUSES

REFRESH_S = 2.0  # while a run trains, its charts and status poll the registry this often


def render() -> None:
    """The run named by ``?run=ID`` (or picked from a list)."""
    st.title("Run")
    run_id = _pick_run()
    if run_id is None:
        return
    try:
        run = actions.run_detail(run_id)
    except TunelabError as exc:
        st.error(str(exc))
        return
    active = run["live_status"] in ACTIVE_STATUSES
    _live(run["id"], refresh=REFRESH_S if active else None)
    config_tab, logs_tab, files_tab, eval_tab = st.tabs(["Config", "Logs", "Checkpoints and artifacts", "Evaluation"])
    config_tab.code(actions.config_yaml(run["config"]), language="yaml")
    with logs_tab:
        _logs(run)
    with files_tab:
        _files(run)
    with eval_tab:
        _samples(run)
        _evaluation(run["id"])


def _pick_run() -> str | None:
    wanted = st.query_params.get("run")
    ids = [row["id"] for row in actions.run_rows(limit=200)]
    if wanted and wanted not in ids:
        ids.insert(0, wanted)
    if not ids:
        st.info("No runs yet.")
        return None
    chosen = st.selectbox("Run", ids, index=ids.index(wanted) if wanted else 0, key="run_pick")
    if chosen != wanted:
        st.query_params["run"] = chosen
    return chosen


def _live(run_id: str, *, refresh: float | None) -> None:
    # A fragment re-runs alone on its timer: the charts update without reloading the page around them.
    @st.fragment(run_every=refresh)
    def body() -> None:
        run = actions.run_detail(run_id)
        status = run["live_status"]
        cols = st.columns(5)
        cols[0].metric("Status", status)
        cols[1].metric("Step", f"{run.get('step') or 0}/{run.get('total_steps') or '?'}")
        cols[2].metric("Backend", f"{run.get('backend') or '—'} {run.get('device') or ''}")
        row = actions.run_row(run)
        cols[3].metric("Best val loss", "—" if row["best_val_loss"] is None else f"{row['best_val_loss']:.4f}")
        cols[4].metric("Duration", "—" if row["duration_s"] is None else f"{row['duration_s']:.0f} s")
        if run.get("error"):
            st.error(run["error"])
        if status in ACTIVE_STATUSES and st.button("Cancel", key="run_cancel"):
            job = _job_of(run)
            if job:
                actions.cancel(job)
        series = actions.metric_series(run_id)
        if not series:
            st.info("No metrics yet: the first points appear after the first logged step.")
        _charts(series)
        if refresh and status not in ACTIVE_STATUSES:
            st.rerun()  # finished: one full rerun stops the timer and shows the final artifacts

    body()


def _charts(series: dict[str, list[tuple[int, float]]]) -> None:
    """One chart per group of the run's metrics; the eval metrics' chart beside the loss's when both exist."""
    groups = actions.chart_groups(series)
    pair = [title for title in ("Loss", actions.EVAL_CHART) if title in groups]
    places = dict(zip(pair, st.columns(2), strict=True)) if len(pair) == 2 else {}
    for title, names in groups.items():
        place = places.get(title, st)
        place.plotly_chart(charts.lines({n: series[n] for n in names}, title), key=f"c_{title}")


def _job_of(run: dict[str, Any]) -> str | None:
    return next((e["job_id"] for e in run["events"] if e.get("job_id")), None)


def _logs(run: dict[str, Any]) -> None:
    events = run["events"]  # logs and status changes only (actions.run_detail)
    if not events:
        st.caption("No job events: this run was started with `tunelab train`, not as a job.")
        return
    st.dataframe(
        [{"time": e["time"], "type": e["type"], "details": _details(e)} for e in events],
        hide_index=True,
        width="stretch",
    )


def _details(event: dict[str, Any]) -> str:
    fixed = {"id", "type", "job_id", "run_id", "time"}
    return ", ".join(f"{k}: {v}" for k, v in event.items() if k not in fixed)


def _files(run: dict[str, Any]) -> None:
    st.write(f"Output folder: `{run['output_dir']}`")
    artifacts = run.get("artifact_list") or []
    if not artifacts:
        st.caption("No checkpoints or artifacts yet.")
        return
    st.dataframe(artifacts, hide_index=True, width="stretch")


def _samples(run: dict[str, Any]) -> None:
    """The answers to ``train.sample_every``'s prompts, step by step (from the run's events)."""
    rows = run["samples"]
    if rows:
        st.subheader("Samples while training")
        st.dataframe(rows, hide_index=True, width="stretch", key="train_samples")


def _evaluation(run_id: str) -> None:
    """The newest `tunelab eval` of the run: base vs fine-tuned per metric, then every example's answers."""
    found = actions.eval_results(run_id)
    if found is None:
        st.caption(f"Not evaluated yet: `tunelab eval {run_id}` scores it and its base on held-out examples.")
        return
    st.write(f"Held-out examples: `{found['data']}`")
    base = found["base_scores"] or {}
    table = [{"metric": name, "base": base.get(name), "fine-tuned": value} for name, value in found["scores"].items()]
    st.dataframe(table, hide_index=True, width="stretch", key="eval_scores")
    if found["missing"]:
        st.warning(f"The answers file {found['path']} is gone from disk.")
        return
    rows = [
        {"where": e["where"], "prompt": _prompt_text(e["prompt"]), "reference": e["reference"],
         "fine-tuned": e["prediction"], "base": e.get("base_prediction")}
        for e in found["examples"]
    ]  # fmt: skip
    st.dataframe(rows, hide_index=True, width="stretch", key="eval_examples")


def _prompt_text(prompt: Any) -> str:
    """A chat prompt's last message (the question), or a completion prompt as is."""
    return str(prompt[-1]["content"]) if isinstance(prompt, list) and prompt else str(prompt)


def render_compare() -> None:
    """Several runs' curves overlaid on one chart per metric, and their configs' differences."""
    st.title("Compare runs")
    rows = actions.run_rows(limit=500)
    ids = [row["id"] for row in rows]
    wanted = [i for i in (st.query_params.get("runs") or "").split(",") if i in ids]
    chosen = st.multiselect("Runs", ids, default=wanted, key="compare_pick")
    if len(chosen) < 2:
        st.info("Pick two or more runs to compare.")
        return
    st.query_params["runs"] = ",".join(chosen)
    series = {run_id: actions.metric_series(run_id) for run_id in chosen}
    for title, names in actions.chart_groups(n for points in series.values() for n in points).items():
        overlay = {
            f"{run_id} {name}": points[name] for run_id, points in series.items() for name in names if name in points
        }
        if overlay:
            st.plotly_chart(charts.lines(overlay, title), key=f"cmp_{title}")
    st.subheader("Config differences")
    diff = actions.config_diff({run_id: actions.run_detail(run_id)["config"] for run_id in chosen})
    if diff:
        st.dataframe(diff, hide_index=True, width="stretch")
    else:
        st.caption("The configs are identical.")
