"""Dynamic micro-batching: concurrent requests, whatever their task, are gathered into one batch.

The event loop only queues work and awaits results; the batch itself runs in one worker
thread, so a long backbone pass never blocks other requests from being accepted, decoded,
refused or timed out. A batch closes when it holds ``max_batch`` items or ``max_wait_ms``
after its first item arrived; requests that arrive while a batch runs form the next one.
Admission is bounded: past ``max_pending`` images in flight, ``admit`` refuses at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Sequence


class Overloaded(Exception):
    """More requests are in flight than the server accepts; the client should retry later."""


@dataclasses.dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0

    def to_dict(self) -> dict[str, Any]:
        mean = self.requests / self.batches if self.batches else 0.0
        return {**dataclasses.asdict(self), "mean_batch": round(mean, 3)}


class MicroBatcher:
    """Runs ``process(items) -> results`` (one result per item, in order) on gathered batches."""

    def __init__(
        self, process: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 32, max_wait_ms: float = 5.0,
        max_pending: int = 256, on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_pending < 1:
            raise ValueError(
                f"need max_batch >= 1, max_wait_ms >= 0 and max_pending >= 1; got {max_batch}, {max_wait_ms}, {max_pending}"
            )
        self.process, self.on_batch = process, on_batch
        self.max_batch, self.max_wait_s, self.max_pending = max_batch, max_wait_ms / 1000.0, max_pending
        self.pending = 0
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vptune-batch")
        self._task = asyncio.create_task(self._run(), name="vptune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def queued(self) -> int:
        """Items waiting for the next batch."""
        return 0 if self._queue is None else self._queue.qsize()

    @contextlib.asynccontextmanager
    async def admit(self, count: int = 1) -> AsyncIterator[None]:
        """Count a request's ``count`` images as in flight for its whole life (decoding included),
        or refuse it."""
        if self.pending + count > self.max_pending:
            raise Overloaded(f"{self.pending} images are pending (limit {self.max_pending})")
        self.pending += count
        try:
            yield
        finally:
            self.pending -= count

    async def submit(self, item: Any, timeout_s: float) -> Any:
        """The result for ``item`` once its batch has run; ``TimeoutError`` after ``timeout_s``."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running (start() was not called)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await asyncio.wait_for(future, timeout_s)  # a timed-out future is cancelled and skipped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.process, [item for item, _ in batch])
            except Exception as error:  # noqa: BLE001  the batch fails, the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
