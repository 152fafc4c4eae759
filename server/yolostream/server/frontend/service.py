"""The gRPC servicer: stream lifecycle, validation and flow control. The frame work itself is in ``pipeline``.

Flow control: a stream holds at most ``max_in_flight`` frames inside the server, counted from the moment a frame
is read until its answer has been written. When they are all taken the server stops reading that stream, and
HTTP/2 flow control pushes back on the client. In realtime mode the reader keeps reading; it parks only the newest
frame and answers the frames it skips with DROPPED, so every frame is accounted for. Answers always go out in
frame order. A stream's memory is bounded by max_in_flight frames plus a capped backlog of tiny DROPPED answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import grpc

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1.vocab import LETTERBOX_POLICIES, ROLES

from ..ipc.batching import BatcherConfig
from ..ipc.messages import OutputTarget
from ..common.card import ModelCard
from ..common.errors import one_line
from ..common.memfd import spans_end
from .client_shm import ClientRegion, RegionBroker, RegionError, frame_pixels, open_region, output_room, \
    shared_memory_info
from .frames import FrameError, FrameLimits
from .link import CANCEL_WAIT_S, DeviceUnavailable
from .metrics import ServerMetrics
from .objects_wire import default_detection_message
from .pipeline import Begun, FrameOptions, Pipeline, Reply, dropped_result, error_result

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StreamLimits:
    default_in_flight: int = 8
    max_in_flight: int = 64
    #: DROPPED answers a realtime stream may have waiting to be written before its reader pauses.
    drop_backlog: int = 256


class ProtocolError(ValueError):
    """The client broke the stream protocol; the stream ends with INVALID_ARGUMENT."""


@dataclass
class _Entry:
    """One frame's place in the answer order; ``result`` resolves to the StreamResponse to send."""

    result: asyncio.Future
    holds_slot: bool = False


@dataclass
class _Latest:
    """The newest frame of a realtime stream waiting for a slot (at most one)."""

    frame: pb.Frame | None = None
    entry: _Entry | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _SharedRoom:
    """A frame's output room in a region the device shares as ``shared``: the device writes the tensors there
    (``pipeline.OutputRoom``)."""

    region: ClientRegion
    shared: int
    ref: pb.SharedMemoryFrame

    def target(self, sizes: Sequence[int]) -> tuple[OutputTarget, list[tuple[int, int]]]:
        spans = self.region.pack(self.ref, sizes)
        start = self.ref.output_offset
        return OutputTarget(self.shared, start, spans_end(start, spans) - start), spans


class StreamSession:
    """Runs one StreamFeatures call after its config has been validated. ``region``: the client's shared memory,
    when the stream asked for it (frames may read their pixels from it and have their tensors written into it);
    ``shared``: its id at the device when the device writes the tensors into it itself (None: the front-end
    copies them there, ``ClientRegion.place``)."""

    def __init__(self, pipeline: Pipeline, options: FrameOptions, in_flight: int, realtime: bool,
                 limits: StreamLimits, draining: asyncio.Event,
                 observe: Callable[[pb.FrameResult], None] = lambda result: None, *,
                 region: ClientRegion | None = None, shared: int | None = None) -> None:
        self.pipeline = pipeline
        self.region = region
        self.shared = shared
        self.observe = observe
        self.options = options
        self.in_flight = in_flight
        self.realtime = realtime
        self.limits = limits
        self.draining = draining
        self.slots = asyncio.Semaphore(in_flight)
        self.order: deque[_Entry] = deque()
        self.changed = asyncio.Condition()
        self.latest = _Latest()
        self.reader_done = False
        self.reading = False
        self.error: str | None = None
        self.tasks: set[asyncio.Task] = set()
        # The stream's tracking state: created with the session and freed with it, however the stream ends.
        self.tracker = options.tracking.tracker() if options.tracking is not None else None

    async def run(self, requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[pb.StreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        dispatcher = asyncio.create_task(self._dispatch_latest()) if self.realtime else None
        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(self._writer_has_work)
                    if not self.order:
                        break
                    entry = self.order[0]
                response = await self._response(await entry.result)
                yield response
                async with self.changed:
                    self.order.popleft()
                    self.changed.notify_all()
                if entry.holds_slot:
                    self.slots.release()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()
        finally:
            pending = [reader, *([dispatcher] if dispatcher is not None else []), *self.tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            # Frames already at the device are withdrawn, and waited for (bounded), so a closed stream holds
            # nothing there.
            withdrawn = []
            for entry in self.order:
                if not entry.result.done():
                    entry.result.cancel()
                elif not entry.result.cancelled() and entry.result.exception() is None \
                        and isinstance(entry.result.result(), Begun):
                    computed = entry.result.result().computed
                    self.pipeline.device.withdraw(computed)
                    withdrawn.append(computed)
            if withdrawn:
                await asyncio.wait(withdrawn, timeout=CANCEL_WAIT_S)

    async def _response(self, item: "Begun | pb.StreamResponse") -> "pb.StreamResponse | bytes":
        """The answer to write for an entry: ready already, or a begun frame's features, serialised straight from
        shared memory (the servicer passes bytes through; see ``add_to_server``)."""
        if not isinstance(item, Begun):
            self.observe(item.result)
            return item
        try:
            reply = await self.pipeline.complete(item, self.tracker)
            if self.region is not None and item.spans is None:  # the device did not write them there itself
                reply = self.region.place(reply, item.frame)
        except (asyncio.CancelledError, DeviceUnavailable):
            raise
        except Exception as err:  # defensive: one frame's bug must not take down its stream
            log.exception("frame %d failed", item.frame.frame_id)
            reply = Reply(error_result(item.frame, f"internal error: {type(err).__name__}: {err}"))
        self.observe(reply.result)
        return reply.serialize(in_stream_response=True)

    def _writer_has_work(self) -> bool:
        """Answers to write, or the end: the reader finished, or the server drains and no frame is half-read."""
        return bool(self.order) or self.reader_done or (self.draining.is_set() and not self.reading)

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _read(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        try:
            async for request in requests:
                self.reading = True
                kind = request.WhichOneof("payload")
                if self.draining.is_set():
                    if kind == "frame":
                        done = asyncio.get_running_loop().create_future()
                        response = pb.StreamResponse()
                        error_result(request.frame, "server is shutting down: frame not accepted", response.result)
                        done.set_result(response)
                        await self._append(_Entry(done))
                    break
                if kind == "config":
                    raise ProtocolError("a stream takes exactly one StreamConfig, as its first message; "
                                        "got a second one")
                if kind != "frame":
                    raise ProtocolError("empty StreamRequest: set 'frame' (or 'config' as the first message)")
                if self.realtime:
                    await self._park_latest(request.frame)
                else:
                    await self.slots.acquire()
                    entry = _Entry(asyncio.get_running_loop().create_future(), holds_slot=True)
                    await self._append(entry)
                    await self._start(request.frame, entry)
                self.reading = False
        except ProtocolError as err:
            self.error = str(err)
        finally:
            # A parked realtime frame is already in ``order``: the writer cannot finish before the dispatcher has
            # run it, so the reader need not (and, once cancelled, must not) wait for that here.
            self.reading = False
            async with self.changed:
                self.reader_done = True
                self.changed.notify_all()

    async def _append(self, entry: _Entry) -> None:
        async with self.changed:
            self.order.append(entry)
            self.changed.notify_all()

    async def _park_latest(self, frame: pb.Frame) -> None:
        async with self.changed:
            await self.changed.wait_for(
                lambda: len(self.order) < self.in_flight + self.limits.drop_backlog)
        entry = _Entry(asyncio.get_running_loop().create_future())
        previous = self.latest.entry, self.latest.frame
        self.latest.frame, self.latest.entry = frame, entry
        if previous[0] is not None:
            response = pb.StreamResponse()
            dropped_result(previous[1], response.result)
            previous[0].result.set_result(response)
        await self._append(entry)
        self.latest.ready.set()

    async def _dispatch_latest(self) -> None:
        while True:
            await self.slots.acquire()
            await self.latest.ready.wait()
            frame, entry = self.latest.frame, self.latest.entry
            self.latest.frame = self.latest.entry = None
            self.latest.ready.clear()
            entry.holds_slot = True
            await self._start(frame, entry)
            async with self.changed:
                self.changed.notify_all()

    async def _start(self, frame: pb.Frame, entry: _Entry) -> None:
        """Send the frame on its way. A raw frame is letterboxed and handed to the device right here, with no
        task of its own; an encoded one gets a task, so that the decode pool works on several frames at once."""
        if frame.WhichOneof("data") == "encoded":
            task = asyncio.create_task(self._begin(frame, entry))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            await self._begin(frame, entry)

    def _room(self, ref: pb.SharedMemoryFrame) -> _SharedRoom | None:
        """Where the device writes a frame's tensors itself: its output room, when the stream's region is shared
        with the device and the frame has one (``frame_pixels`` checked that it lies in the region)."""
        if self.shared is None or not ref.output_length:
            return None
        return _SharedRoom(self.region, self.shared, ref)

    async def _begin(self, frame: pb.Frame, entry: _Entry) -> None:
        try:
            if frame.HasField("shared_memory"):
                item = await self.pipeline.begin(frame, self.options,
                                                 frame_pixels(frame, self.region, self.pipeline.limits),
                                                 self._room(frame.shared_memory))
            else:
                item = await self.pipeline.begin(frame, self.options)
        except asyncio.CancelledError:
            raise
        except FrameError as err:  # shared memory the frame names but cannot use
            item = error_result(frame, str(err))
        except DeviceUnavailable as err:  # the whole stream ends with UNAVAILABLE (the writer re-raises this)
            if not entry.result.done():
                entry.result.set_exception(err)
            return
        except Exception as err:  # defensive: one frame's bug must not take down its stream
            log.exception("frame %d failed", frame.frame_id)
            item = error_result(frame, f"internal error: {type(err).__name__}: {err}")
        if isinstance(item, pb.FrameResult):
            item = pb.StreamResponse(result=item)
        if entry.result.done():  # the stream ended meanwhile
            if isinstance(item, Begun):
                self.pipeline.device.withdraw(item.computed)
            return
        entry.result.set_result(item)


class FeatureService(pb_grpc.FeatureServiceServicer):
    """Thin servicer: validates, then hands frames to the pipeline."""

    def __init__(self, pipeline: Pipeline, model_info: pb.ModelInfo, limits: StreamLimits | None = None,
                 metrics: ServerMetrics | None = None, regions: RegionBroker | None = None) -> None:
        self.pipeline = pipeline
        self.regions = regions
        self.model_info = model_info
        self.limits = limits or StreamLimits()
        self.metrics = metrics
        self.draining = asyncio.Event()
        self.active_streams = 0
        self._streams_changed = threading.Condition()
        self._sessions: set[StreamSession] = set()
        self.active_calls = 0
        #: Called (on the loop) whenever an Extract or StreamFeatures call ends: the front-end trims its heap.
        self.on_call_end: Callable[[], None] = lambda: None
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until no Extract or StreamFeatures call is running (health and reflection calls do not count)."""
        await self._idle.wait()

    def _call(self, delta: int) -> None:
        self.active_calls += delta
        if self.active_calls:
            self._idle.clear()
        else:
            self._idle.set()
        if delta < 0:
            self.on_call_end()

    async def drain(self) -> None:
        """Stop taking frames: every stream answers what it accepted, then ends with UNAVAILABLE."""
        self.draining.set()
        for session in list(self._sessions):
            await session.wake()

    def wait_streams(self, count: int, timeout: float) -> bool:
        """Block (from another thread) until exactly ``count`` streams are open; False on timeout."""
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: self.active_streams == count, timeout)

    def _count_stream(self, delta: int) -> None:
        with self._streams_changed:
            self.active_streams += delta
            self._streams_changed.notify_all()
        if self.metrics:
            self.metrics.streams.inc(delta)

    async def StreamFeatures(self, request_iterator, context: grpc.aio.ServicerContext):
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("payload") != "config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message of a stream must be a StreamConfig; got "
                                + (first.WhichOneof("payload") or "an empty message"))
        config = first.config
        try:
            options = self.pipeline.stream_options(config)
            in_flight = self._in_flight(config.max_in_flight)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(str(err), 1000))
        except ImportError as err:  # the codec asked for needs a package this server lacks (wire.CodecMissingError)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"StreamConfig.compression {pb.Compression.Name(config.compression)} is not available "
                                f"on this server: {one_line(str(err), 300)}; ask for no compression")
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        region = shared = None
        if config.HasField("shared_memory"):
            try:
                region = await open_region(self.regions, config, output_room(self.pipeline, options), context)
            except RegionError as err:
                await context.abort(err.code, err.message)
            try:
                shared = await self._share(region, options)
            except BaseException:  # cancelled while the device maps it: nothing of the stream may stay mapped
                region.close()
                raise
        session = StreamSession(self.pipeline, options, in_flight, config.realtime, self.limits, self.draining,
                                *([self.metrics.observe] if self.metrics else []), region=region, shared=shared)
        self._count_stream(+1)
        self._call(+1)
        self._sessions.add(session)
        responses = session.run(requests)
        try:
            try:
                async for response in responses:
                    yield response
            except DeviceUnavailable as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{err}: the server cannot compute features now")
            finally:
                # Close the session now, not when the event loop gets round to finalising it: a stream that has
                # ended (the client went away mid-yield) must hold nothing at the device once it is counted out.
                await responses.aclose()
                self._sessions.discard(session)
            if session.error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(session.error, 1000))
            if self.draining.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "server is shutting down: every frame it accepted has been answered")
        finally:
            self._call(-1)
            self._count_stream(-1)
            if shared is not None:  # however the stream ended: the device unmaps the client's region
                self.pipeline.device.release_region(shared)
            if region is not None:  # and so does this front-end, now
                region.close()

    async def _share(self, region: ClientRegion, options: FrameOptions) -> int | None:
        """Share a stream's region with the device, which then writes the stream's tensors into it itself; its id
        there, or None when the front-end copies them (8-bit codes, whose scales and offsets go in the message;
        this front-end shares as many regions as the device takes; or the device could not map it). The region's
        descriptor is closed either way: the device holds its own."""
        try:
            if options.dtype == pb.DTYPE_UINT8_AFFINE:
                return None
            return await self.pipeline.device.share_region(region.fd, region.size)
        finally:
            region.close_descriptor()

    def _in_flight(self, requested: int) -> int:
        if requested == 0:
            return self.limits.default_in_flight
        if requested > self.limits.max_in_flight:
            raise ValueError(f"max_in_flight {requested} is over the server limit: choose 1..{self.limits.max_in_flight}"
                             f" (or 0 for the default {self.limits.default_in_flight})")
        return int(requested)

    async def Extract(self, request: pb.ExtractRequest, context: grpc.aio.ServicerContext) -> pb.FrameResult:
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            options = self.pipeline.options(request.options)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(str(err), 1000))
        self._call(+1)
        try:
            result = await self.pipeline.process(request.frame, options)
        except DeviceUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{err}: the server cannot compute features now")
        finally:
            self._call(-1)
        if self.metrics:
            self.metrics.observe(result)
        return result

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.model_info


def _serialize(message: Any) -> bytes:
    """Pre-serialised replies (bytes) go out as they are; messages are serialised as usual."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: FeatureService, server: Any) -> None:
    """Register the feature service like the generated ``add_FeatureServiceServicer_to_server``, except that
    ``StreamFeatures`` may yield already-serialised StreamResponse bytes (one copy of each tensor, not three)."""
    handlers = {
        "StreamFeatures": grpc.stream_stream_rpc_method_handler(
            service.StreamFeatures, request_deserializer=pb.StreamRequest.FromString, response_serializer=_serialize),
        "Extract": grpc.unary_unary_rpc_method_handler(
            service.Extract, request_deserializer=pb.ExtractRequest.FromString,
            response_serializer=pb.FrameResult.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def model_info(card: ModelCard, batching: BatcherConfig, stream_limits: StreamLimits, limits: FrameLimits,
               max_message_bytes: int, regions: RegionBroker | None = None) -> pb.ModelInfo:
    """Everything a client needs to choose layers and size its buffers, built once at start-up from the card.
    ``regions``: the front-end's shared-memory broker, None when the server does not map clients' regions."""
    layers = [
        pb.LayerInfo(index=row.index, type=row.type, inputs=list(row.source), params=row.params,
                     role=ROLES[row.role], out_channels=row.out_channels, stride=row.stride,
                     output_shape=list(row.shape), aliases=list(row.aliases))
        for row in card.catalogue
    ]
    return pb.ModelInfo(
        model_name=card.name,
        source=card.source,
        random_weights=card.random_weights,
        device=card.device,
        dtype=card.dtype,
        default_letterbox=LETTERBOX_POLICIES[card.letterbox],
        default_imgsz=card.imgsz,
        stride=card.stride,
        layers=layers,
        batching=pb.BatchingInfo(max_batch=batching.max_batch, max_delay_ms=batching.max_delay_ms,
                                 max_in_flight=stream_limits.default_in_flight,
                                 queue_capacity=batching.queue_capacity, workers=batching.workers),
        limits=pb.Limits(max_pixels=limits.max_pixels, max_frame_bytes=limits.max_frame_bytes,
                         max_message_bytes=max_message_bytes, max_boxes=limits.max_boxes),
        num_classes=card.num_classes,
        class_names=list(card.class_names),
        default_detection=default_detection_message(),
        default_object_feature_dim=sum(card.channels(layer.index) for layer in card.default_object_layers()),
        backend=card.backend,
        startup_check=card.startup_check,
        shared_memory=shared_memory_info(regions),
    )
