"""End to end in headless Chromium: the service, a worker and `tunelab ui` started here on loopback ports.

A job is submitted from the New fine-tune form, its run page is opened while the job
waits in the queue, and the page's loss chart is watched gaining points once a worker
(started then) trains it, two runs are opened in the compare view, and
every page is saved as a screenshot under ``$TUNELAB_TEST_ARTIFACTS`` (default
``tests/ui/artifacts/``).  Skipped, with the reason, where Chromium, chromedriver or
selenium is missing (scripts/test.sh installs Debian's packages).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from tests.ui.browser import child, chromium, free_port, missing_browser, wait_for, wait_http
from tests.ui.conftest import SAMPLE_EVERY, Registry

pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(missing_browser()), reason=str(missing_browser()))]

# The worker writes metrics every 2 s (FLUSH_EVERY_S) and the run page polls every 2 s, so the chart can only be
# seen growing if training lasts well past 4 s: at ~20 ms a step on 2 busy cores, 200 steps sometimes didn't.
STEPS = 1000
PAGES = {"runs": "Runs", "datasets": "Datasets", "models": "Models", "playground": "Playground", "system": "System"}
CHARTS_JS = """return Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => ({
  title: d.layout && d.layout.title ? d.layout.title.text.replace(/<[^>]+>/g, '') : '',
  traces: (d.data || []).map(t => [t.name, t.x ? t.x.length : 0])}))"""


@dataclass(frozen=True)
class Stack:
    ui: str
    driver: Any
    shots: Path
    registry: Registry
    env: dict[str, str]  # the children's environment: a worker started by a test shares the registry
    root: Path


@pytest.fixture(scope="module")
def stack(ui_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API service, worker and dashboard on free loopback ports over a copy of the two-run registry, and a browser."""
    import shutil

    root = tmp_path_factory.mktemp("browser")
    home = root / "home"
    shutil.copytree(ui_registry.home, home)
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_DB_URL"} | {"TUNELAB_HOME": str(home)}
    api_port, ui_port = free_port(), free_port()
    shots = Path(os.environ.get("TUNELAB_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts") / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    with (
        child(["serve", "--port", str(api_port), "--log-level", "warning"], env, root / "serve.log") as api,
        child(["ui", "--port", str(ui_port)], env, root / "ui.log") as ui,
        chromium(root / "profile") as driver,
    ):
        wait_http(f"http://127.0.0.1:{api_port}/health", api, root / "serve.log")
        wait_http(f"http://127.0.0.1:{ui_port}/_stcore/health", ui, root / "ui.log")
        yield Stack(f"http://127.0.0.1:{ui_port}", driver, shots, replace(ui_registry, home=home), env, root)


def _open(stack: Stack, path: str, title: str) -> None:
    from selenium.webdriver.common.by import By

    stack.driver.get(stack.ui + path)
    wait_for(lambda: any(h.text == title for h in stack.driver.find_elements(By.TAG_NAME, "h1")), 60, f"{title} page")
    _settle(stack)
    # A browser's first deep link into a Streamlit app can flash a "Page not found" dialog although the page
    # renders (the title check above proves it did); close it so it doesn't cover the inputs.
    for dialog in stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDialog"]'):
        if "Page not found" in dialog.text:
            dialog.find_element(By.CSS_SELECTOR, 'button[aria-label="Close"]').click()
            wait_for(lambda: not stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDialog"]'), 10, "close")


def _settle(stack: Stack) -> None:
    """Wait until Streamlit has finished the rerun a page load or an input started."""
    from selenium.webdriver.common.by import By

    time.sleep(0.5)
    wait_for(lambda: not stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button'),
             60, "the script to finish")  # fmt: skip


def _type(stack: Stack, label: str, value: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def visible() -> Any:
        boxes = stack.driver.find_elements(By.CSS_SELECTOR, f'input[aria-label="{label}"]')
        return next((b for b in boxes if b.is_displayed() and b.is_enabled()), None)

    box = wait_for(visible, 30, f"the {label!r} input")
    stack.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)
    _settle(stack)


def _alert(stack: Stack, text: str) -> str | None:
    from selenium.webdriver.common.by import By

    alerts = stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')
    return next((a.text for a in alerts if text in a.text), None)


def _status(stack: Stack) -> str:
    from selenium.webdriver.common.by import By

    return str(stack.driver.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text)


def _charts(stack: Stack) -> dict[str, dict[str, int]]:
    return {c["title"]: dict(c["traces"]) for c in stack.driver.execute_script(CHARTS_JS)}


def _shot(stack: Stack, name: str) -> None:
    stack.driver.save_screenshot(str(stack.shots / f"{name}.png"))


def test_submit_watch_and_compare(stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    _open(stack, "/new", "New fine-tune")
    _type(stack, "Model (local checkpoint folder or hub id)", stack.registry.model)
    _type(stack, "Training data (file or folder)", stack.registry.data)
    for label, value in (("Steps", STEPS), ("Batch size", 16), ("Learning rate", "3e-3"),
                         ("Max sequence length", 256), ("Eval every (0 = end)", 250)):  # fmt: skip
        _type(stack, label, value)
    _shot(stack, "new-fine-tune")
    stack.driver.find_element(By.XPATH, '//button[.//p[text()="Submit job"]]').click()
    queued = wait_for(lambda: _alert(stack, "Queued job"), 60, "the job to be queued")
    run_id = re.search(r"\(run (\w+)\)", queued).group(1)  # type: ignore[union-attr]

    # The page opens on the queued job and the worker starts after it: however fast the steps run,
    # the page is there to see the chart grow (a worker already polling raced the page's load).
    _open(stack, f"/run?run={run_id}", "Run")
    with child(["worker", "--poll", "0.5", "--heartbeat", "1"], stack.env, stack.root / "worker.log"):
        seen = _watch_points(stack)
        assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == STEPS, seen
        wait_for(lambda: "completed" in _status(stack), 120, "the run to complete")
    _settle(stack)
    assert {"Loss", "Learning rate", "Tokens/s"} <= set(_charts(stack))
    _shot(stack, "run-completed")

    other = stack.registry.run_ids[0]
    _open(stack, f"/compare?runs={run_id},{other}", "Compare runs")
    loss = wait_for(lambda: _charts(stack).get("Loss"), 60, "the overlaid loss chart")
    assert loss[f"{run_id} train_loss"] == STEPS and loss[f"{other} train_loss"] == 6
    _shot(stack, "compare")


def test_run_page_shows_samples_by_step_and_the_eval_chart(stack: Stack) -> None:
    """The shared registry's first run sampled every 3 of its 6 steps: its answers, step by step, as logged."""
    import json

    from selenium.webdriver.common.by import By

    run_id = stack.registry.run_ids[0]
    metrics = stack.registry.home / "out0" / "metrics.jsonl"  # the run's folder (tests/ui/conftest.py), copied
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    logged = [[str(r["step"]), s["prompt"], s["answer"]] for r in rows if "samples" in r for s in r["samples"]]
    assert sorted({int(step) for step, *_ in logged}) == [SAMPLE_EVERY, 2 * SAMPLE_EVERY]

    _open(stack, f"/run?run={run_id}", "Run")
    assert wait_for(lambda: _charts(stack).get("Eval metrics"), 60, "the eval metrics chart") == {"eval/exact_match": 2}
    _shot(stack, "run-eval-chart")  # beside the loss chart
    tab = next(
        t for t in stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stTab"]') if t.text == "Evaluation"
    )
    tab.click()
    _settle(stack)
    shown = wait_for(lambda: _grid(stack, "answer"), 30, "the samples table")
    assert shown == logged, (shown, logged)
    stack.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", tab)
    _shot(stack, "run-samples")


def _grid(stack: Stack, column: str) -> list[list[str]] | None:
    """The rows of the visible data grid that has ``column``, as the page's accessible table holds them."""
    from selenium.webdriver.common.by import By

    for grid in stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'):
        if not grid.is_displayed():
            continue
        headers = [h.get_attribute("textContent") for h in grid.find_elements(By.CSS_SELECTOR, "table th")]
        if column in headers:
            rows = grid.find_elements(By.CSS_SELECTOR, "table tbody tr")
            return [[td.get_attribute("textContent") for td in tr.find_elements(By.CSS_SELECTOR, "td")] for tr in rows]
    return None


def _watch_points(stack: Stack, timeout: float = 300) -> list[int]:
    """Distinct numbers of train-loss points the open run page showed, until the run's last step is drawn."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not seen or seen[-1] < STEPS):
        count = _charts(stack).get("Loss", {}).get("train_loss", 0)
        if count and (not seen or count != seen[-1]):
            seen.append(count)
            if len(seen) == 2:
                _shot(stack, "run-training")
        time.sleep(0.3)
    return seen


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_renders(stack: Stack, path: str) -> None:
    from selenium.webdriver.common.by import By

    _open(stack, f"/{path}", PAGES[path])
    errors = [e.text for e in stack.driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')]
    assert not errors, errors
    _shot(stack, path)
