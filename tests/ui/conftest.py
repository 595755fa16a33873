"""A registry with two real tiny runs (trained once per session) that the dashboard tests read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tests.integration.conftest import base_config, chat_data, e2e_model  # noqa: F401  (fixtures reused here)

SAMPLE_EVERY = 3  # the first run's train.sample_every (of 6 steps): samples at steps 3 and 6


@dataclass(frozen=True)
class Registry:
    home: Path
    run_ids: tuple[str, str]  # both completed; the second has a higher lr and rank
    # The first also sampled answers (train.sample_every 3) and scored exact_match at each validation.
    model: Path
    data: Path


@pytest.fixture(scope="session")
def ui_registry(tmp_path_factory: pytest.TempPathFactory, e2e_model: Path, chat_data: Path) -> Registry:  # noqa: F811
    """Two completed LoRA runs (6 steps, validated every 3) in a home of their own.

    The first also answers its validation data's first three questions every 3 steps (train.sample_every)
    and scores exact_match on 4 validation examples at each validation (eval/exact_match): what the run
    page's samples table and eval chart show."""
    from tunelab import services
    from tunelab.config.load import validate_config
    from tunelab.registry.db import close_registries

    home = tmp_path_factory.mktemp("ui_home")
    ids = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_HOME", str(home))
        mp.delenv("TUNELAB_DB_URL", raising=False)
        for i, (lr, rank) in enumerate(((5e-3, 4), (1e-2, 8))):
            raw = base_config(e2e_model, chat_data, home / f"out{i}", steps=6, eval_every=3, lr=lr)
            raw["method"]["rank"] = rank
            raw["name"] = f"ui-test-{i}"
            if i == 0:
                raw["train"].update(sample_every=SAMPLE_EVERY, sample_max_new_tokens=6, eval_metrics=["exact_match"],
                                    eval_metrics_samples=4)  # fmt: skip
            ids.append(services.start_run(validate_config(raw)).run_id)
        close_registries()
    return Registry(home, (ids[0], ids[1]), e2e_model, chat_data)


@pytest.fixture
def in_registry(ui_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """Point this test (and the AppTest script it runs in-process) at the shared registry."""
    from tunelab.registry.db import close_registries

    close_registries()
    monkeypatch.setenv("TUNELAB_HOME", str(ui_registry.home))
    yield ui_registry
    close_registries()


@pytest.fixture
def registry_copy(ui_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """A private copy of the shared registry, for tests that add runs or jobs to it."""
    import shutil

    from tunelab.registry.db import close_registries

    close_registries()
    home = tmp_path / "home"
    shutil.copytree(ui_registry.home, home)
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    yield Registry(home, ui_registry.run_ids, ui_registry.model, ui_registry.data)
    close_registries()


def _page(url_path: str) -> None:
    # AppTest runs this function's source as a script, so it imports what it needs itself.
    from tunelab.ui.nav import renderer

    renderer(url_path)()


def page_test(url_path: str, timeout: float = 30, **query: str) -> AppTest:
    """One dashboard page (by its URL path) under Streamlit's AppTest, with ``query`` as its query parameters."""
    at = AppTest.from_function(_page, args=(url_path,), default_timeout=timeout)
    at.query_params.update(query)
    return at
