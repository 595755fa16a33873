"""Plotly figures for metric curves (plotly is imported here, on the first chart, not at start-up)."""

from __future__ import annotations

from typing import Any


def lines(series: dict[str, list[tuple[int, float]]], title: str) -> Any:
    """One line per named series of ``(step, value)`` points, against the step."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, points in series.items():
        mode = "lines+markers" if len(points) <= 50 else "lines"  # markers on a long curve only hide it
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode=mode, name=name))
    # The legend even for one line: "Eval metrics" or "Reward by function" alone don't say which metric it is.
    fig.update_layout(title=title, xaxis_title="step", height=320, margin={"l": 40, "r": 20, "t": 50, "b": 40},
                      showlegend=True)  # fmt: skip
    return fig
