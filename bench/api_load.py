"""Does a busy API slow training down?  Tokens/s of a queued job with and without client load.

A real `tunelab serve` and a real `tunelab worker` run as subprocesses on one
registry.  Each round trains the same job twice — once with the server idle,
once while ``--clients`` concurrent HTTP clients poll the job's and the run's
status every ``--interval`` seconds and one WebSocket follows the run's events
— in ABBA order, so drift (thermal, other tenants) hits both sides alike.

Prints p50/p99 request latency, the WebSocket's event delay, and training
tokens/s (the loop's own figure, which excludes model loading) under both
conditions, with the drop in percent.  The clients run in this process, on the
same machine: with remote clients, as in real use, the drop can only be smaller.

    python bench/api_load.py                     # defaults: 64 clients polling every 0.5 s
    python bench/api_load.py --clients 200 --interval 0.25 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # run as a script: make the sibling helpers importable

from _common import DataSpec, ModelSpec, median, prepare_inputs  # noqa: E402

FINAL = ("completed", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Stack:
    """`tunelab serve` plus a key, in a private TUNELAB_HOME."""

    def __init__(self, home: Path, roots: Path, server_workers: int = 1) -> None:
        self.env = {**os.environ, "TUNELAB_HOME": str(home), "TUNELAB_API_ROOTS": str(roots)}
        self.env.pop("TUNELAB_DB_URL", None)
        made = subprocess.run(
            [sys.executable, "-m", "tunelab", "auth", "create-key", "--name", "bench"],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.key = made.stdout.split()[-1]
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "tunelab", "serve", "--port", port, "--log-level", "warning"]
        cmd += ["--workers", str(server_workers)]
        self.server = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("tunelab serve did not start")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def train_once(self, config: dict[str, Any], load: argparse.Namespace | None) -> dict[str, Any]:
        """Submit a job, run one worker for it (with or without client load); return its figures."""
        job = httpx.post(f"{self.url}/v1/jobs", json={"config": config}, headers=self.headers, timeout=30).json()
        worker = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "worker", "--max-jobs", "1"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        stats: dict[str, Any] = {}
        if load is not None:
            stats = asyncio.run(_load(self, job, load, worker))
        if worker.wait(timeout=3600) != 0:
            raise RuntimeError(f"worker failed on job {job['id']}")
        run = httpx.get(f"{self.url}/v1/runs/{job['run_id']}", headers=self.headers, timeout=30).json()
        if run["status"] != "completed":
            raise RuntimeError(f"run {run['id']} ended {run['status']}: {run.get('error')}")
        return {"tokens_per_sec": run["final_metrics"]["tokens_per_sec"], **stats}

    def close(self) -> None:
        os.killpg(self.server.pid, signal.SIGTERM)
        self.server.wait(timeout=30)


async def _load(stack: Stack, job: dict[str, Any], opts: argparse.Namespace, worker: subprocess.Popen) -> dict:
    """Clients poll until the worker exits; one WebSocket follows the run meanwhile."""
    latencies: list[float] = []
    errors: list[int] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=opts.clients, max_keepalive_connections=opts.clients)
    async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers, limits=limits, timeout=60) as client:

        async def poll(i: int) -> None:
            paths = (f"/v1/jobs/{job['id']}", f"/v1/runs/{job['run_id']}")
            await asyncio.sleep(opts.interval * i / opts.clients)  # spread the clients over the interval
            n = 0
            while not done.is_set():
                started = time.perf_counter()
                try:
                    response = await client.get(paths[n % 2])
                except httpx.TransportError:
                    # The server closing an idle keep-alive connection just as a client reuses it:
                    # a real client retries, and so does this one (counted, not timed).
                    errors.append(1)
                    continue
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                n += 1
                await asyncio.sleep(max(0.0, opts.interval - (time.perf_counter() - started)))

        async def watch_worker() -> None:
            while worker.poll() is None:
                await asyncio.sleep(0.2)
            done.set()

        ws_delays: list[float] = []
        tasks = [asyncio.create_task(poll(i)) for i in range(opts.clients)]
        tasks.append(asyncio.create_task(_follow(stack, job["run_id"], ws_delays)))
        started = time.perf_counter()
        await watch_worker()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    rps = len(latencies) / elapsed
    return {"latencies": latencies, "requests_per_sec": rps, "ws_delays": ws_delays, "retries": len(errors)}


async def _follow(stack: Stack, run_id: str, delays: list[float]) -> None:
    from websockets.asyncio.client import connect

    url = f"{stack.url.replace('http', 'ws')}/v1/runs/{run_id}/events"
    async with connect(url, additional_headers=stack.headers) as ws:
        async for message in ws:  # the server closes the socket after the run's last event
            event = json.loads(message)
            delays.append(time.time() - datetime.fromisoformat(event["time"]).timestamp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients polling status")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between one client's polls")
    parser.add_argument("--steps", type=int, default=150, help="training steps per job")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each trains 4 jobs)")
    parser.add_argument("--server-workers", type=int, default=1, help="`tunelab serve --workers`")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny Llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny Llama")
    parser.add_argument("--log-every", type=int, default=1, help="steps between metric writes (registry + events)")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse the data/model built here")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunelab-api-load-"))
    roots = workdir / "inputs"
    spec = ModelSpec(vocab_size=2000, hidden_size=args.hidden, num_layers=args.layers)
    train, model = prepare_inputs(roots, DataSpec(examples=600), spec)
    config = {
        "model": {"path": str(model)},
        "data": {"train": str(train), "max_seq_len": 256},
        "method": {"name": "lora", "rank": 8},
        "train": {"steps": args.steps, "batch_size": 8, "log_every": args.log_every, "save_every": 50, "eval_every": 0},
        "tensorboard": False,
    }
    stack = Stack(workdir / f"home-{os.getpid()}", roots, args.server_workers)
    results: dict[str, list[dict[str, Any]]] = {"quiet": [], "load": []}
    try:
        stack.train_once({**config, "train": {**config["train"], "steps": 10}}, None)  # warm caches
        print(f"device: {_device()}; {args.steps} steps per job; metrics every {args.log_every} steps", flush=True)
        for _ in range(args.rounds):
            for mode in ("quiet", "load", "load", "quiet"):
                figures = stack.train_once(config, args if mode == "load" else None)
                results[mode].append(figures)
                print(f"  {mode:5s} {figures['tokens_per_sec']:8.0f} tokens/s", flush=True)
    finally:
        stack.close()
    _report(args, results)


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu (no torch)"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def _report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    quiet = median([r["tokens_per_sec"] for r in results["quiet"]])
    loaded = median([r["tokens_per_sec"] for r in results["load"]])
    latencies = [x * 1000 for r in results["load"] for x in r["latencies"]]
    delays = [x * 1000 for r in results["load"] for x in r["ws_delays"]]
    rps = median([r["requests_per_sec"] for r in results["load"]])
    print(f"\nload: {args.clients} clients polling every {args.interval}s ({rps:.0f} req/s) + 1 WebSocket per run;")
    print(f"  server processes: {args.server_workers}")
    print(f"status latency   p50 {_percentile(latencies, 0.5):7.1f} ms   p99 {_percentile(latencies, 0.99):7.1f} ms")
    retries = sum(r["retries"] for r in results["load"])
    print(f"  ({len(latencies)} requests, {retries} retried after a dropped keep-alive connection)")
    print(f"websocket delay  p50 {_percentile(delays, 0.5):7.1f} ms   p99 {_percentile(delays, 0.99):7.1f} ms")
    print(f"tokens/s quiet {quiet:.0f}  under load {loaded:.0f}  drop {100 * (1 - loaded / quiet):.1f}%")
    print(f"  (medians of {len(results['quiet'])} runs each, ABBA order)")


if __name__ == "__main__":
    main()
