"""What the dashboard pages read and do, as plain functions over the service layer.

No SQL and no training logic here: every function is a call into
:mod:`tunelab.services` (the same use cases the CLI and the API call) plus the
reshaping a table or a chart needs.  Pages import this module, never the
registry, so the dashboard and the CLI can't disagree about a run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tunelab import services
from tunelab.config.load import validate_config
from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

# Metric names the trainer logs, in the order the run page charts them.
CHARTS = {
    "Loss": ("train_loss", "val_loss"),
    "Reward": ("reward", "val_reward"),  # GRPO runs: mean reward of the sampled groups, and on held-out prompts
    "Learning rate": ("lr",),
    "Tokens/s": ("tokens_per_sec",),
    "Peak memory (GiB)": ("peak_memory_gb",),
}
# Families named only at run time (a metric or reward function of the user's), charted after Loss.
EVAL_CHART = "Eval metrics"  # train.eval_metrics: eval/<metric> at each validation
REWARD_CHART = "Reward by function"  # GRPO: reward/<fn> while training, val_reward/<fn> at validation
# Scores only `tunelab eval` records (the base's, and token metrics on another scale): not curves over steps.
_NOT_CURVES = ("eval/base/", "eval/perplexity", "eval/token_loss")


def chart_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Chart title -> the series it draws, in page order, for the metric names a run (or several) logged."""
    present = set(names)
    groups = {title: [n for n in wanted if n in present] for title, wanted in CHARTS.items()}
    groups[EVAL_CHART] = sorted(n for n in present if n.startswith("eval/") and not n.startswith(_NOT_CURVES))
    groups[REWARD_CHART] = sorted(
        n for n in present if n.startswith(("reward/", "val_reward/")) and not n.endswith("_std")
    )
    order = ["Loss", EVAL_CHART, "Reward", REWARD_CHART, *list(CHARTS)[2:]]
    return {title: groups[title] for title in order if groups[title]}


def samples_by_step(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``train.sample_every``'s answers as table rows (step, prompt, answer), in step order."""
    rows = [
        {"step": e["step"], "prompt": sample["prompt"], "answer": sample["answer"]}
        for e in events
        if e["type"] == "samples"
        for sample in e.get("samples", [])
    ]
    return sorted(rows, key=lambda row: row["step"])  # stable: each step's prompts keep their order


def run_rows(*, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """One flat row per run for the Runs table (newest first)."""
    return [run_row(run.to_dict()) for run in services.list_runs(status=status, limit=limit)]


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """The columns the Runs table shows for one run summary."""
    config = run.get("config") or {}
    final = run.get("final_metrics") or {}
    best = final.get("best_val_loss")
    if best is None:
        best = (run.get("metrics") or {}).get("val_loss")
    return {
        "id": run["id"],
        "name": run.get("name") or "",
        "status": run["status"],
        "backend": run.get("backend") or "",
        "device": run.get("device") or "",
        "model": short_path(str(config.get("model", {}).get("path", ""))),
        "dataset": short_path(str(config.get("data", {}).get("train", ""))),
        "method": config.get("method", {}).get("name", ""),
        "steps": f"{run.get('step') or 0}/{run.get('total_steps') or '?'}",
        "best_val_loss": best,
        "duration_s": run.get("duration_s"),
        "created_at": run.get("created_at") or "",
    }


def short_path(path: str) -> str:
    """The last two parts of a path (a hub id stays whole): checkpoint folders are often all named "model"."""
    return "/".join(Path(path).parts[-2:]) if path else ""


def filter_rows(rows: list[dict[str, Any]], *, text: str = "", statuses: list[str] | None = None) -> list[dict]:
    """Rows whose status is in ``statuses`` (all when empty) and that mention ``text`` in any column."""
    needle = text.strip().lower()
    out = []
    for row in rows:
        if statuses and row["status"] not in statuses:
            continue
        if needle and not any(needle in str(value).lower() for value in row.values()):
            continue
        out.append(row)
    return out


def run_detail(run_id: str) -> dict[str, Any]:
    """Everything the run page shows: the summary, the live status, the job's log events and the samples."""
    run = services.show_run(run_id).to_dict()
    run["live_status"] = services.run_status(run["id"])
    # By type: a metric event per step would otherwise crowd the later logs and samples out of the limit.
    run["events"] = services.run_events(run["id"], limit=500, types=("log", "status"))
    run["samples"] = samples_by_step(services.run_events(run["id"], limit=2000, types=("samples",)))
    return run


def eval_results(run_id: str) -> dict[str, Any] | None:
    """The run's newest evaluation (scores, base scores, examples), or None when it was never evaluated."""
    return services.eval_results(run_id)


def metric_series(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each metric's ``(step, value)`` points in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for point in services.run_metrics(run_id):
        if point.value is not None:
            series.setdefault(point.name, []).append((point.step, float(point.value)))
    return series


def config_yaml(config: dict[str, Any]) -> str:
    """A config as the YAML a user would write (keys in schema order)."""
    return yaml.safe_dump(config, sort_keys=False)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``: the dotted keys CLI overrides use."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The dotted keys whose values differ between runs, one row per key with a column per run."""
    flat = {run_id: flatten(config) for run_id, config in configs.items()}
    keys = sorted({key for values in flat.values() for key in values})
    rows = []
    for key in keys:
        values = {run_id: values.get(key) for run_id, values in flat.items()}
        if len({repr(v) for v in values.values()}) > 1:
            rows.append({"key": key, **{run_id: repr(v) for run_id, v in values.items()}})
    return rows


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a form's config exactly as `tunelab train` does (raises ConfigError with the CLI's text)."""
    return validate_config(raw)


def cli_command(cfg: RunConfig) -> str:
    """Shell lines that queue the same job from a terminal: write the YAML, then `tunelab jobs submit` it."""
    return f"cat > config.yaml <<'YAML'\n{config_yaml(cfg.to_dict())}YAML\ntunelab jobs submit config.yaml"


def estimate_memory(cfg: RunConfig) -> dict[str, Any]:
    """The `tunelab estimate` figures for ``cfg`` (the model's config.json is read; no weights load)."""
    return services.estimate_memory(cfg).to_dict()


def submit(cfg: RunConfig) -> dict[str, Any]:
    """Queue ``cfg`` as a train job; its run exists at once (``run_id`` in the answer)."""
    return services.submit_job(cfg).to_dict()


def cancel(job_id: str) -> dict[str, Any]:
    """Cancel a queued job, or ask a running one to checkpoint and stop."""
    return services.cancel_job(job_id).to_dict()


def upload(data: bytes, filename: str) -> dict[str, Any]:
    """Store and validate an uploaded data file (DataError names the bad line)."""
    import io

    from tunelab.settings import get_settings

    settings = get_settings()
    try:
        return services.upload_dataset(io.BytesIO(data), filename=filename).to_dict()
    except TunelabError as exc:
        # The message names the stored (generated) file; the user knows their file by its own name.
        stored = re.compile(re.escape(str(settings.datasets_dir)) + r"/[0-9a-f]{12}\.\w+")
        exc.message = stored.sub(filename.replace("\\", "/"), exc.message)
        raise


def dataset_report(path: str, *, model: str | None, max_seq_len: int = 1024) -> dict[str, Any]:
    """`tunelab data validate`: format, counts, and with a model token lengths and their histogram."""
    return services.validate_dataset(path, model=model, max_seq_len=max_seq_len).to_dict()


def masking_preview(path: str, *, model: str, n: int = 3, max_seq_len: int = 1024) -> dict[str, Any]:
    """`tunelab data preview`: the first examples' tokens, each marked trained or not."""
    return services.preview_dataset(path, model=model, n=n, max_seq_len=max_seq_len).to_dict()


def uploaded_datasets() -> list[str]:
    """Data files already under ``$TUNELAB_HOME/datasets`` (uploads land there)."""
    return services.uploaded_datasets()


def lineage(*, limit: int = 1000) -> list[dict[str, Any]]:
    """Base model → dataset → run → adapter → exports, one row per run that produced something."""
    return services.lineage(limit=limit)


def chat_models() -> list[dict[str, Any]]:
    """Finished runs the playground can load (``id`` is ``run:RUN_ID``)."""
    return [model.to_dict() for model in services.served_models()]


def load_generator(run_id: str, *, base: bool = False) -> Any:
    """A run's fine-tuned model ready to answer, or (``base``) the model it started from."""
    return services.generator_for_run(run_id, base=base)


def complete(generator: Any, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy answer to one user turn (the run's chat template applied, as `tunelab generate` does)."""
    return str(generator.complete(prompt, max_new_tokens=max_new_tokens))


def doctor() -> dict[str, Any]:
    """What `tunelab doctor --json` prints (without the slow BLAS timing)."""
    return services.doctor(measure=False).to_dict()


def live_usage() -> dict[str, Any]:
    """CPU and memory in use right now, and each NVIDIA GPU's load and memory (when `nvidia-smi` exists)."""
    import psutil

    mem = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_used_bytes": mem.used,
        "memory_total_bytes": mem.total,
        "memory_percent": mem.percent,
        "gpus": gpu_usage(),
    }


def gpu_usage() -> list[dict[str, Any]]:
    """`nvidia-smi`'s live figures; cheap enough to poll, unlike probing torch for devices."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=name,utilization.gpu,memory.used,memory.total"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, load, used, total = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "percent": float(load), "used_mib": float(used), "total_mib": float(total)})
    return gpus
