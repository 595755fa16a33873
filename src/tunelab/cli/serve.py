"""`tunelab serve` (the API) and `tunelab worker` (runs queued jobs)."""

from __future__ import annotations

import typer

from tunelab.cli.console import err_console
from tunelab.errors import ConfigError


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the API to your network."),
    port: int = typer.Option(8000, help="TCP port."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    workers: int = typer.Option(1, min=1, max=64, help="Server processes (more serve more clients at once)."),
) -> None:
    """Serve the REST + WebSocket API (docs at /docs); every route but /health needs an API key."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the API needs the serve extra", hint="pip install 'tunelab[serve]'") from None
    from tunelab.api.app import create_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]serving on {host}: anyone who can reach it and holds a key can train[/]")
    from uvicorn.config import WS_PROTOCOLS

    ws = "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "auto"  # the legacy one is deprecated
    if workers == 1:
        uvicorn.run(create_app(), host=host, port=port, log_level=log_level, ws=ws)
        return
    # Several processes need an import string; each builds its own app (and DB engine) from the environment.
    factory = "tunelab.api.app:create_app"
    uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, log_level=log_level, ws=ws)


def worker(
    heartbeat: float = typer.Option(2.0, help="Seconds between heartbeats."),
    stale_after: float = typer.Option(30.0, help="Take over jobs whose worker has been silent this long."),
    poll: float = typer.Option(1.0, help="Seconds between looks at an empty queue."),
    max_jobs: int | None = typer.Option(None, help="Exit after this many jobs."),
    exit_when_idle: bool = typer.Option(False, help="Exit when the queue is empty."),
    nproc: str = typer.Option(
        "1", "--nproc", help="Processes a job may run on here (torchrun ranks): N, or auto = one per CUDA GPU."
    ),
) -> None:
    """Run queued jobs one at a time, each in a child process; Ctrl-C checkpoints and hands the job back."""
    from tunelab import services

    services.run_worker(
        heartbeat=heartbeat,
        stale_after=stale_after,
        poll=poll,
        max_jobs=max_jobs,
        exit_when_idle=exit_when_idle,
        nproc=nproc,
        say=lambda text: err_console.print(text, markup=False, highlight=False),
    )
