"""The HTTP server: FastAPI over a ``MultiTaskModel`` with dynamic micro-batching.

``GET /health``, ``GET /v1/tasks`` and ``POST /v1/tasks/{task}/predict`` (an image as the
multipart field ``file``; top-k labels with probabilities); FastAPI's OpenAPI docs at
``/docs``. Every request that the server cannot serve gets a JSON ``{"detail": ...}`` and
the server goes on: not an image or a corrupt one 400, unknown task 404, a body over the
limit 413, too many requests in flight 503 with ``Retry-After``, a request not served in
time 504. Images are decoded with PIL and preprocessed with the backbone's own data config,
as evaluation does; a task folder is only ever read through ``MultiTaskModel.add_task``
(``config.json`` and ``model.safetensors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastapi import FastAPI, File, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor, nn

from ..data.transforms import backbone_data_config, eval_transform
from .batching import MicroBatcher, Overloaded
from .multitask import TASK_NAME, MultiTaskModel

log = logging.getLogger("vptune.serve")


@dataclasses.dataclass
class ServeConfig:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pending: int = 512  # requests in flight (decoding, queued or running) before 503
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # a bigger image is refused before it is decoded
    request_timeout_s: float = 30.0
    retry_after_s: int = 1


@dataclasses.dataclass
class _Item:
    image: Tensor
    task: str
    k: int


class BadImage(ValueError):
    """The upload is not an image PIL can decode, or a corrupt or oversized one."""


def decode_image(data: bytes, transform: Callable[[Image.Image], Tensor], channels: int, max_pixels: int) -> Tensor:
    """Bytes to a preprocessed image tensor (C, H, W), or ``BadImage`` saying what is wrong."""
    if not data:
        raise BadImage("the uploaded file is empty: send an image (PNG, JPEG, ...) as the multipart field 'file'")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise BadImage(f"image is {image.width}x{image.height} pixels, over the limit of {max_pixels}")
            image.load()
            image = image.convert("L" if channels == 1 else "RGB")
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a readable image: PIL does not recognise the file's format; send a PNG, JPEG or other image") from None
    except Exception as error:  # noqa: BLE001  PIL raises many types for a corrupt file
        raise BadImage(f"not a readable image: the file is corrupt or truncated ({type(error).__name__}: {error})") from None
    return transform(image)


def _predict(model: MultiTaskModel, items: Sequence[_Item]) -> list[list[dict[str, Any]]]:
    """One mixed-task pass over the batch; the top-k labels of each image."""
    device = next(model.backbone.parameters()).device
    images = torch.stack([item.image for item in items]).to(device)
    logits = model(images, [item.task for item in items])
    results = []
    for item, row in zip(items, logits):
        probs = row.float().softmax(-1)
        top = probs.topk(min(item.k, probs.numel()))
        labels = model.task(item.task).labels
        results.append([
            {"label": labels[i], "index": i, "probability": p}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ])
    return results


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with a JSON 413: at once when its Content-Length
    says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> HTTPException:
        return HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes: send a smaller image")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = self._error()
            return await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, limited, send)


def create_app(model: MultiTaskModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``model``'s tasks; the batcher runs for the app's lifetime."""
    config = config or ServeConfig()
    batcher = MicroBatcher(
        lambda items: _predict(model, items),
        max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_pending=config.max_pending,
    )
    preprocessing = backbone_data_config(model.backbone)
    channels = model.family.input_size()[0]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="vptune",
        summary="Many prompt-tuned tasks served from one frozen backbone, batched across tasks.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error ({type(error).__name__}: {error})"}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the loaded tasks, requests in flight and how requests were batched."""
        return {"status": "ok", "tasks": len(model.task_names), "pending": batcher.pending, **batcher.stats.to_dict()}

    @app.get("/v1/tasks")
    async def tasks() -> dict[str, Any]:
        """Every task: its method, its number of classes and their labels."""
        return {
            "tasks": [
                {"name": t.name, "method": t.method_name, "num_classes": len(t.labels), "labels": t.labels}
                for t in (model.task(name) for name in model.task_names)
            ]
        }

    @app.post("/v1/tasks/{task}/predict")
    async def predict(
        task: str = PathParam(..., max_length=64, description="A task name from GET /v1/tasks."),
        file: UploadFile = File(..., description="The image (PNG, JPEG, or any format PIL reads)."),
        k: int = Query(5, ge=1, le=1000, description="How many top labels to return."),
    ) -> dict[str, Any]:
        """Classify one image with one task's head; requests across tasks share batches."""
        try:
            served = model.task(task) if TASK_NAME.match(task) else None
        except KeyError:
            served = None
        if served is None:
            raise HTTPException(404, f"no task {task!r}; GET /v1/tasks lists the tasks served here")
        try:
            async with batcher.admit():
                data = await file.read()
                # built per request (cheap), so a task removed and added again from another run is not stale
                transform = eval_transform(served.model.metadata.get("data"), preprocessing)
                try:
                    image = await asyncio.to_thread(decode_image, data, transform, channels, config.max_image_pixels)
                except BadImage as error:
                    raise HTTPException(400, str(error)) from None
                try:
                    top = await batcher.submit(_Item(image, task, k), config.request_timeout_s)
                except TimeoutError:
                    raise HTTPException(504, f"not served within {config.request_timeout_s:g} s; retry later") from None
        except Overloaded as error:
            raise HTTPException(
                503, f"server busy: {error}; retry later", headers={"Retry-After": str(config.retry_after_s)}
            ) from None
        return {"task": task, "predictions": top}

    return app


def load_tasks(backbone: nn.Module, tasks_dir: str | Path) -> tuple[MultiTaskModel, list[str]]:
    """Every run folder directly under ``tasks_dir`` as a task named after its folder.

    Returns the model and one line per folder that was skipped, with the reason; refuses a
    folder with no servable run at all."""
    root = Path(tasks_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--tasks {root} is not a folder: expected a folder of run folders, one per task")
    model, skipped = MultiTaskModel(backbone), []
    resolved_root = root.resolve()
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not (folder / "config.json").is_file():
            continue
        if resolved_root not in folder.resolve().parents:
            skipped.append(f"{folder.name}: links outside {root}")
            continue
        if not TASK_NAME.match(folder.name):
            skipped.append(f"{folder.name}: not a valid task name (letters, digits, '_' or '-', at most 64)")
            continue
        try:
            model.add_task(folder.name, folder)
        except (ValueError, FileNotFoundError, TypeError) as error:
            skipped.append(f"{folder.name}: {error}")
    if not model.task_names:
        reasons = "; ".join(skipped) or "it holds no run folders (config.json + model.safetensors)"
        raise ValueError(f"no task to serve in {root}: {reasons}")
    return model, skipped


class BackgroundServer:
    """uvicorn serving ``app`` in a thread on ``host`` (loopback) and an ephemeral port: for tests
    and the load test. ``with BackgroundServer(app) as server: server.url``; stops on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> None:
        import uvicorn

        self.host, self.start_timeout_s = host, start_timeout_s
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
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


def serve(model: MultiTaskModel, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    """Serve ``model`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, config), host=host, port=port, log_level="info", timeout_keep_alive=5)

