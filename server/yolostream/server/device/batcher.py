"""Micro-batching across every connected stream: worker threads over one queue, greedy batches.

Each worker (one on a GPU, two on a CPU: ``BatcherConfig.for_device``) takes whatever is queued when it frees up
(up to ``max_batch``), optionally waiting ``max_delay_ms`` for more. A batch holds frames of one input shape only
(letterboxed frames of different aspect ratios cannot be stacked) and runs to the deepest layer any of its frames asked for; each frame gets back only its own layers,
pooled and cast as its stream asked. The module knows nothing of torch or gRPC: it drives a runner through
``launch`` and ``collect`` and hands each batch's results to the sinks of its frames (asyncio futures, or the
device process's link to a front-end), so it can be tested with a stand-in runner.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..ipc.batching import BatcherConfig
from ..ipc.messages import OutputKey

log = logging.getLogger(__name__)


class PendingLike(Protocol):
    size: int
    host: dict | None
    compute_us: int
    fetch_us: int

    @property
    def ready(self) -> bool: ...


class BatchEngine(Protocol):
    """What the batcher needs from an engine: start a batch, and wait for one."""

    def launch(self, images: Sequence[np.ndarray], keys: Sequence[OutputKey]) -> PendingLike:
        """Start a batch. When any frame carries an ``objects`` job, the batcher also passes ``objects=``, one job
        (or None) per frame, and reads ``pending.objects`` (one result or None per frame) once collected."""

    def collect(self, pending: PendingLike) -> PendingLike: ...


class ResultSink(Protocol):
    """Where a batch's results go: called once per batch with that sink's frames, on a device worker thread."""

    def deliver(self, results: list[tuple["WorkItem", "BatchResult | BaseException"]]) -> None: ...


@dataclass(eq=False)
class WorkItem:
    """One preprocessed frame waiting for the device (compared by identity). ``tag`` is the sink's own handle;
    ``objects`` the frame's detection/object-vector job (``object_request.ObjectJob``), if any."""

    image: np.ndarray
    outputs: tuple[OutputKey, ...]
    sink: ResultSink
    tag: Any = None
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    objects: Any = None


@dataclass
class BatchResult:
    """One frame's outputs, in the order its ``outputs`` were requested, plus how it was computed."""

    arrays: list[np.ndarray]
    batch_size: int
    queued_us: int
    compute_us: int
    fetch_us: int
    objects: Any = None


class _FutureSink:
    """Delivers to asyncio futures on their own event loops (``MicroBatcher.submit``)."""

    def deliver(self, results: list[tuple[WorkItem, BatchResult | BaseException]]) -> None:
        for item, outcome in results:
            loop, future = item.tag
            setter = _fail if isinstance(outcome, BaseException) else _succeed
            try:
                loop.call_soon_threadsafe(setter, future, outcome)
            except RuntimeError:  # that loop is closed: nobody is left to tell
                pass


_FUTURES = _FutureSink()


class ServerBusy(RuntimeError):
    """The batcher is draining or stopped and takes no new work."""


class MicroBatcher:
    """Owns the device worker thread(s). The device host ``put``s frames whose results go to a sink; ``submit``
    queues one frame from an event loop and awaits its result (with back-pressure on the queue's capacity)."""

    def __init__(self, engine: BatchEngine, config: BatcherConfig | None = None) -> None:
        self.engine = engine
        self.config = (config or BatcherConfig()).validated()
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._space_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.batches_run = 0
        self.frames_run = 0
        self._counts = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> "MicroBatcher":
        """Start the device worker thread(s)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._work, name=f"yolostream-device-{k}", daemon=True)
                             for k in range(self.config.workers)]
            for thread in self._threads:
                thread.start()
        return self

    @property
    def accepting(self) -> bool:
        with self._cond:
            return self._accepting

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def put(self, item: WorkItem) -> None:
        """Queue one frame whose result goes to ``item.sink``; ServerBusy once closing.

        Takes no capacity into account: the device process's callers (front-ends) bound what they have in flight.
        """
        with self._cond:
            if not self._accepting:
                raise ServerBusy("server is shutting down")
            self._queue.append(item)
            self._cond.notify_all()

    def cancel(self, item: WorkItem) -> bool:
        """Take ``item`` out of the queue; False when it is already running (its result will be delivered)."""
        with self._cond:
            item.cancelled = True
            if item in self._queue:
                self._queue.remove(item)
                self._wake_submitters()
                return True
            return False

    async def submit(self, image: np.ndarray, outputs: Sequence[OutputKey]) -> BatchResult:
        """Queue one frame and wait for its outputs. Waits while the shared queue is full (back-pressure)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        item = WorkItem(image, tuple(outputs), _FUTURES, (loop, future))
        while True:
            with self._cond:
                if not self._accepting:
                    raise ServerBusy("server is shutting down")
                if len(self._queue) < self.config.queue_capacity:
                    self._queue.append(item)
                    self._cond.notify_all()
                    break
                space: asyncio.Future = loop.create_future()
                self._space_waiters.append((loop, space))
            await space
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel(item)
            raise

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with ``drain`` finish what is queued first. Blocks until the worker exits."""
        with self._cond:
            self._accepting = False
            self._wake_submitters()
            if not drain:
                _deliver_each([(item, ServerBusy("server stopped")) for item in self._queue])
                self._queue.clear()
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False
            self._wake_submitters()

    def _work(self) -> None:
        """Take, launch, deliver. With an asynchronous engine (CUDA) batch k+1 is prepared and launched before
        waiting for batch k, so the device never idles while Python stacks frames; a synchronous engine (CPU)
        has finished at launch and its frames are delivered at once."""
        in_flight: tuple[list[WorkItem], PendingLike, float] | None = None
        while True:
            batch = self._take(block=in_flight is None)
            if batch is None:
                return
            launched = self._launch(batch) if batch else None
            if in_flight is not None:
                self._finish(*in_flight)
                in_flight = None
            if launched is not None:
                if launched[1].ready:
                    self._finish(*launched)
                else:
                    in_flight = launched

    def _take(self, block: bool = True) -> list[WorkItem] | None:
        """The next batch; [] when nothing is queued and ``block`` is off; None once stopped and drained."""
        cfg = self.config
        with self._cond:
            while True:
                self._discard_cancelled()
                if self._queue:
                    break
                if not block:
                    return []
                if self._stop:
                    return None
                self._cond.wait()
            shape = self._queue[0].image.shape
            # Wait for more frames only when the device is idle: with a batch in flight, frames accumulate while
            # it runs, and waiting would delay delivering that batch's results.
            if cfg.max_delay_ms > 0 and not self._stop and block:
                deadline = time.perf_counter() + cfg.max_delay_ms / 1000
                while self._count(shape) < cfg.max_batch and not self._stop:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._discard_cancelled()
                if not self._queue:
                    return []
                shape = self._queue[0].image.shape
            batch, rest = [], deque()
            while self._queue:
                item = self._queue.popleft()
                if len(batch) < cfg.max_batch and item.image.shape == shape:
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue = rest
            self._wake_submitters()
            return batch

    def _wake_submitters(self) -> None:
        """Called with the lock held whenever the queue shrinks: blocked ``submit`` calls retry."""
        waiters, self._space_waiters = self._space_waiters, []
        for loop, space in waiters:
            try:
                loop.call_soon_threadsafe(_succeed, space, None)
            except RuntimeError:  # that submitter's loop is closed
                pass

    def _count(self, shape: tuple[int, ...]) -> int:
        return sum(1 for item in self._queue if item.image.shape == shape)

    def _discard_cancelled(self) -> None:
        """Frames whose stream went away are dropped before they cost device time."""
        if any(item.cancelled for item in self._queue):
            self._queue = deque(item for item in self._queue if not item.cancelled)
            self._wake_submitters()
            self._cond.notify_all()

    def _launch(self, batch: list[WorkItem]) -> tuple[list[WorkItem], PendingLike, float] | None:
        batch = [item for item in batch if not item.cancelled]
        if not batch:
            return None
        start = time.perf_counter()
        keys = sorted({key for item in batch for key in item.outputs})
        images = [item.image for item in batch]
        try:
            if any(item.objects is not None for item in batch):
                return batch, self.engine.launch(images, keys, objects=[item.objects for item in batch]), start
            return batch, self.engine.launch(images, keys), start
        except Exception as err:  # a failed batch fails its frames, never the worker
            self._fail_all(batch, err)
            return None

    def _finish(self, batch: list[WorkItem], pending: PendingLike, start: float) -> None:
        try:
            self._deliver(batch, self.engine.collect(pending), start)
        except Exception as err:  # a failed batch fails its frames, never the worker
            self._fail_all(batch, err)

    def _deliver(self, batch: list[WorkItem], done: PendingLike, start: float) -> None:
        n = len(batch)
        with self._counts:
            self.batches_run += 1
            self.frames_run += n
        fetch_us = done.fetch_us // n
        objects = getattr(done, "objects", None) or [None] * n
        _deliver_each([
            (item, BatchResult(arrays=[done.host[key][row] for key in item.outputs], batch_size=n,
                               queued_us=int((start - item.enqueued) * 1e6), compute_us=done.compute_us,
                               fetch_us=fetch_us, objects=objects[row]))
            for row, item in enumerate(batch)])

    @staticmethod
    def _fail_all(batch: list[WorkItem], err: BaseException) -> None:
        log.error("batch of %d failed: %s: %s", len(batch), type(err).__name__, err)
        _deliver_each([(item, err) for item in batch])


def _deliver_each(results: list[tuple[WorkItem, BatchResult | BaseException]]) -> None:
    """Hand each sink its own frames of a batch in one call (a front-end gets one message per batch)."""
    by_sink: dict[int, tuple[ResultSink, list]] = {}
    for item, outcome in results:
        by_sink.setdefault(id(item.sink), (item.sink, []))[1].append((item, outcome))
    for sink, members in by_sink.values():
        try:
            sink.deliver(members)
        except Exception:  # one sink's failure (e.g. its front-end went away) must not stop the worker
            log.exception("delivering %d result(s) failed", len(members))


def _succeed(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
