"""The HTTP server: FastAPI over a ``MultiTaskModel`` with dynamic micro-batching.

``GET /health`` (always open), ``GET /v1/tasks``, ``POST /v1/tasks/{task}/predict`` (one or
more images as repeated multipart fields ``file``; top-k labels with probabilities, one
result per image; a vision-language task reads the form field ``text`` with its image, two
for NLVR, any number for retrieval, and gives one answer) and ``GET /metrics`` (Prometheus). Every request that the server cannot
serve gets a JSON ``{"detail": ...}`` and the server goes on: not an image or a corrupt one
400, no or a wrong API key 401, a task outside the key's scope 403, unknown task 404, a body
too slow 408, a body or image over the limits 413, too many images in flight 503 with
``Retry-After``, a request not served in time 504. With several images, each bad image is
reported in its own result and the others are answered.

What makes it safe to expose (``security.py``): API keys, allowed ``Host`` headers, time
limits on request heads and bodies, no API docs page by default (FastAPI's pulls scripts
from a public CDN; ``docs=True`` turns it on). Images are decoded with PIL under a pixel
limit, in two bounded thread lanes (small images, and large ones one at a time), so a few
huge uploads cannot take the memory or stall the normal requests; then preprocessed with
the backbone's own data config, as evaluation does. A task folder is only ever read through
``MultiTaskModel.load_task`` (``config.json`` and ``model.safetensors``); with a
``TaskWatcher`` the tasks follow the folder while the server runs (``live.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor, nn

from ..data.transforms import backbone_data_config, eval_transform, resize_transform
from .batching import MicroBatcher, Overloaded
from .live import TaskWatcher, open_tasks
from .metrics import ServerMetrics
from .multitask import TASK_NAME, MultiTaskModel, Task
from .security import AccessControl, AllowedHosts, ApiKeys, BodyDeadline, default_allowed_hosts, timed_http_protocol

log = logging.getLogger("vptune.serve")


@dataclasses.dataclass
class ServeConfig:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pending: int = 512  # images in flight (decoding, queued or running) before 503
    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 32  # images in one request
    max_image_pixels: int = 12_000_000  # a bigger image is refused before it is decoded (a 4000x3000 photo fits)
    large_image_pixels: int = 2_000_000  # images above this are decoded in the large lane
    decode_threads: int = 2  # small images decoded at once
    large_decodes: int = 1  # large images decoded at once: decoded memory stays under ~8 B x this x max_image_pixels
    request_timeout_s: float = 30.0
    retry_after_s: int = 1
    header_timeout_s: float = 5.0  # a request line and headers must arrive within this
    body_timeout_s: float | None = 10.0  # a request body must arrive within this of the request's start (None: a proxy in front sees to it)
    keep_alive_s: float = 5.0
    shutdown_timeout_s: float = 30.0  # on SIGTERM, the longest wait for requests in flight
    allowed_hosts: tuple[str, ...] = default_allowed_hosts()
    docs: bool = False  # FastAPI's /docs page loads its scripts from a public CDN

    def __post_init__(self) -> None:
        positive = ("max_batch", "max_pending", "max_body_bytes", "max_images", "max_image_pixels", "decode_threads",
                    "large_decodes", "request_timeout_s", "header_timeout_s", "keep_alive_s")
        if self.body_timeout_s is not None:
            positive += ("body_timeout_s",)
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"serve setting {name} must be above 0, got {getattr(self, name)!r}")
        for name in ("max_wait_ms", "shutdown_timeout_s", "retry_after_s", "large_image_pixels"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"serve setting {name} must be 0 or more, got {getattr(self, name)!r}")
        self.allowed_hosts = tuple(self.allowed_hosts)


@dataclasses.dataclass
class _Item:
    image: Tensor | None  # None for a vision-language request: its images and text are in ``inputs``
    task: Task  # held from the request's arrival: a task replaced meanwhile answers with the old run
    k: int
    inputs: dict[str, Tensor] | None = None  # a vision-language request's batch dict (batch of one)


class BadImage(ValueError):
    """The upload is not an image PIL can decode, or a corrupt or oversized one."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image's header alone (nothing is decoded)."""
    if not data:
        raise BadImage("the uploaded file is empty: send an image (PNG, JPEG, ...) as the multipart field 'file'")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except UnidentifiedImageError:
        raise BadImage("not a readable image: PIL does not recognise the file's format; send a PNG, JPEG or other image") from None
    except Exception as error:  # noqa: BLE001  PIL raises many types for a corrupt file
        raise BadImage(f"not a readable image: the file is corrupt or truncated ({type(error).__name__}: {error})") from None


def decode_image(data: bytes, transform: Callable[[Image.Image], Tensor], channels: int, max_pixels: int) -> Tensor:
    """Bytes to a preprocessed image tensor (C, H, W), or ``BadImage`` saying what is wrong."""
    width, height = image_size(data)
    if width * height > max_pixels:
        raise BadImage(f"image is {width}x{height} pixels, over the limit of {max_pixels}: send a smaller image", 413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = image.convert("L" if channels == 1 else "RGB")
    except Exception as error:  # noqa: BLE001  PIL raises many types for a corrupt file
        raise BadImage(f"not a readable image: the file is corrupt or truncated ({type(error).__name__}: {error})") from None
    return transform(image)


class ImageDecoder:
    """Decodes uploads in two bounded thread lanes: images up to ``large_image_pixels`` in the
    small lane (``decode_threads`` at once), bigger ones in the large lane (``large_decodes`` at
    once), so the memory a burst of huge images takes is bounded and small images never wait
    behind them. The size is read from the header first; over ``max_image_pixels`` is refused."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.lanes = {
            "small": ThreadPoolExecutor(config.decode_threads, thread_name_prefix="vptune-decode"),
            "large": ThreadPoolExecutor(config.large_decodes, thread_name_prefix="vptune-decode-large"),
        }
        self.busy = {"small": 0, "large": 0}  # decodes running now
        self.most_busy = {"small": 0, "large": 0}  # the most that ever ran at once
        self._lock = threading.Lock()

    def _run(self, lane: str, data: bytes, transform: Callable, channels: int) -> Tensor:
        with self._lock:
            self.busy[lane] += 1
            self.most_busy[lane] = max(self.most_busy[lane], self.busy[lane])
        try:
            return decode_image(data, transform, channels, self.config.max_image_pixels)
        finally:
            with self._lock:
                self.busy[lane] -= 1

    async def decode(self, data: bytes, transform: Callable[[Image.Image], Tensor], channels: int) -> Tensor:
        width, height = image_size(data)
        if width * height > self.config.max_image_pixels:
            raise BadImage(
                f"image is {width}x{height} pixels, over the limit of {self.config.max_image_pixels}: send a smaller image", 413
            )
        lane = "large" if width * height > self.config.large_image_pixels else "small"
        return await asyncio.get_running_loop().run_in_executor(self.lanes[lane], self._run, lane, data, transform, channels)

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.shutdown(wait=False, cancel_futures=True)


def _predict(model: MultiTaskModel, items: Sequence[_Item]) -> list[list[dict[str, Any]]]:
    """One mixed-task pass over the batch's images; the top-k labels of each image. The
    vision-language requests go by task (``_predict_vl``)."""
    results: list[Any] = [None] * len(items)
    images = [j for j, item in enumerate(items) if item.inputs is None]
    if images:
        device = next(model.backbone.parameters()).device
        logits = model(torch.stack([items[j].image for j in images]).to(device), [items[j].task for j in images])
        for j, row in zip(images, logits):
            probs = row.float().softmax(-1)
            top = probs.topk(min(items[j].k, probs.numel()))
            labels = items[j].task.labels
            results[j] = [{"label": labels[i], "index": i, "probability": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]
    _predict_vl(model, items, results)
    return results


def _predict_vl(model: MultiTaskModel, items: Sequence[_Item], results: list[Any]) -> None:
    """The vision-language requests: one pass per task and input shape (a retrieval request may
    hold any number of images). VQA: the top-k answers with their sigmoid scores, as the task
    trains them; NLVR: true and false with their probabilities; retrieval: each image's match
    score with the text, best first."""
    device = next(model.backbone.parameters()).device
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        if item.inputs is not None:
            shapes = tuple((key, tuple(value.shape)) for key, value in sorted(item.inputs.items()))
            groups.setdefault((id(item.task), shapes), []).append(j)
    for rows in groups.values():
        task = items[rows[0]].task
        inputs = {key: torch.cat([items[j].inputs[key] for j in rows]).to(device) for key in items[rows[0]].inputs}
        outputs = model.answer_vl(task, inputs).float()
        for j, row in zip(rows, outputs):
            if task.kind == "vqa":
                scores = row.sigmoid()
                top = scores.topk(min(items[j].k, scores.numel()))
                results[j] = [{"label": task.labels[i], "index": i, "score": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]
            elif task.kind == "nlvr":
                probs = row.softmax(-1)
                results[j] = sorted(({"label": task.labels[i], "index": i, "probability": probs[i].item()} for i in (0, 1)),
                                    key=lambda entry: -entry["probability"])
            else:
                results[j] = sorted(({"image": i, "score": score} for i, score in enumerate(row.tolist())),
                                    key=lambda entry: -entry["score"])


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with a JSON 413: at once when its Content-Length
    says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> HTTPException:
        return HTTPException(
            413, f"request body is over the limit of {self.max_bytes} bytes: send a smaller image",
            headers={"Connection": "close"},  # the rest of the body is not read: the connection cannot be reused
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = self._error()
            return await JSONResponse({"detail": error.detail}, status_code=413, headers=error.headers)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, limited, send)


def create_app(
    model: MultiTaskModel, config: ServeConfig | None = None, *, watcher: TaskWatcher | None = None,
    api_keys: ApiKeys | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model``'s tasks; the batcher (and ``watcher``, which keeps the
    tasks in step with their folder) run for the app's lifetime. With ``api_keys``, every
    request but ``/health`` needs a key."""
    config = config or ServeConfig()
    decoder = ImageDecoder(config)
    metrics: ServerMetrics | None = None
    batcher = MicroBatcher(
        lambda items: _predict(model, items), max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
        max_pending=config.max_pending, on_batch=lambda size: metrics.batch_size.observe(size),
    )
    metrics = ServerMetrics(
        config.max_batch, lambda: len(model.task_names), lambda: batcher.pending, lambda: batcher.queued,
        lambda lane: decoder.busy[lane],
    )
    preprocessing = backbone_data_config(model.backbone)
    channels = model.family.input_size()[0]
    replica = uuid.uuid4().hex[:8]  # tells replicas apart behind a load balancer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()
        await batcher.stop()
        decoder.close()

    app = FastAPI(
        title="vptune",
        summary="Many prompt-tuned tasks served from one frozen backbone, batched across tasks.",
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
    )
    app.state.batcher, app.state.decoder, app.state.metrics, app.state.serve_config = batcher, decoder, metrics, config
    # Outermost last: Host check, then counting, then the key, then the body's size and time limits.
    if config.body_timeout_s is not None:
        app.add_middleware(BodyDeadline, timeout_s=config.body_timeout_s)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if api_keys is not None:
        app.add_middleware(AccessControl, keys=api_keys)
    app.add_middleware(metrics.middleware, task_names=lambda: model.task_names)
    app.add_middleware(AllowedHosts, hosts=config.allowed_hosts)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error ({type(error).__name__}: {error})"}, status_code=500)

    def in_scope(request: Request) -> Callable[[str], bool]:
        tasks = getattr(request.state, "vptune_tasks", None)
        return (lambda name: True) if tasks is None else tasks.__contains__

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the number of tasks, images in flight and how requests were batched."""
        return {
            "status": "ok", "replica": replica, "tasks": len(model.task_names), "pending": batcher.pending,
            **batcher.stats.to_dict(),
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, media_type = metrics.render()
        return Response(body, media_type=media_type)

    @app.get("/v1/tasks")
    async def tasks(request: Request) -> dict[str, Any]:
        """Every task this key may use: its method, its number of classes and their labels (a
        vision-language task: also its kind and how many images a request holds)."""
        allowed = in_scope(request)
        listed = []
        for name in model.task_names:
            try:
                task = model.task(name)
            except KeyError:  # removed meanwhile
                continue
            if allowed(name):
                entry = {"name": task.name, "method": task.method_name, "num_classes": len(task.labels), "labels": task.labels}
                if task.reads_text:  # what a request must hold
                    fewest, most = task.images
                    entry.update(task=task.kind, reads_text=True, images=fewest if fewest == most else f"{fewest}+")
                listed.append(entry)
        return {"tasks": listed}

    async def answer(upload: UploadFile, served: Task, transform: Callable, k: int, deadline: float) -> tuple[int, Any]:
        """(200, top-k) for one image, or (status, what is wrong)."""
        loop = asyncio.get_running_loop()
        data = await upload.read()
        try:
            image = await asyncio.wait_for(decoder.decode(data, transform, channels), max(0.0, deadline - loop.time()))
            return 200, await batcher.submit(_Item(image, served, k), max(0.0, deadline - loop.time()))
        except BadImage as error:
            return error.status, str(error)
        except TimeoutError:
            return 504, f"not served within {config.request_timeout_s:g} s; retry later"

    async def answer_vl(served: Task, file: list[UploadFile], text: str | None, k: int, deadline: float) -> dict[str, Any]:
        """A vision-language request: every image must decode (else the request fails with the
        first bad one's status, naming its file), the text is tokenised as in training (longer
        text is truncated, and the response's ``warnings`` say so); one answer for the request."""
        fewest, most = served.images
        what = {"vqa": "the question", "nlvr": "the statement", "retrieval": "the caption"}.get(served.kind, "the text")
        if text is None or not text.strip():
            raise HTTPException(400, f"task {served.name!r} ({served.kind}) reads {what} with its image"
                                     f"{'s' if fewest > 1 else ''}: send it as the form field 'text'")
        if len(file) < fewest or (most and len(file) > most):
            count = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
            raise HTTPException(400, f"task {served.name!r} ({served.kind}) reads {count} image{'s' if fewest > 1 else ''} "
                                     f"with the text, got {len(file)}: repeat the field 'file' {fewest if fewest == most else 'for each image'}")
        loop = asyncio.get_running_loop()
        transform = resize_transform(preprocessing)  # as the vision-language data were read in training
        pixels = []
        for upload in file:
            try:
                data = await upload.read()
                pixels.append(await asyncio.wait_for(decoder.decode(data, transform, channels), max(0.0, deadline - loop.time())))
            except BadImage as error:
                raise HTTPException(error.status, f"file {(upload.filename or '')[:255]!r}: {error}") from None
            except TimeoutError:
                raise HTTPException(504, f"not served within {config.request_timeout_s:g} s; retry later") from None
        ids, mask, warnings = served.encode_text(text)
        if served.kind == "nlvr":
            inputs = {"image0": pixels[0][None], "image1": pixels[1][None]}
        else:
            stacked = torch.stack(pixels)
            inputs = {"image": stacked if served.kind == "vqa" else stacked[None]}  # retrieval: 1, K, C, H, W
        inputs.update(input_ids=ids, attention_mask=mask)
        try:
            predictions = await batcher.submit(_Item(None, served, k, inputs), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise HTTPException(504, f"not served within {config.request_timeout_s:g} s; retry later") from None
        if served.kind == "retrieval":
            names = [(upload.filename or "")[:255] for upload in file]
            predictions = [{**entry, "file": names[entry["image"]]} for entry in predictions]
        return {"task": served.name, "text": text, "predictions": predictions, "warnings": warnings}

    @app.post("/v1/tasks/{task}/predict")
    async def predict(
        task: str = PathParam(..., max_length=64, description="A task name from GET /v1/tasks."),
        file: list[UploadFile] = File(..., description="One or more images (repeat the field); PNG, JPEG, or any format PIL reads."),
        k: int = Query(5, ge=1, le=1000, description="How many top labels to return."),
        text: str | None = Form(None, max_length=2000, description="Vision-language tasks: the question (VQA), statement (NLVR; two images) or caption (retrieval)."),
    ) -> dict[str, Any]:
        """Classify images with one task's head: one result per image, in order; requests across
        tasks share batches. With one image, its error is the response's; with several, each
        result holds its predictions or its own status and error. A vision-language task reads
        the form field ``text`` with its image (NLVR: two images; retrieval: scores each image)."""
        try:
            served = model.task(task) if TASK_NAME.match(task) else None
        except KeyError:
            served = None
        if served is None:
            raise HTTPException(404, f"no task {task!r}; GET /v1/tasks lists the tasks served here")
        most = min(config.max_images, config.max_pending)  # more could never be admitted
        if len(file) > most:
            raise HTTPException(413, f"{len(file)} images in one request, over the limit of {most}: send fewer per request")
        if text is not None and not served.reads_text:
            raise HTTPException(400, f"task {task!r} classifies images and reads no text: leave out the form field 'text'")
        deadline = asyncio.get_running_loop().time() + config.request_timeout_s
        if served.reads_text:
            try:
                async with batcher.admit(len(file)):
                    body = await answer_vl(served, file, text, k, deadline)
            except Overloaded as error:
                raise HTTPException(
                    503, f"server busy: {error}; retry later", headers={"Retry-After": str(config.retry_after_s)}
                ) from None
            except HTTPException as error:
                metrics.images.labels(task, str(error.status_code)).inc(len(file))
                raise
            metrics.images.labels(task, "ok").inc(len(file))
            return body
        try:
            async with batcher.admit(len(file)):
                # built per request (cheap), so a task removed and added again from another run is not stale
                transform = eval_transform(served.model.metadata.get("data"), preprocessing)
                outcomes = await asyncio.gather(*(answer(upload, served, transform, k, deadline) for upload in file))
        except Overloaded as error:
            raise HTTPException(
                503, f"server busy: {error}; retry later", headers={"Retry-After": str(config.retry_after_s)}
            ) from None
        results = []
        for upload, (status, body) in zip(file, outcomes):
            metrics.images.labels(task, "ok" if status == 200 else str(status)).inc()
            name = (upload.filename or "")[:255]
            results.append({"file": name, "predictions": body} if status == 200 else {"file": name, "status": status, "error": body})
        if len(outcomes) == 1:
            status, body = outcomes[0]
            if status != 200:
                raise HTTPException(status, body)
            return {"task": task, "predictions": body, "results": results}
        return {"task": task, "results": results}

    return app


def load_tasks(backbone: nn.Module, tasks_dir: str | Path) -> tuple[MultiTaskModel, list[str]]:
    """Every run folder directly under ``tasks_dir`` as a task named after its folder.

    Returns the model and one line per folder that was skipped, with the reason; refuses a
    folder with no servable run at all. ``live.open_tasks`` also returns the watcher that
    keeps the tasks in step with the folder."""
    watcher = open_tasks(backbone, tasks_dir)
    return watcher.model, [f"{name}: {why}" for name, why in sorted(watcher.skipped.items())]


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> Any:
    """uvicorn's settings for ``app``: its ``ServeConfig``'s time limits on heads, bodies, idle
    connections and shutdown; no ``Server`` header."""
    import uvicorn

    config: ServeConfig = app.state.serve_config
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=timed_http_protocol(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_s, timeout_graceful_shutdown=config.shutdown_timeout_s,
        server_header=False, lifespan="on",
    )


class BackgroundServer:
    """uvicorn serving ``app`` (from ``create_app``) in a thread on ``host`` (loopback) and an
    ephemeral port: for tests and the load test. ``with BackgroundServer(app) as server: server.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> None:
        import uvicorn

        self.host, self.start_timeout_s = host, start_timeout_s
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {self.start_timeout_s:g} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.socket.close()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM. On SIGTERM it stops accepting
    connections, answers the requests in flight (at most ``shutdown_timeout_s``) and returns
    normally, so the process exits 0."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="info"))
    # uvicorn re-raises a SIGTERM it caught once it has shut down gracefully; that is a normal end here.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
