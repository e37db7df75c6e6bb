"""The server's Prometheus metrics (``GET /metrics``), one registry per app.

Requests by endpoint, task and status code; request latency; images by task and outcome;
the batch sizes the backbone actually ran; requests and images waiting; images being
decoded; tasks loaded. A task label only ever holds the name of a task that was loaded
when the request came ("" otherwise), so random paths cannot grow the label set.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

_PREDICT = re.compile(r"^/v1/tasks/([^/]+)/predict$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _endpoint(path: str) -> str:
    if _PREDICT.match(path):
        return "predict"
    return {"/health": "health", "/v1/tasks": "tasks", "/metrics": "metrics"}.get(path, "other")


class ServerMetrics:
    """The collectors, and an ASGI middleware (``middleware(app)``) that counts every request."""

    def __init__(self, max_batch: int, tasks_loaded: Callable[[], int], requests_waiting: Callable[[], int],
                 images_queued: Callable[[], int], decoding: Callable[[str], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "vptune_requests", "HTTP requests by endpoint, task and status code", ["endpoint", "task", "status"], registry=registry
        )
        self.latency = Histogram(
            "vptune_request_latency_seconds", "Time from a request's arrival to its response", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.images = Counter("vptune_images", "Images by task and outcome (ok, or the error status)", ["task", "outcome"], registry=registry)
        buckets = sorted({1, *(2**i for i in range(1, max_batch.bit_length() + 1) if 2**i <= max_batch), max_batch})
        self.batch_size = Histogram("vptune_batch_size", "Images per backbone pass", buckets=buckets, registry=registry)
        Gauge("vptune_queue_depth", "Images admitted and not yet answered (decoding, queued or running)", registry=registry).set_function(requests_waiting)
        Gauge("vptune_batch_queue", "Images waiting for the next backbone pass", registry=registry).set_function(images_queued)
        Gauge("vptune_tasks_loaded", "Tasks being served", registry=registry).set_function(tasks_loaded)
        decoding_gauge = Gauge("vptune_decoding", "Images being decoded, by lane (small or large images)", ["lane"], registry=registry)
        for lane in ("small", "large"):
            decoding_gauge.labels(lane).set_function(lambda lane=lane: decoding(lane))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app: Any, task_names: Callable[[], list[str]]) -> Callable:
        """Wrap ``app`` so that every HTTP request is counted and timed."""

        async def counted(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start, status = time.perf_counter(), 500
            path = scope["path"]
            endpoint = _endpoint(path)
            match = _PREDICT.match(path)
            task = match.group(1) if match and match.group(1) in task_names() else ""

            async def watched(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, watched)
            finally:
                self.requests.labels(endpoint, task, str(status)).inc()
                self.latency.labels(endpoint).observe(time.perf_counter() - start)

        return counted
