"""Do the dashboard's pages render fast with 1,000 runs in the registry?

Fills a fresh registry with ``--runs`` completed runs (each with ``--points``
logged steps of train loss, val loss, lr, tokens/s and memory, and an adapter
artifact), then renders each page with Streamlit's AppTest — the same script
run the server does for a browser, minus the network and the browser's drawing.
Prints the median of ``--repeats`` renders per page, beside the time of the bare
service call underneath (``services.list_runs``) so the page's own cost shows as
a ratio, and checks each page against the 2 s budget.

    python bench/ui_render.py                    # 1,000 runs x 50 points
    python bench/ui_render.py --runs 5000 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

BUDGET_S = 2.0
PAGES = ("runs", "run", "compare", "models", "new", "datasets", "system")


def fill(runs: int, points: int) -> list[str]:
    """``runs`` completed runs with metric curves and an adapter each, written through the repository layer."""
    from tunelab.registry import repo
    from tunelab.registry.db import open_registry, session_scope

    ids = []
    with session_scope(open_registry()) as s:
        for i in range(runs):
            run_id = f"{i:08x}"
            config = {
                "model": {"path": f"/models/base-{i % 7}"},
                "data": {"train": f"/data/set-{i % 13}.jsonl", "max_seq_len": 1024},
                "method": {"name": ("lora", "dora", "full")[i % 3], "rank": 8 + i % 4},
                "train": {"steps": points, "lr": 1e-4 * (1 + i % 5), "batch_size": 8},
            }
            repo.create_run(s, run_id=run_id, config=config, output_dir=f"/runs/{run_id}", name=f"run-{i}")
            for step in range(1, points + 1):
                values = {"train_loss": 3.0 / step, "lr": 1e-4, "tokens_per_sec": 900.0 + i % 50,
                          "peak_memory_gb": 1.5}  # fmt: skip
                if step % 10 == 0:
                    values["val_loss"] = 3.2 / step
                repo.add_metrics(s, run_id=run_id, step=step, values=values)
            repo.add_artifact(s, run_id=run_id, kind="adapter", path=f"/runs/{run_id}/adapter")
            repo.update_run(s, run_id, status="completed", step=points, total_steps=points,
                            final_metrics={"best_val_loss": 3.2 / points})  # fmt: skip
            ids.append(run_id)
    return ids


def _page(url_path: str) -> None:
    from tunelab.ui.nav import renderer

    renderer(url_path)()


def render_s(url_path: str, repeats: int, **query: str) -> float:
    """Median seconds of one full script run of the page (a fresh session each time: no warm caches)."""
    from streamlit.testing.v1 import AppTest

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("streamlit"):  # AppTest's "missing ScriptRunContext" chatter
            logging.getLogger(name).setLevel(logging.ERROR)
    times = []
    for _ in range(repeats):
        at = AppTest.from_function(_page, args=(url_path,), default_timeout=120)
        at.query_params.update(query)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        if at.exception:
            raise RuntimeError(f"{url_path}: {at.exception[0].message}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tunelab-ui-bench-"))
    os.environ["TUNELAB_HOME"] = str(home)
    os.environ.pop("TUNELAB_DB_URL", None)
    start = time.perf_counter()
    ids = fill(args.runs, args.points)
    print(f"registry: {args.runs} runs x {args.points} steps in {home} ({time.perf_counter() - start:.1f} s to fill)")

    from tunelab import services

    start = time.perf_counter()
    services.list_runs(limit=args.runs)
    floor = time.perf_counter() - start
    print(f"services.list_runs(limit={args.runs}): {floor:.3f} s (the service call under the Runs table)")
    render_s("runs", 1)  # imports plotly, pandas, tunelab modules once, as a running server already has
    worst = 0.0
    for page in PAGES:
        query = {"run": ids[-1]} if page == "run" else {"runs": ",".join(ids[-3:])} if page == "compare" else {}
        seconds = render_s(page, args.repeats, **query)
        worst = max(worst, seconds)
        verdict = "ok" if seconds < BUDGET_S else "OVER BUDGET"
        print(f"{page:>9}: {seconds:6.3f} s   {seconds / floor:5.2f}x list_runs   {verdict}")
    print(f"slowest page {worst:.3f} s vs the {BUDGET_S:.0f} s budget: {worst / BUDGET_S:.2f}x the budget")


if __name__ == "__main__":
    main()
