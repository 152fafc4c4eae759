"""The micro-batcher alone, driven by a stand-in engine: grouping, limits, concurrency, failures, draining."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from yolostream.server.device.batcher import MicroBatcher, ServerBusy
from yolostream.server.ipc.batching import BatcherConfig

KEY = (0, "none", "float32")


@dataclass
class Done:
    size: int
    host: dict
    compute_us: int = 1
    fetch_us: int = 1
    ready: bool = True


@dataclass
class FakeEngine:
    """Echoes each image's first pixel; optional gate makes launches wait, failures raise."""

    gate: threading.Event | None = None
    barrier: threading.Barrier | None = None
    fail_on: int | None = None
    batches: list[list[int]] = field(default_factory=list)

    def launch(self, images, keys):
        values = [int(img.flat[0]) for img in images]
        self.batches.append(values)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        if self.gate is not None:
            assert self.gate.wait(timeout=10)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("device fell over")
        return Done(len(images), {k: np.array(values, dtype=np.float32)[:, None] for k in keys})

    def collect(self, pending):
        return pending


def frame(value: int, shape=(3, 4, 4)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def run(coro):
    return asyncio.run(coro)


def test_frames_are_batched_by_shape_up_to_max_batch_and_each_gets_its_own_row():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, BatcherConfig(max_batch=3, workers=1)).start()

    async def main():
        first = asyncio.ensure_future(batcher.submit(frame(100), [KEY]))
        while not engine.batches:  # the worker holds frame 100 at the gate
            await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(frame(v, (3, 4, 4) if v < 10 else (3, 8, 4)), [KEY]))
                for v in (1, 2, 20, 3, 4, 21)]
        while batcher.queued < 6:
            await asyncio.sleep(0)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(main())
    batcher.close()
    assert engine.batches == [[100], [1, 2, 3], [20, 21], [4]]
    assert [int(r.arrays[0][0]) for r in rest] == [1, 2, 20, 3, 4, 21]
    assert [r.batch_size for r in rest] == [3, 3, 2, 3, 1, 2]
    assert first.batch_size == 1


def test_two_cpu_workers_run_batches_concurrently():
    engine = FakeEngine(barrier=threading.Barrier(2))
    batcher = MicroBatcher(engine, BatcherConfig(max_batch=1, workers=2)).start()

    async def main():
        return await asyncio.gather(*(batcher.submit(frame(v), [KEY]) for v in (1, 2)))

    results = run(main())  # with one worker the barrier would time out and fail both frames
    batcher.close()
    assert sorted(int(r.arrays[0][0]) for r in results) == [1, 2]


def test_a_failed_batch_fails_its_frames_and_the_worker_goes_on():
    engine = FakeEngine(fail_on=13)
    batcher = MicroBatcher(engine, BatcherConfig(max_batch=1, workers=1)).start()

    async def main():
        with pytest.raises(RuntimeError, match="device fell over"):
            await batcher.submit(frame(13), [KEY])
        return await batcher.submit(frame(7), [KEY])

    assert int(run(main()).arrays[0][0]) == 7
    batcher.close()


def test_a_cancelled_frame_leaves_the_queue_and_a_full_queue_pushes_back():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, BatcherConfig(max_batch=1, queue_capacity=2, workers=1)).start()

    async def main():
        busy = asyncio.ensure_future(batcher.submit(frame(0), [KEY]))
        while not engine.batches:
            await asyncio.sleep(0)
        queued = [asyncio.ensure_future(batcher.submit(frame(v), [KEY])) for v in (1, 2)]
        blocked = asyncio.ensure_future(batcher.submit(frame(3), [KEY]))
        while batcher.queued < 2:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert batcher.queued == 2 and not blocked.done()  # capacity 2: the third waits
        queued[0].cancel()
        await asyncio.gather(queued[0], return_exceptions=True)
        while batcher.queued != 2:  # the cancelled frame left, the blocked one took its place
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(busy, queued[1], blocked)

    results = run(main())
    batcher.close()
    assert [int(r.arrays[0][0]) for r in results] == [0, 2, 3]
    assert [b for b in engine.batches] == [[0], [2], [3]]


def test_close_drains_queued_work_and_then_refuses_new_work():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, BatcherConfig(max_batch=1, workers=1)).start()

    async def main():
        futures = [asyncio.ensure_future(batcher.submit(frame(v), [KEY])) for v in (1, 2, 3)]
        while batcher.queued + len(engine.batches) < 3:
            await asyncio.sleep(0)
        closer = asyncio.get_running_loop().run_in_executor(None, batcher.close, True, 10)
        while batcher.accepting:
            await asyncio.sleep(0)
        with pytest.raises(ServerBusy):
            await batcher.submit(frame(9), [KEY])
        gate.set()
        await closer
        return await asyncio.gather(*futures)

    assert [int(r.arrays[0][0]) for r in run(main())] == [1, 2, 3]


def test_config_is_validated():
    with pytest.raises(ValueError, match="workers"):
        BatcherConfig(workers=0).validated()
    with pytest.raises(ValueError, match="queue_capacity"):
        BatcherConfig(max_batch=8, queue_capacity=4).validated()
    assert BatcherConfig.for_device("cuda", 16).workers == 1
    assert BatcherConfig.for_device("cpu", 2).workers == 2 and BatcherConfig.for_device("cpu", 1).workers == 1
