"""Dynamic batching: requests that arrive close together share one forward pass.

One asyncio task collects queued images into batches of at most ``max_batch`` (the first waits
at most ``max_wait_ms`` for company) and runs each on a single worker thread (the event loop keeps
serving; one model, one forward at a time).  Each request gets its own row of the outputs.

Answers do not depend on the batch: rows are computed independently, and padded
(``Detector.predict_batch(pad_to=...)``) every forward has the same shape, so even kernels chosen
by batch size (oneDNN convolutions) compute every image the same way.  A request whose caller
gave up is dropped before its forward when it can be.  Hand-written: the serving libraries that
batch (Triton, TorchServe, Ray Serve) are whole servers; this is a few dozen lines on asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# ``images [B, 3, H, W]``, ``orig_sizes [B, 2]`` -> ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels [B, K]``
ForwardFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class QueueFull(Exception):
    """More requests are waiting than the queue admits (the service answers 503)."""


class Stopped(Exception):
    """The service is shutting down."""


@dataclass
class Answer:
    """One image's row of a batched forward: ``boxes [K, 4]``, ``scores [K]``, ``labels [K]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    batch_size: int  # images in the forward pass (not counting padding)
    queue_ms: float  # from submission to the start of the forward
    infer_ms: float  # the forward pass


@dataclass
class _Item:
    image: Tensor  # [3, H, W] preprocessed
    size: tuple[int, int]  # original (h, w)
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queue + batching loop around ``forward``; start it inside the event loop that serves.

    Args:
        forward: the batched model call (runs on the batcher's one worker thread).
        max_batch: images per forward at most.
        max_wait_ms: how long the first queued image waits for more.
        max_queue: requests admitted and unanswered at most; :meth:`submit` raises
            :class:`QueueFull` beyond that.
        on_batch: called with the batch size and the seconds of every forward (metrics).
        on_depth: called with the new number of admitted, unanswered requests (metrics).
    """

    def __init__(
        self,
        forward: ForwardFn,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._on_batch = on_batch or (lambda n, seconds: None)
        self._on_depth = on_depth or (lambda n: None)
        self.depth = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._taken: list[_Item] = []  # out of the queue, not yet answered (the batch being formed or run)

    @property
    def running(self) -> bool:
        """Whether the batching loop is started."""
        return self._task is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decodet-infer")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="decodet-batcher")

    async def stop(self) -> None:
        """Stop the loop; requests still waiting fail with :class:`Stopped`."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        left = list(self._taken)
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for item in left:
            if not item.future.done():
                item.future.set_exception(Stopped("the service is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ requests

    async def submit(self, image: Tensor, size: tuple[int, int], timeout_s: float) -> Answer:
        """Queue one preprocessed image ``[3, H, W]`` (original ``size`` (h, w)); its answer.

        Raises :class:`QueueFull` at once when ``max_queue`` requests are unanswered,
        ``TimeoutError`` after ``timeout_s`` (the image is then dropped if not yet running).
        """
        if self._queue is None or self._task is None:
            raise Stopped("the batcher is not running")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are waiting (limit {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._set_depth(self.depth + 1)
        try:
            self._queue.put_nowait(_Item(image, size, future))
            try:
                return await asyncio.wait_for(future, timeout_s)  # cancels the future on timeout
            except asyncio.TimeoutError:
                raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        finally:
            self._set_depth(self.depth - 1)

    def _set_depth(self, value: int) -> None:
        self.depth = value
        self._on_depth(value)

    # ------------------------------------------------------------------ the loop

    async def _collect(self) -> list[_Item]:
        assert self._queue is not None
        batch = self._taken = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._collect() if not item.future.done()]
            if not batch:  # every caller gave up while waiting
                continue
            try:
                answers = await loop.run_in_executor(self._pool, self._run, batch)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                log.exception("forward pass failed for a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                self._taken = []
                continue
            self._taken = []
            for item, answer in zip(batch, answers):
                if not item.future.done():  # a caller that timed out meanwhile
                    item.future.set_result(answer)

    def _run(self, batch: list[_Item]) -> list[Answer]:
        """Worker thread: one forward pass for ``batch``."""
        start = time.perf_counter()
        n = len(batch)
        images = torch.stack([item.image for item in batch])
        sizes = torch.tensor([item.size for item in batch], dtype=torch.float32)
        boxes, scores, labels = self.forward(images, sizes)
        infer_ms = (time.perf_counter() - start) * 1000.0
        self._on_batch(n, infer_ms / 1000.0)
        return [
            Answer(
                boxes[i].clone(),
                scores[i].clone(),
                labels[i].clone(),
                batch_size=n,
                queue_ms=(start - item.submitted) * 1000.0,
                infer_ms=infer_ms,
            )
            for i, item in enumerate(batch)
        ]
