"""``vptune bench-serve``: what serving many tasks from one backbone costs, on random weights.

Two measurements in one run:

1. Model throughput. Batches whose images are drawn from 8 tasks of different methods go
   through ``MultiTaskModel`` in one pass; they are compared with batches of a single task
   (the mean over the tasks) and with running each task's own ``PromptModel`` on its
   sub-batch. Timed in interleaved rounds after a warm-up; images/s from the median times,
   the ratios as the median of the per-round ratios (robust to load changing over time).
2. A load test of the HTTP server on 127.0.0.1 only: a bounded number of requests from
   concurrent clients, each with a timeout and the whole test under a deadline, so it
   stops by itself; it reports errors and latency percentiles.
3. With ``ray=True``, the same load test against the same app on Ray Serve (``replicas``
   replicas on a local Ray bound to 127.0.0.1, one torch thread each).
"""

from __future__ import annotations

import asyncio
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..backbones.family import family_of
from ..methods import config_for
from ..model import PromptModel
from .server import BackgroundServer, ServeConfig, create_app, load_tasks

# The served mix: prompt methods on both prompt paths, several prompt counts, heads only.
TASK_MIX: dict[str, tuple[str, dict[str, Any], int]] = {
    "vpt-deep-50": ("vpt-deep", dict(num_prompts=50), 10),
    "vpt-deep-10": ("vpt-deep", dict(num_prompts=10), 5),
    "vpt-shallow-10": ("vpt-shallow", dict(num_prompts=10), 7),
    "e2vpt-10-5": ("e2vpt", dict(num_prompts=10, num_kv_prompts=5), 10),
    "e2vpt-5-1": ("e2vpt", dict(num_prompts=5, num_kv_prompts=1), 3),
    "apt-50": ("apt", dict(num_prompts=50), 10),
    "linear": ("linear", {}, 10),
    "mlp": ("mlp", dict(hidden_layers=1), 4),
}


def bench_backbone(spec: str) -> nn.Module:
    """The bundled architecture or a timm model, with random weights (nothing is downloaded)."""
    from ..backbones import BUNDLED_BACKBONE
    from ..backbones.bundled import build_bundled
    from ..backbones.loading import load_backbone

    return (build_bundled() if spec == BUNDLED_BACKBONE else load_backbone(spec)).eval()


def write_task_runs(backbone: nn.Module, folder: Path, seed: int = 0) -> dict[str, Path]:
    """The 8 runs of ``TASK_MIX`` with random tuned tensors, saved as run folders."""
    runs = {}
    for j, (name, (method, options, classes)) in enumerate(TASK_MIX.items()):
        torch.manual_seed(seed + j)
        model = PromptModel(backbone, config_for(method, **options), classes)
        with torch.no_grad():
            for param in model.tuned_parameters().values():
                param.add_(torch.randn_like(param) * 0.02)
        model.metadata["class_names"] = [f"{name}/{i}" for i in range(classes)]
        model.save_pretrained(folder / name)
        runs[name] = folder / name
    return runs


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_throughput(
    backbone: nn.Module, runs: dict[str, Path], batch_size: int, rounds: int, device: torch.device
) -> dict[str, Any]:
    """Images/s of mixed-task batches, single-task batches and each task's own model."""
    from .multitask import MultiTaskModel

    model = MultiTaskModel(backbone, runs).to(device)
    own = {name: PromptModel.from_pretrained(backbone, path).eval().to(device) for name, path in runs.items()}
    names = list(runs)
    images = torch.randn(batch_size, *family_of(backbone).input_size(), device=device)
    mixed_tasks = [names[j % len(names)] for j in range(batch_size)]
    groups = {name: [j for j, t in enumerate(mixed_tasks) if t == name] for name in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_own() -> None:
        for name, rows in groups.items():
            own[name](images[rows])

    jobs: dict[str, Callable[[], Any]] = {
        "backbone": lambda: family_of(backbone).frozen_features(images),
        "mixed": lambda: model(images, mixed_tasks),
        "own_models": run_own,
        **{f"single:{name}": (lambda name=name: model(images, name)) for name in names},
    }
    times: dict[str, list[float]] = {key: [] for key in jobs}
    vs_single, vs_own = [], []  # per round, so that load drifting between rounds cancels out
    with torch.no_grad():
        for key, job in jobs.items():  # warm-up, and the key/value banks
            job()
        for _ in range(rounds):
            for key, job in jobs.items():
                times[key].append(_timed(job, sync))
            vs_single.append(statistics.mean(times[f"single:{name}"][-1] for name in names) / times["mixed"][-1])
            vs_own.append(times["own_models"][-1] / times["mixed"][-1])
    median = {key: statistics.median(values) for key, values in times.items()}
    single = statistics.mean(median[f"single:{name}"] for name in names)
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "backbone_img_s": batch_size / median["backbone"],
        "mixed_img_s": batch_size / median["mixed"],
        "single_img_s": batch_size / single,
        "own_models_img_s": batch_size / median["own_models"],
        "mixed_vs_single": statistics.median(vs_single),
        "mixed_vs_own_models": statistics.median(vs_own),
        "single_task_img_s": {name: batch_size / median[f"single:{name}"] for name in names},
    }


def _png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def _batching(client: Any, replicas: int, tries: int = 50) -> dict[str, Any]:
    """How the requests were batched, summed over the replicas (each answers /health for itself)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        health = (await client.get("/health")).json()
        seen[health.get("replica", "")] = health
        if len(seen) >= replicas:
            break
    requests, batches = sum(h["requests"] for h in seen.values()), sum(h["batches"] for h in seen.values())
    return {
        "replicas_seen": len(seen), "mean_batch": requests / batches if batches else 0.0,
        "largest_batch": max(h["largest_batch"] for h in seen.values()),
    }


async def _load(
    url: str, tasks: list[str], requests: int, clients: int, size: tuple[int, int], timeout_s: float, deadline_s: float,
    replicas: int = 1, headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    import httpx

    images = [_png(seed, size) for seed in range(16)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    stop_at = time.monotonic() + deadline_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.monotonic() < stop_at:
                j = issued
                issued += 1
                files = {"file": ("image.png", images[j % len(images)], "image/png")}
                start = time.perf_counter()
                try:
                    response = await client.post(f"/v1/tasks/{tasks[j % len(tasks)]}/predict", files=files)
                    outcome = "ok" if response.status_code == 200 else f"http {response.status_code}"
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                if outcome == "ok":
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        batching = await _batching(client, replicas)
    quantiles = np.percentile(latencies, [50, 99]) * 1000 if latencies else [float("nan")] * 2
    return {
        "requests": issued,
        "clients": clients,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "p50_ms": float(quantiles[0]),
        "p99_ms": float(quantiles[1]),
        "req_s": len(latencies) / wall,
        "wall_s": wall,
        **batching,
    }


def load_test(
    backbone: nn.Module, tasks_dir: Path, *, requests: int = 500, clients: int = 32, max_batch: int = 32,
    max_wait_ms: float = 5.0, timeout_s: float = 30.0, deadline_s: float = 300.0,
) -> dict[str, Any]:
    """Requests from concurrent clients to a server on 127.0.0.1 (an ephemeral port), spread over
    every task; stops after ``requests`` or ``deadline_s``, whichever comes first."""
    model, _ = load_tasks(backbone, tasks_dir)
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_pending=max(512, 2 * clients))
    size = tuple(family_of(backbone).input_size()[1:])
    with BackgroundServer(create_app(model, config), host="127.0.0.1") as server:
        return asyncio.run(_load(server.url, model.task_names, requests, clients, size, timeout_s, deadline_s))


def load_test_ray(
    backbone: str, weights: Path, tasks_dir: Path, *, replicas: int = 2, requests: int = 500, clients: int = 32,
    max_batch: int = 32, max_wait_ms: float = 5.0, timeout_s: float = 30.0, deadline_s: float = 300.0,
    temp_dir: Path | None = None,
) -> dict[str, Any]:
    """The load test against the app on Ray Serve: ``replicas`` replicas, one CPU and one torch
    thread each, on a local Ray bound to 127.0.0.1 (its files in ``temp_dir``)."""
    import socket

    from .ray_serve import ReplicaSpec, ray_serve

    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_pending=max(512, 2 * clients))
    spec = ReplicaSpec(str(tasks_dir), backbone, str(weights), config=config, watch=False, threads=1)
    with socket.socket() as sock:  # a free port for Ray's proxy
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tasks = sorted(p.name for p in tasks_dir.iterdir() if (p / "config.json").is_file())
    net = bench_backbone(backbone)
    size = tuple(family_of(net).input_size()[1:])
    start = time.perf_counter()
    with ray_serve(spec, replicas, "127.0.0.1", port, num_cpus=max(2, replicas), temp_dir=temp_dir) as url:
        startup = time.perf_counter() - start
        result = asyncio.run(_load(url, tasks, requests, clients, size, timeout_s, deadline_s, replicas))
    return {"replicas": replicas, "startup_s": startup, **result}


def bench_serve(
    backbone: str, *, batch_size: int = 32, rounds: int = 5, requests: int = 500, clients: int = 32,
    max_batch: int = 32, max_wait_ms: float = 5.0, device: str = "cpu", deadline_s: float = 300.0,
    ray: bool = False, replicas: int = 2,
) -> dict[str, Any]:
    """The measurements on ``backbone`` (bundled architecture or timm name, random weights); with
    ``ray``, also the load test on Ray Serve with ``replicas`` replicas."""
    net = bench_backbone(backbone)
    from ..train.config import resolve_device

    torch_device = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="vptune-bench-serve-") as folder:
        runs = write_task_runs(net, Path(folder))
        throughput = measure_throughput(net.to(torch_device), runs, batch_size, rounds, torch_device)
        load = load_test(
            net, Path(folder), requests=requests, clients=clients, max_batch=max_batch, max_wait_ms=max_wait_ms,
            deadline_s=deadline_s,
        )
        ray_load = None
        if ray:
            from safetensors.torch import save_file

            weights = Path(folder) / "backbone.safetensors"  # the replicas rebuild exactly this backbone
            save_file({k: v.contiguous().cpu() for k, v in net.state_dict().items()}, str(weights))
            ray_temp = Path(tempfile.mkdtemp(prefix="vptune-ray-"))  # short: Ray's unix sockets live in it
            try:
                ray_load = load_test_ray(
                    backbone, weights, Path(folder), replicas=replicas, requests=requests, clients=clients,
                    max_batch=max_batch, max_wait_ms=max_wait_ms, deadline_s=deadline_s, temp_dir=ray_temp,
                )
            finally:
                shutil.rmtree(ray_temp, ignore_errors=True)
    return {
        "backbone": backbone,
        "device": str(torch_device),
        "threads": torch.get_num_threads(),
        "tasks": {name: method for name, (method, _, _) in TASK_MIX.items()},
        "throughput": throughput,
        "load_test": load,
        **({"load_test_ray": ray_load} if ray_load is not None else {}),
    }


def report_tables(result: dict[str, Any]) -> list:
    """Rich tables of a ``bench_serve`` result: model throughput, then the load test."""
    from rich.table import Table

    t = result["throughput"]
    title = f"{result['backbone']} (random weights), {result['device']}, {result['threads']} threads, batch {t['batch_size']}"
    model = Table(title=f"Mixed-task batches: {title}")
    for column in ("batches", "images/s", "mixed vs this"):
        model.add_column(column, justify="right" if column != "batches" else "left")
    model.add_row(f"mixed: {len(result['tasks'])} tasks in one pass", f"{t['mixed_img_s']:.1f}", "1.00")
    model.add_row("single task (mean over tasks)", f"{t['single_img_s']:.1f}", f"{t['mixed_vs_single']:.2f}")
    model.add_row("each task's own model on its sub-batch", f"{t['own_models_img_s']:.1f}", f"{t['mixed_vs_own_models']:.2f}")
    model.add_row("frozen backbone alone", f"{t['backbone_img_s']:.1f}", f"{t['mixed_img_s'] / t['backbone_img_s']:.2f}")
    for name, img_s in t["single_task_img_s"].items():
        model.add_row(f"  single: {name}", f"{img_s:.1f}", f"{t['mixed_img_s'] / img_s:.2f}")
    load = result["load_test"]
    server = Table(title=f"HTTP load test on 127.0.0.1: {load['requests']} requests from {load['clients']} clients")
    for column in ("server", "ok", "errors", "p50 ms", "p99 ms", "requests/s", "mean batch", "largest batch"):
        server.add_column(column, justify="left" if column == "server" else "right", no_wrap=column == "server")
    rows = [(f"1 process x {result['threads']} thread{'s' if result['threads'] > 1 else ''}", load)]
    if "load_test_ray" in result:
        ray = result["load_test_ray"]
        rows.append((f"Ray Serve: {ray['replicas']} replicas x 1 thread", ray))
    for name, row in rows:
        server.add_row(
            name, str(row["ok"]), str(row["errors"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['req_s']:.1f}",
            f"{row['mean_batch']:.1f}", str(row["largest_batch"]),
        )
    return [model, server]
