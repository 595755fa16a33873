"""`tunelab jobs submit|list|show|logs|cancel` — against the local registry or a server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tunelab.cli.console import console
from tunelab.vocab import FINAL_STATUSES

app = typer.Typer(help="Queue fine-tunes for `tunelab worker` and follow them.", no_args_is_help=True)

ServerOpt = typer.Option(
    None, "--server", envvar="TUNELAB_SERVER", help="A `tunelab serve` URL (key from TUNELAB_API_KEY)."
)
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def _jobs(server: str | None) -> Any:
    """The local job services or a client of a `tunelab serve`: both have the same job functions."""
    from tunelab import services

    return services.job_service(server)


@app.command("submit")
def submit(
    config: Path = typer.Argument(..., help="YAML config, the same as for `tunelab train`."),
    overrides: list[str] | None = typer.Argument(None, help="Overrides such as train.lr=1e-4."),
    kind: str = typer.Option("train", help="train, or validate (check config and data without training)."),
    priority: int = typer.Option(0, help="Higher runs first."),
    nproc: str = typer.Option(
        "1", "--nproc", help="Processes to train on (N, or auto = all the worker offers); batch_size is per process."
    ),
    server: str | None = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Queue a config for a worker; prints the job id (last word) and its run id."""
    from tunelab import services
    from tunelab.config.load import load_config

    cfg = load_config(config, overrides or [])
    job = _jobs(server).submit_job(cfg, kind=kind, priority=priority, nproc=services.parse_nproc(nproc))
    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
        return
    run = f" (run {job['run_id']})" if job.get("run_id") else ""
    console.print(f"queued{run}; start a worker with `tunelab worker`; job {job['id']}")


@app.command("list")
def list_jobs(
    status: str | None = typer.Option(None, help="Only jobs with this status."),
    limit: int = typer.Option(50, help="How many of the newest jobs."),
    server: str | None = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List jobs, newest first."""
    jobs = _jobs(server).list_jobs(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([j.to_dict() for j in jobs], indent=2))
        return
    table = Table("id", "kind", "status", "run", "attempts", "priority", "worker", "created")
    for j in jobs:
        table.add_row(
            j["id"],
            j["kind"],
            j["status"],
            j.get("run_id") or "-",
            f"{j['attempts']}/{j['max_attempts']}",
            str(j["priority"]),
            j.get("worker_id") or "-",
            (j.get("created_at") or "")[:19].replace("T", " "),
        )
    console.print(table if jobs else "no jobs yet: queue one with `tunelab jobs submit CONFIG`")


@app.command("show")
def show(
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
    server: str | None = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one job."""
    job = _jobs(server).show_job(job_id)
    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
        return
    console.print(
        f"[bold]{job['id']}[/] {job['kind']} — {job['status']} (attempt {job['attempts']}/{job['max_attempts']})"
    )
    if job.get("run_id"):
        console.print(f"run {job['run_id']} (`tunelab runs show {job['run_id']}`)")
    if job.get("nproc", 1) != 1:
        console.print(f"processes: {job['nproc'] or 'all the worker offers'}")
    if job.get("worker_id"):
        console.print(f"worker {job['worker_id']}, last heartbeat {job.get('heartbeat_at')}")
    if job.get("error"):
        console.print(f"[red]error:[/] {job['error']}")


@app.command("logs")
def logs(
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    server: str | None = ServerOpt,
) -> None:
    """Print a job's status changes, log lines and metrics."""
    jobs = _jobs(server)
    after = 0
    while True:
        events = jobs.job_events(job_id, after=after)
        for event in events:
            typer.echo(_format_event(event))
            after = event["id"]
        if not follow or (not events and jobs.show_job(job_id)["status"] in FINAL_STATUSES):
            return
        if not events:
            time.sleep(0.5)


def _format_event(event: dict[str, Any]) -> str:
    when = (event.get("time") or "")[11:19]
    if event["type"] == "status":
        extra = f" ({event['error']})" if event.get("error") else ""
        attempt = f" attempt {event['attempt']} on {event.get('worker')}" if event.get("attempt") else ""
        return f"{when} status {event['status']}{attempt}{extra}"
    if event["type"] == "metric":
        skip = {"id", "type", "job_id", "run_id", "time", "step"}
        values = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items() if k not in skip
        )
        return f"{when} step {event.get('step')} {values}"
    return f"{when} {event.get('text', '')}"


@app.command("cancel")
def cancel(
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."), server: str | None = ServerOpt
) -> None:
    """Cancel a job: a queued one at once, a running one after its current step (with a checkpoint)."""
    job = _jobs(server).cancel_job(job_id)
    state = "cancelled" if job["status"] == "cancelled" else "cancel requested (the worker stops it after this step)"
    console.print(f"job {job['id']}: {state}")


@app.command("run-rank", hidden=True)
def run_rank(
    job_id: str = typer.Argument(...), run_id: str | None = typer.Argument(None)
) -> None:  # pragma: no cover - runs in torchrun's ranks
    """One rank of a job a worker runs on several processes (started by the worker, not by hand)."""
    from tunelab import services

    services.run_rank(job_id, run_id)
