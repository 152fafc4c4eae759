"""One frame's trip through a front-end, shared by the unary and the streaming RPCs.

decode (thread pool for JPEG/PNG) → letterbox to uint8 → device link (shared memory) → pooled, cast (or 8-bit
coded) outputs → Tensor messages, plus the frame's boxes, scores, classes and object vectors when its stream asks for
detections or the frame carries boxes of its own. A stream that asked for compression gets each tensor's bytes
compressed here (``compression.compress_tensor``), whenever that makes them smaller.
Option validation lives here too: a bad option is a ValueError whose text names the problem and the valid
choices, which the service turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire
from yolostream.v1.vocab import DTYPES, LETTERBOX_POLICIES, POOLINGS, names_of

from ..common.card import ModelCard, ResolvedLayer
from ..common.errors import one_line
from ..common import affine
from ..common.object_request import CODED, ObjectJob, ObjectRequest, client_boxes
from ..common.preprocess import MAX_IMGSZ, Letterbox, apply_letterbox, input_shape, letterbox_geometry
from ..ipc.messages import OutputKey, OutputTarget
from . import compression
from .frames import FrameError, FrameLimits, decode_frame
from .link import DeviceFrameError, DeviceLink, FrameTooLarge, layout_bytes, output_layout
from .objects_wire import object_request
from .tracker import Tracker
from .tracking import TRACKING_VECTORS, StreamTracking, track_frame, tracking_options

_DTYPES = names_of(DTYPES)
_POOLINGS = names_of(POOLINGS)
_POLICIES = names_of(LETTERBOX_POLICIES)
#: StreamConfig.compression values a stream may ask for (unspecified means none).
_CODECS = {pb.COMPRESSION_NONE: "none", **{codec: pb.Compression.Name(codec) for codec in compression.SUPPORTED}}
#: Replies whose tensors hold fewer bytes than this are compressed on the event loop: shuffle+zstd-1 takes about
#: 0.1 ms for 64 KiB, no more than the hop to a pool thread and back; larger ones (a 480x640 yolov5n P3-P5 reply is
#: 0.5 MB as codes, 2.1 MB as float32: 0.7 to 3 ms) go to the decode pool, as zstd releases the GIL.
INLINE_COMPRESS_BYTES = 64 * 1024


@dataclass(frozen=True)
class FrameOptions:
    """Validated per-stream (or per-call) options."""

    layers: tuple[ResolvedLayer, ...]
    dtype: int
    pooling: str
    policy: str
    imgsz: int
    objects: ObjectRequest = ObjectRequest(None, None)
    #: StreamConfig.compression (streams only; unspecified or none: plain bytes).
    compression: int = pb.COMPRESSION_UNSPECIFIED
    #: StreamConfig.tracking (streams only), validated; None when off.
    tracking: StreamTracking | None = None
    #: Whether the object vectors go into the reply (False when only the tracker asked for them).
    send_vectors: bool = True

    @property
    def output_keys(self) -> tuple[OutputKey, ...]:
        return tuple((layer.index, self.pooling, _DTYPES[self.dtype]) for layer in self.layers)


def _enum(value: int, table: dict[int, str], enum, field: str, default: int) -> int:
    if value == 0:
        return default
    if value not in table:
        choices = ", ".join(enum.Name(v) for v in table)
        raise ValueError(f"invalid {field} {value}: choose {choices} (or leave it unset for the server default)")
    return value


class OutputRoom(Protocol):
    """A frame's output room in a client's region that the device shares (``service``): the device writes the
    frame's tensors there itself."""

    def target(self, sizes: Sequence[int]) -> tuple[OutputTarget, list[tuple[int, int]]]:
        """Where tensors of ``sizes`` bytes go: the device's ``OutputTarget`` and each tensor's (offset, length) in
        the region; FrameError when they do not fit."""


class Pipeline:
    """Validates options and runs frames: decodes and letterboxes here, computes through the device link.

    Args:
        card: the served model.
        device: this front-end's link to the device process.
        limits: per-frame size limits.
        default_layers: what a request that names no layers gets.
        max_imgsz: largest imgsz a request may ask for.
        decode_threads: threads decoding JPEG/PNG (OpenCV releases the GIL there).
        max_reply_bytes: largest reply a frame may produce (the gRPC message limit less an envelope).
    """

    def __init__(
        self,
        card: ModelCard,
        device: DeviceLink,
        limits: FrameLimits,
        *,
        default_layers: tuple[str, ...] = ("backbone",),
        max_imgsz: int = MAX_IMGSZ,
        decode_threads: int = 4,
        max_reply_bytes: int = 128 * 1024 * 1024 - 64 * 1024,
    ) -> None:
        self.card = card
        self.device = device
        self.max_reply_bytes = max_reply_bytes
        self.limits = limits
        self.default_layers = default_layers
        self.max_imgsz = max_imgsz
        self.decode_threads = decode_threads
        self.decode_pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.decode_pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="yolostream-decode")

    def close(self) -> None:
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True, cancel_futures=True)

    def options(self, msg: pb.FeatureOptions) -> FrameOptions:
        """Validate a FeatureOptions message; ValueError names the problem and the valid choices."""
        layers = tuple(self.card.resolve(list(msg.layers) or list(self.default_layers)))
        dtype = _enum(msg.dtype, _DTYPES, pb.Dtype, "dtype", pb.DTYPE_FLOAT32)
        pooling = _POOLINGS[_enum(msg.pooling, _POOLINGS, pb.Pooling, "pooling", pb.POOLING_NONE)]
        policy_enum = _enum(msg.letterbox, _POLICIES, pb.LetterboxPolicy, "letterbox policy",
                            LETTERBOX_POLICIES[self.card.letterbox])
        imgsz = int(msg.imgsz) or self.card.imgsz
        if not 32 <= imgsz <= self.max_imgsz:
            raise ValueError(f"imgsz {imgsz} is out of range: choose 32..{self.max_imgsz} (or 0 for the server "
                             f"default {self.card.imgsz})")
        objects = object_request(msg, self.card)
        if objects.detection is not None:
            worst = objects.layout(None).nbytes
            if worst > self.max_reply_bytes:
                raise ValueError(f"detection max_det {objects.detection.max_det} with {objects.dim}-value object "
                                 f"vectors could make replies of {worst:,} bytes, over the server's message limit of "
                                 f"{self.max_reply_bytes:,}: lower max_det, roi_size or flatten, or use float16 or "
                                 "uint8")
        return FrameOptions(layers, dtype, pooling, _POLICIES[policy_enum], imgsz, objects)

    def stream_options(self, config: pb.StreamConfig) -> FrameOptions:
        """Validate a StreamConfig's options and its ``compression``.

        Raises ValueError (INVALID_ARGUMENT) naming the problem and the valid choices, and
        ``wire.CodecMissingError`` (an ImportError) when the codec asked for needs a package this server lacks.
        """
        codec = _enum(config.compression, _CODECS, pb.Compression, "compression", pb.COMPRESSION_UNSPECIFIED)
        compression.check_codec(codec)
        tracking = tracking_options(config.tracking)
        asked, chosen = config.options, config.options.object_features
        default_vectors = chosen.mode == pb.OBJECT_FEATURE_MODE_UNSPECIFIED and not chosen.layers
        if tracking is not None and (default_vectors or chosen.mode == pb.OBJECT_FEATURE_MODE_NONE):
            # A tracked stream's default vectors are the tracker's (sent as its object features); a stream that
            # asked for none gets them computed for the tracker alone.
            asked = pb.FeatureOptions()
            asked.CopyFrom(config.options)
            asked.object_features.CopyFrom(pb.ObjectFeatureOptions(
                mode=pb.OBJECT_FEATURE_MODE_ANCHOR, layers=list(TRACKING_VECTORS), normalize=True,
                dtype=chosen.dtype))
        return replace(self.options(asked), compression=codec, tracking=tracking,
                       send_vectors=chosen.mode != pb.OBJECT_FEATURE_MODE_NONE)

    def output_shapes(self, options: FrameOptions, input_hw: tuple[int, int]) -> list[tuple[int, ...]]:
        """Shape of each requested output (without the batch dim) for a model input of ``input_hw``."""
        h, w = input_hw
        shapes = []
        for layer in options.layers:
            channels = self.card.channels(layer.index)
            if options.pooling != "none":
                shapes.append((channels,))
            else:
                shapes.append((channels, -(-h // layer.stride), -(-w // layer.stride)))
        return shapes

    @staticmethod
    def reply_bytes(options: FrameOptions, shapes: list[tuple[int, ...]]) -> int:
        """Tensor bytes of one frame's reply with outputs of ``shapes`` (the envelope is a few hundred more): for
        8-bit codes, the codes and their float32 scales and offsets."""
        return layout_bytes(output_layout(options.output_keys, shapes))

    async def begin(self, frame: pb.Frame, options: FrameOptions, pixels: np.ndarray | None = None,
                    room: OutputRoom | None = None) -> "Begun | pb.FrameResult":
        """Decode, letterbox straight into a shared-memory slot and send the frame to the device, without waiting
        for its features: a ``Begun`` to ``complete``, or an ERROR result for a bad frame. Never raises for bad
        input (DeviceUnavailable when the device is gone). ``pixels``: the frame's BGR image when it is already in
        memory (a client's shared-memory region, checked by ``client_shm``), letterboxed from there. ``room``:
        where in a client's region the device is to write the frame's tensors (checked here, before the frame
        goes), for a reply that carries their offsets only."""
        start = time.perf_counter()
        try:
            if pixels is not None:
                image = pixels
            elif frame.WhichOneof("data") == "encoded":
                loop = asyncio.get_running_loop()
                image = await loop.run_in_executor(self.decode_pool, decode_frame, frame, self.limits)
            else:  # raw pixels need no decoding: a thread hop would cost more than it saves
                image = decode_frame(frame, self.limits)
            letterbox = letterbox_geometry(image.shape[:2], input_shape(options.imgsz, self.card.stride),
                                           self.card.stride, auto=options.policy == "auto")
        except FrameError as err:
            return error_result(frame, str(err))
        except Exception as err:  # e.g. an OpenCV assertion on a degenerate frame: that frame fails, nothing else
            return _unpreparable(frame, err)
        try:
            job, box_ids = self.object_job(frame, options.objects, image.shape[:2])
            box_scores = wire.frame_box_scores(frame, len(job.boxes)) if job is not None and job.boxes is not None \
                else None
        except ValueError as err:
            return error_result(frame, f"bad boxes: {err}")
        shapes = self.output_shapes(options, letterbox.out_hw)
        reply = self.reply_bytes(options, shapes) + (job.layout.nbytes if job is not None else 0)
        if reply > self.max_reply_bytes:
            return error_result(frame, f"the reply would be {reply:,} bytes, over the server's message limit of "
                                       f"{self.max_reply_bytes:,}: ask for fewer or deeper layers, pooling, float16, "
                                       f"a smaller imgsz, or fewer boxes or object vector values")
        target = spans = None
        if room is not None:
            try:
                target, spans = room.target([math.prod(shape) * dtype.itemsize
                                             for shape, dtype in output_layout(options.output_keys, shapes)])
            except FrameError as err:
                return error_result(frame, str(err))
        decoded = time.perf_counter()
        try:
            slot = await self.device.reserve((*letterbox.out_hw, 3), options.output_keys, shapes,
                                             job.layout if job is not None else None, target)
        except FrameTooLarge as err:
            return error_result(frame, str(err))
        waited = time.perf_counter()
        try:
            apply_letterbox(image, letterbox, out=slot.input)  # straight into shared memory: no further copy
        except Exception as err:  # e.g. an OpenCV assertion on a degenerate frame: that frame fails, nothing else
            self.device.unreserve(slot)
            return _unpreparable(frame, err)
        preprocess_us = int((decoded - start + time.perf_counter() - waited) * 1e6)
        # The Begun lives until its reply is written: keep the frame's header, not its pixels, or a client that
        # never reads its replies keeps max_in_flight request messages alive (2.7 MB each for raw 720p).
        return Begun(_header(frame), options, letterbox, self.device.submit(slot, job), preprocess_us, job, box_ids,
                     shapes, box_scores, spans)

    def object_job(self, frame: pb.Frame, request: ObjectRequest,
                   orig_hw: tuple[int, int]) -> tuple[ObjectJob | None, np.ndarray | None]:
        """The frame's box work, and the box ids to echo: its own boxes (checked and clipped to the frame) get
        vectors; without boxes it is detected when the stream asks for detections, else it has no box work.
        ValueError (the frame fails) for malformed boxes or ids, NaN, empty boxes or too many."""
        own = len(frame.boxes) > 0 or len(frame.box_ids) > 0
        if not own and request.detection is None:
            return None, None
        boxes, ids = None, None
        if own:
            values, ids = wire.frame_boxes(frame)
            boxes = client_boxes(values, orig_hw, self.limits.max_boxes)
        layout = request.layout(None if boxes is None else len(boxes))
        return ObjectJob(request, tuple(orig_hw), boxes, layout), ids

    async def complete(self, begun: "Begun", tracker: Tracker | None = None) -> "Reply":
        """Wait for a begun frame's features: an OK ``Reply`` whose tensor bytes are still in shared memory (its
        ``serialize`` or ``to_message`` copies them out and frees them; for a frame the device wrote into its
        client's region, the tensors point there and carry no bytes), or an ERROR one when its batch failed.

        Args:
            begun: the frame, as ``begin`` sent it.
            tracker: the stream's tracker, when it tracks: an OK frame's boxes advance it (frames complete in order).
        """
        frame, options = begun.frame, begun.options
        try:
            out = await asyncio.shield(begun.computed)
        except DeviceFrameError as err:  # a failed batch (e.g. CUDA out of memory) fails its frames, not the server
            return Reply(error_result(frame, f"feature computation failed: {err}"))
        except asyncio.CancelledError:
            self.device.withdraw(begun.computed)
            raise
        encode_start = time.perf_counter()
        result = pb.FrameResult()
        _identify(result, frame, pb.FRAME_STATUS_OK)
        result.letterbox.CopyFrom(wire.letterbox_to_proto(begun.letterbox.as_dict()))
        found = out.objects if begun.job is not None else None
        try:
            if begun.spans is not None:
                payloads = self._point_tensors(result, options, begun.shapes, begun.spans)
            else:
                payloads = self._fill_tensors(result, options, begun.shapes, out.arrays)
            vectors = self._object_vectors(begun, found) if found is not None else None
            if compression.wants_compression(options.compression):
                payloads = await self._compress(result, payloads, options.compression, out.release)
        except wire.NotQuantizableError as err:  # that frame fails; its stream goes on
            out.release()
            return Reply(error_result(frame, str(err)))
        except Exception:
            out.release()
            raise
        if found is not None:
            self._fill_objects(result, begun, found, vectors)
        if tracker is not None and options.tracking is not None:
            self._track(result, begun, found, vectors, tracker)
        result.batch_size = out.batch_size
        timings = result.timings
        timings.queued_us = out.queued_us
        timings.preprocess_us = begun.preprocess_us
        timings.compute_us = out.compute_us
        timings.encode_us = out.fetch_us + int((time.perf_counter() - encode_start) * 1e6)
        return Reply(result, payloads, out.release)

    @staticmethod
    def _fill_tensors(result: pb.FrameResult, options: FrameOptions, shapes: list[tuple[int, ...]],
                      arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Add one Tensor header per output to ``result`` and return their payloads (views of shared memory): the
        arrays themselves, or for 8-bit codes the codes of each record, whose scales and offsets go into the header.
        Raises ``wire.NotQuantizableError``, naming the layer, when the device could not code one of the tensors."""
        payloads = []
        for layer, shape, array in zip(options.layers, shapes, arrays):
            if options.dtype == pb.DTYPE_UINT8_AFFINE:
                scales, offsets, codes = affine.unpack(array, shape)
                if not affine.coded(scales):
                    raise wire.NotQuantizableError(
                        f"layer {layer.name} holds a NaN, an infinity or a magnitude above 2**126, which 8-bit codes "
                        "cannot carry: ask for dtype float32 or float16 to receive it")
                wire.affine_header(result.tensors.add(), layer.name, layer.index, layer.stride, shape, scales, offsets)
                payloads.append(codes)
            else:
                _tensor_header(result, layer, options.dtype, array.shape)
                payloads.append(array)
        return payloads

    @staticmethod
    def _point_tensors(result: pb.FrameResult, options: FrameOptions, shapes: list[tuple[int, ...]],
                       spans: list[tuple[int, int]]) -> list[bytes]:
        """Add one Tensor header per output to ``result``, pointing at the (offset, length) in the client's region
        where the device wrote it, and return their (empty) payloads: no byte of theirs passes through here. Only
        float outputs go this way (8-bit codes carry their scales and offsets in the header)."""
        for layer, shape, (offset, length) in zip(options.layers, shapes, spans):
            tensor = _tensor_header(result, layer, options.dtype, shape)
            tensor.shared_memory.offset = offset
            tensor.shared_memory.length = length
        return [b""] * len(spans)

    async def _compress(self, result: pb.FrameResult, payloads: list[np.ndarray], codec: int,
                        release: Callable[[], None]) -> list:
        """Each tensor's bytes compressed with ``codec`` where that makes them smaller (``compress_tensor`` sets the
        header's fields), else the payload itself: on the event loop for small replies, else on the decode pool.

        Args:
            result: the reply, whose tensors match ``payloads``.
            payloads: the plain bytes (views of shared memory).
            codec: the stream's StreamConfig.compression.
            release: frees the shared memory the payloads view; called once the pool thread is done with it when the
                frame is cancelled meanwhile (the caller releases it in every other case).
        """
        tensors = list(result.tensors)

        def run() -> list:
            return [compression.compress_tensor(t, p, codec) for t, p in zip(tensors, payloads)]

        if sum(p.nbytes for p in payloads) < INLINE_COMPRESS_BYTES:
            return run()
        work = asyncio.get_running_loop().run_in_executor(self.decode_pool, run)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda _: release())
            raise

    @staticmethod
    def _object_vectors(begun: "Begun", found: dict[str, np.ndarray | None]) -> np.ndarray | wire.AffineCodes | None:
        """The frame's object vectors as its slot holds them: (N, D) in the request's storage dtype, or for 8-bit
        codes the ``wire.AffineCodes`` of the slot's record (the codes a view of shared memory); None without vectors.
        Raises ``wire.NotQuantizableError`` when the device could not code them."""
        vectors = found["vectors"]
        request = begun.job.request
        if vectors is None or request.vector_dtype != CODED:
            return vectors
        shape = (len(found["boxes"]), request.dim)
        scales, offsets, codes = affine.unpack(vectors, shape)
        if not affine.coded(scales):
            raise wire.NotQuantizableError(
                "object features hold a NaN, an infinity or a magnitude above 2**126, which 8-bit codes cannot carry: "
                "ask for object_features dtype float32 or float16 to receive them")
        return wire.AffineCodes(codes, scales, offsets, wire.affine_channel_axis(len(shape)))

    @staticmethod
    def _track(result: pb.FrameResult, begun: "Begun", found: dict[str, np.ndarray | None] | None,
               vectors: np.ndarray | wire.AffineCodes | None, tracker: Tracker) -> None:
        """Give the frame's boxes (none when it has no object work: a client-box stream's frame without boxes) to
        the stream's tracker: detections with their scores, client boxes with theirs (or none), and the vectors
        (``_object_vectors``) as float32, 8-bit codes decoded as the client decodes them."""
        if found is None:
            boxes, scores = np.zeros((0, 4), np.float32), None
        else:
            boxes = found["boxes"]
            scores = found["scores"] if begun.job.boxes is None else begun.box_scores
            if isinstance(vectors, wire.AffineCodes):
                vectors = vectors.dequantize()
            elif vectors is not None:
                vectors = wire.storage_to_float32(vectors, wire.dtype_from_name(begun.job.request.vector_dtype))
        track_frame(result, tracker, begun.options.tracking, boxes, scores, vectors)

    @staticmethod
    def _fill_objects(result: pb.FrameResult, begun: "Begun", found: dict[str, np.ndarray | None],
                      vectors: np.ndarray | wire.AffineCodes | None) -> None:
        """The frame's box fields and, when the stream sends them, its vectors (``_object_vectors``)."""
        request = begun.job.request
        vectors = vectors if begun.options.send_vectors else None
        wire.fill_objects(result, found["boxes"],
                          source=pb.BOX_SOURCE_CLIENT if begun.job.boxes is not None else pb.BOX_SOURCE_DETECTOR,
                          scores=found["scores"], classes=found["classes"], box_ids=begun.box_ids,
                          features=vectors, slices=request.slices if vectors is not None else (),
                          dtype=wire.dtype_from_name(request.vector_dtype), anchors=found["anchors"])

    async def process(self, frame: pb.Frame, options: FrameOptions) -> pb.FrameResult:
        """One frame's FrameResult (``begin`` then ``complete``): OK with tensors, or ERROR with a message."""
        begun = await self.begin(frame, options)
        if isinstance(begun, pb.FrameResult):
            return begun
        return (await self.complete(begun)).to_message()


@dataclass
class Reply:
    """A frame's answer. ``result`` is complete but for the tensors' bytes, which are ``payloads`` (views of the
    front-end's shared memory until ``serialize`` or ``to_message`` copies them out and calls ``release``; or the
    compressed bytes, for a stream that asked for compression)."""

    result: pb.FrameResult
    payloads: list[Any] = field(default_factory=list)
    release: Callable[[], None] = lambda: None

    def serialize(self, in_stream_response: bool) -> bytes:
        """The wire bytes of the FrameResult (or of a StreamResponse around it), with each payload copied once."""
        try:
            return wire.serialize_result(self.result, self.payloads, in_stream_response)
        finally:
            self.release()

    def to_message(self) -> pb.FrameResult:
        """``result`` with the tensors' bytes filled in (for the unary call, where one copy more is no matter)."""
        try:
            for tensor, payload in zip(self.result.tensors, self.payloads):
                tensor.data = memoryview(payload).tobytes()
            return self.result
        finally:
            self.release()


@dataclass
class Begun:
    """A frame on its way through the device: what ``Pipeline.complete`` needs to build its reply."""

    frame: pb.Frame
    options: FrameOptions
    letterbox: Letterbox
    computed: asyncio.Future
    preprocess_us: int
    job: ObjectJob | None = None
    box_ids: np.ndarray | None = None
    #: Each output's tensor shape, as sent (an 8-bit output's slot holds a record, not this shape).
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: The client's box scores (Frame.box_scores), for tracking; None when it sent none.
    box_scores: np.ndarray | None = None
    #: (offset, length) of each output in the client's region, when the device writes them there itself.
    spans: list[tuple[int, int]] | None = None


def _header(frame: pb.Frame) -> pb.Frame:
    """What a frame's answer needs (its id, capture time and, on a shared-memory stream, where its reply goes),
    without the pixels."""
    return pb.Frame(frame_id=frame.frame_id, capture_timestamp_us=frame.capture_timestamp_us,
                    shared_memory=frame.shared_memory if frame.HasField("shared_memory") else None)


def _tensor_header(result: pb.FrameResult, layer: ResolvedLayer, dtype: int, shape: Sequence[int]) -> pb.Tensor:
    """A new Tensor of ``result`` with everything but its bytes: the layer, the dtype and one frame's ``shape``."""
    tensor = result.tensors.add(name=layer.name, layer_index=layer.index, stride=layer.stride, dtype=dtype)
    tensor.shape[:] = shape
    return tensor


def _identify(result: pb.FrameResult, frame: pb.Frame, status: int) -> None:
    result.frame_id = frame.frame_id
    result.capture_timestamp_us = frame.capture_timestamp_us
    result.status = status


def _unpreparable(frame: pb.Frame, err: Exception) -> pb.FrameResult:
    """The ERROR result of a frame that failed in decoding or letterboxing for a reason of its own (e.g. an OpenCV
    assertion on a degenerate frame)."""
    return error_result(frame, f"could not preprocess the frame: {type(err).__name__}: {one_line(str(err), 300)}")


def error_result(frame: pb.Frame, message: str, into: pb.FrameResult | None = None) -> pb.FrameResult:
    result = pb.FrameResult() if into is None else into
    result.Clear()
    _identify(result, frame, pb.FRAME_STATUS_ERROR)
    result.error_message = message
    return result


def dropped_result(frame: pb.Frame, into: pb.FrameResult | None = None) -> pb.FrameResult:
    result = pb.FrameResult() if into is None else into
    _identify(result, frame, pb.FRAME_STATUS_DROPPED)
    result.error_message = "dropped in realtime mode: a newer frame of this stream arrived first"
    return result
