"""The dashboard's pages by name, so one page can send the browser to another (with query parameters)."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

# url path -> (section, title); the render functions are looked up lazily so pages may import this module.
LAYOUT = {
    "runs": ("Fine-tunes", "Runs"),
    "run": ("Fine-tunes", "Run"),
    "compare": ("Fine-tunes", "Compare"),
    "sweeps": ("Fine-tunes", "Sweeps"),
    "new": ("Fine-tunes", "New fine-tune"),
    "datasets": ("Data and models", "Datasets"),
    "models": ("Data and models", "Models"),
    "playground": ("Data and models", "Playground"),
    "system": ("Machine", "System"),
}


def renderer(url_path: str) -> Callable[[], None]:
    """The function that draws the page at ``/url_path``."""
    from tunelab.ui.views import datasets, models, new_run, playground, run_detail, runs, sweeps, system

    return {
        "runs": runs.render,
        "run": run_detail.render,
        "compare": run_detail.render_compare,
        "sweeps": sweeps.render,
        "new": new_run.render,
        "datasets": datasets.render,
        "models": models.render,
        "playground": playground.render,
        "system": system.render,
    }[url_path]


def page(url_path: str) -> st.Page:
    """The page served at ``/url_path`` (pages are matched by URL path, so a fresh object is the same page)."""
    _, title = LAYOUT[url_path]
    return st.Page(renderer(url_path), title=title, url_path=url_path, default=url_path == "runs")


def sections() -> dict[str, list[st.Page]]:
    """Every page grouped by sidebar section, for ``st.navigation``."""
    out: dict[str, list[st.Page]] = {}
    for url_path, (section, _) in LAYOUT.items():
        out.setdefault(section, []).append(page(url_path))
    return out


def go(url_path: str, **params: str) -> None:
    """Switch to another page with query parameters (e.g. ``go("run", run=run_id)``)."""
    st.switch_page(page(url_path), query_params=params or None)
