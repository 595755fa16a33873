"""The lm-evaluation-harness bridge: run `lm_eval` tasks from local files on a model folder.

Tasks are lm_eval's own YAML, read from folders (tunelab ships a small one, and users name
their own); nothing is downloaded.  A task's ``dataset_kwargs.data_files`` may be relative to its
YAML file — the harness resolves such paths against the working directory, so tunelab rewrites
them as absolute paths into a private copy of the task folder before handing it over.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError


def check_tasks(tasks: Sequence[str], task_dirs: Sequence[Path] = ()) -> None:
    """Every task named exists in the shipped folder or ``task_dirs``: checked before any model or lm_eval loads."""
    if not tasks:
        raise ConfigError("--harness: name at least one task", hint="e.g. --harness tunelab_basic_facts")
    known = set(shipped_tasks())
    for folder in task_dirs:
        if not folder.is_dir():
            raise ConfigError(f"--harness-path: {folder} is not a folder of lm_eval task YAML files")
        known |= _task_names(folder)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(
            f"--harness: no task named {', '.join(map(repr, unknown))} in the task folders",
            hint=f"tasks found: {', '.join(sorted(known)) or 'none'}; add a folder of lm_eval task YAML "
            "with --harness-path (nothing is downloaded)",
        )


def shipped_tasks() -> list[str]:
    """The task names of the folder tunelab ships (`assets/harness`)."""
    with as_file(files("tunelab.assets").joinpath("harness")) as folder:
        return sorted(_task_names(Path(folder)))


def run_harness(
    model_dir: Path, tasks: Sequence[str], *, task_dirs: Sequence[Path] = (), limit: int | None = None
) -> dict[str, dict[str, float]]:
    """Each task's metrics (``acc``, ``acc_norm``, …; their stderr left out) for the model in ``model_dir``."""
    check_tasks(tasks, task_dirs)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--harness needs lm-evaluation-harness", hint="pip install 'tunelab[eval]'") from None
    with (
        as_file(files("tunelab.assets").joinpath("harness")) as shipped,
        _absolute_copies([Path(shipped), *task_dirs]) as include,
        _offline(),
    ):
        manager = TaskManager(include_path=str(include), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
            tasks=list(tasks),
            task_manager=manager,
            batch_size=8,
            limit=limit,
            log_samples=False,
        )
    assert out is not None  # only non-zero ranks of a distributed run get None
    return {task: _scores(out["results"][task]) for task in tasks}


def _scores(result: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 1.0, "acc_stderr,none": 0.0, "alias": …}`` -> ``{"acc": 1.0}``."""
    scores = {}
    for key, value in result.items():
        name, _, _filter = key.partition(",")
        if _filter and not name.endswith("_stderr") and isinstance(value, int | float):
            scores[name] = float(value)
    return scores


def _task_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.add(config["task"])
    return names


@contextlib.contextmanager
def _absolute_copies(folders: Sequence[Path]) -> Iterator[Path]:
    """One temporary folder holding every task YAML of ``folders``, data file paths made absolute."""
    with tempfile.TemporaryDirectory(prefix="tunelab-harness-") as tmp:
        out = Path(tmp)
        for index, folder in enumerate(folders):
            if not folder.is_dir():
                raise ConfigError(f"--harness-path: {folder} is not a folder of lm_eval task YAML files")
            for path in sorted(folder.rglob("*.yaml")):
                config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
                if isinstance(kwargs, dict) and "data_files" in kwargs:
                    kwargs["data_files"] = _absolute(kwargs["data_files"], path.parent)
                target = out / f"{index}-{path.relative_to(folder).as_posix().replace('/', '-')}"
                target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        yield out


def _absolute(data_files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list, or a split -> path(s) mapping) with relative paths taken from ``folder``."""
    if isinstance(data_files, str):
        return str((folder / data_files).resolve())
    if isinstance(data_files, list):
        return [_absolute(f, folder) for f in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute(f, folder) for split, f in data_files.items()}
    return data_files


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """lm_eval loads task data with `datasets`; local files only, so nothing may reach for the network."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        import datasets

        was, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
        try:
            yield
        finally:
            datasets.config.HF_HUB_OFFLINE = was
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
