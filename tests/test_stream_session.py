"""StreamSession on its own event loop with a stand-in pipeline: states that are hard to hit over the wire."""

from __future__ import annotations

import asyncio

import pytest

from yolostream.server.frontend.pipeline import Begun, FrameOptions, Reply
from yolostream.server.frontend.service import StreamLimits, StreamSession
from yolostream.v1 import feature_service_pb2 as pb


class GatedPipeline:
    """Frames begin at once (``started`` lists them) and complete once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.withdrawn: list[asyncio.Future] = []
        self.device = self

    async def begin(self, frame: pb.Frame, options: FrameOptions) -> Begun:
        self.started.append(frame.frame_id)
        return Begun(frame, options, None, asyncio.get_running_loop().create_future(), 0)

    async def complete(self, begun: Begun, tracker: object = None) -> Reply:
        await self.gate.wait()
        return Reply(pb.FrameResult(frame_id=begun.frame.frame_id, status=pb.FRAME_STATUS_OK))

    def withdraw(self, computed: asyncio.Future) -> None:
        self.withdrawn.append(computed)
        computed.cancel()


async def _frames(pipeline: GatedPipeline, later: range, sent: list[int], hold: asyncio.Event | None):
    """Frame 0, then (once it is computing) the ``later`` frames back to back; then stay open until ``hold``."""
    sent.append(0)
    yield pb.StreamRequest(frame=pb.Frame(frame_id=0))
    await _until(lambda: pipeline.started == [0])
    for i in later:
        sent.append(i)
        yield pb.StreamRequest(frame=pb.Frame(frame_id=i))
    if hold is not None:
        await hold.wait()


async def _until(predicate, limit: int = 10_000) -> None:
    for _ in range(limit):  # bounded: yields to the loop until the state is reached
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("state not reached")


def _session(pipeline, in_flight: int, realtime: bool) -> StreamSession:
    options = FrameOptions(layers=(), dtype=pb.DTYPE_FLOAT32, pooling="none", policy="auto", imgsz=64)
    return StreamSession(pipeline, options, in_flight, realtime, StreamLimits(), asyncio.Event())


@pytest.mark.parametrize("realtime", [False, True])
def test_a_cancelled_stream_with_a_parked_frame_ends_promptly(realtime):
    async def main():
        pipeline, hold, sent = GatedPipeline(), asyncio.Event(), []
        session = _session(pipeline, in_flight=1, realtime=realtime)

        async def consume():
            async for _ in session.run(_frames(pipeline, range(1, 3), sent, hold)):
                pass

        consumer = asyncio.ensure_future(consume())
        if realtime:  # frame 0 computing, frame 1 dropped, frame 2 parked for the next free slot
            await _until(lambda: session.latest.frame is not None and session.latest.frame.frame_id == 2)
        else:  # frame 0 computing, frame 1 read and waiting for a slot
            await _until(lambda: sent == [0, 1] and pipeline.started == [0])
        consumer.cancel()
        await asyncio.wait_for(asyncio.gather(consumer, return_exceptions=True), timeout=5)
        assert consumer.done() and all(task.done() for task in session.tasks)
        hold.set()

    asyncio.run(main())


def test_realtime_answers_every_frame_in_order_with_the_skipped_ones_dropped():
    async def main():
        pipeline, sent = GatedPipeline(), []
        session = _session(pipeline, in_flight=1, realtime=True)
        consumer = asyncio.ensure_future(_collect(session.run(_frames(pipeline, range(1, 5), sent, None))))
        await _until(lambda: session.reader_done)
        pipeline.gate.set()
        answers = await asyncio.wait_for(consumer, timeout=5)
        return [(r.result.frame_id, r.result.status) for r in answers], pipeline.started

    answers, started = asyncio.run(main())
    assert [a[0] for a in answers] == [0, 1, 2, 3, 4]
    assert answers[0][1] == answers[4][1] == pb.FRAME_STATUS_OK
    assert [a[1] for a in answers[1:4]] == [pb.FRAME_STATUS_DROPPED] * 3
    assert started == [0, 4]


async def _collect(responses):
    """The answers as messages (the session yields OK answers already serialised)."""
    return [pb.StreamResponse.FromString(r) if isinstance(r, bytes) else r async for r in responses]
