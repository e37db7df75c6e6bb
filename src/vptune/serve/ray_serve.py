"""Scale-out: the same app on Ray Serve, in several replicas behind Ray's HTTP proxy.

Each replica builds what ``vptune serve`` builds in one process (the backbone, every task of
the tasks folder with its watcher, the micro-batcher, the keys and limits) from a picklable
``ReplicaSpec``, and serves the same FastAPI app through ``serve.ingress``; Ray's proxy
spreads requests over the replicas. The tasks folder must be readable by every replica (on
a cluster: a shared file system). API keys travel as their digests, never as the keys.
Ray's proxy, not uvicorn here, reads the requests, so the deadlines on slow request heads and
bodies are Ray's; ``/metrics`` and ``/health`` answer for the replica the request reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .security import ApiKeys
from .server import ServeConfig

APP_NAME = "vptune"


@dataclasses.dataclass
class ReplicaSpec:
    """What a replica needs to build its app."""

    tasks_dir: str
    backbone: str
    weights: str | None = None
    pretrained: bool = False
    device: str = "auto"
    config: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    api_keys: ApiKeys | None = None
    watch: bool = True
    watch_interval_s: float = 1.0
    threads: int | None = None  # torch threads per replica (default: the CPUs it reserves)


def build_app(spec: ReplicaSpec) -> Any:
    """The replica's app: the backbone, its tasks and their watcher, as ``vptune serve`` has them."""
    import torch

    from ..backbones import load_backbone
    from ..train.config import resolve_device
    from .live import open_tasks
    from .server import create_app

    if spec.threads:
        torch.set_num_threads(spec.threads)
    net = load_backbone(spec.backbone, weights=spec.weights, pretrained=spec.pretrained)
    net.to(resolve_device(spec.device))  # on the replica's machine
    watcher = open_tasks(net, spec.tasks_dir, interval_s=spec.watch_interval_s, settle_s=spec.watch_interval_s, allow_empty=spec.watch)
    # Ray's proxy reads the client's request; its body reaches the replica when the replica asks for
    # it, so a deadline here would time the replica's own queue, not the client.
    config = dataclasses.replace(spec.config, body_timeout_s=None)
    return create_app(watcher.model, config, watcher=watcher if spec.watch else None, api_keys=spec.api_keys)


def deployment(spec: ReplicaSpec, replicas: int, replica_cpus: float = 1.0) -> Any:
    """The Ray Serve application: ``replicas`` copies of ``build_app(spec)``."""
    from ray import serve

    @serve.deployment(
        name="vptune", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=spec.config.max_pending,
    )
    @serve.ingress()
    class VptuneReplica:
        def __init__(self, spec: ReplicaSpec) -> None:
            self.spec = spec

        def __serve_build_asgi_app__(self) -> Any:
            return build_app(self.spec)

    return VptuneReplica.bind(spec)


@contextlib.contextmanager
def ray_serve(
    spec: ReplicaSpec, replicas: int, host: str = "127.0.0.1", port: int = 8000, *, replica_cpus: float = 1.0,
    address: str | None = None, num_cpus: float | None = None, temp_dir: str | Path | None = None,
) -> Iterator[str]:
    """Run the app on Ray Serve while the block runs; yields its URL. Joins ``address`` or the
    Ray already initialised, else starts a local Ray on 127.0.0.1 (``temp_dir``: its files)."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        # the replicas import vptune from where this process does, installed or not
        source = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus or max(os.cpu_count() or 1, replicas * replica_cpus), include_dashboard=False,
                _temp_dir=None if temp_dir is None else str(temp_dir), _node_ip_address="127.0.0.1",
                object_store_memory=128 * 1024**2, runtime_env=runtime_env, log_to_driver=False,
            )
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(spec, replicas, replica_cpus), name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://{host}:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if started:
            ray.shutdown()


def serve_on_ray(
    spec: ReplicaSpec, replicas: int, host: str, port: int, *, replica_cpus: float = 1.0, address: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """``ray_serve`` until SIGINT or SIGTERM, then Ray Serve's graceful shutdown (requests in
    flight are finished) and a normal return."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ray_serve(spec, replicas, host, port, replica_cpus=replica_cpus, address=address):
            if on_ready is not None:
                on_ready()
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
