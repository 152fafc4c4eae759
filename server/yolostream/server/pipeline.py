"""One frame's trip through a front-end, shared by the unary and the streaming RPCs.

decode (thread pool for JPEG/PNG) → letterbox to uint8 → device link (shared memory) → pooled, cast outputs →
Tensor messages.
Option validation lives here too: a bad option is a ValueError whose text names the problem and the valid
choices, which the service turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from .card import ModelCard, ResolvedLayer
from .errors import quote
from .frames import FrameError, FrameLimits, decode_frame
from .link import DeviceFrameError, DeviceLink, FrameTooLarge, OutputKey
from .preprocess import prepare

_DTYPES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16", pb.DTYPE_BFLOAT16: "bfloat16"}
_POOLINGS = {pb.POOLING_NONE: "none", pb.POOLING_GLOBAL_AVG: "avg", pb.POOLING_GLOBAL_MAX: "max"}
_POLICIES = {pb.LETTERBOX_POLICY_AUTO: "auto", pb.LETTERBOX_POLICY_SQUARE: "square"}
POLICY_ENUMS = {name: value for value, name in _POLICIES.items()}


@dataclass(frozen=True)
class FrameOptions:
    """Validated per-stream (or per-call) options."""

    layers: tuple[ResolvedLayer, ...]
    dtype: int
    pooling: str
    policy: str
    imgsz: int

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
        max_imgsz: int = 4096,
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
                            POLICY_ENUMS[self.card.letterbox])
        imgsz = int(msg.imgsz) or self.card.imgsz
        if not 32 <= imgsz <= self.max_imgsz:
            raise ValueError(f"imgsz {imgsz} is out of range: choose 32..{self.max_imgsz} (or 0 for the server "
                             f"default {self.card.imgsz})")
        return FrameOptions(layers, dtype, pooling, _POLICIES[policy_enum], imgsz)

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

    def reply_bytes(self, options: FrameOptions, input_hw: tuple[int, int]) -> int:
        """Tensor bytes of one frame's reply for a model input of ``input_hw`` (the envelope is a few hundred more)."""
        itemsize = wire.ITEMSIZE[options.dtype]
        return sum(int(np.prod(shape)) * itemsize for shape in self.output_shapes(options, input_hw))

    def _prepare(self, frame: pb.Frame, options: FrameOptions) -> tuple[np.ndarray, object]:
        image = decode_frame(frame, self.limits)
        return prepare(image, options.imgsz, self.card.stride, options.policy)

    async def process(self, frame: pb.Frame, options: FrameOptions, into: pb.FrameResult | None = None) -> pb.FrameResult:
        """One frame's FrameResult: OK with tensors, or ERROR with a message. Never raises for bad input.

        ``into`` is filled in place (e.g. ``response.result`` of the StreamResponse about to be sent), so a
        multi-megabyte reply is never copied from one message into another.
        """
        result = pb.FrameResult() if into is None else into
        start = time.perf_counter()
        try:
            if frame.WhichOneof("data") == "encoded":
                loop = asyncio.get_running_loop()
                image, letterbox = await loop.run_in_executor(self.decode_pool, self._prepare, frame, options)
            else:  # raw pixels need no decoding: a thread hop would cost more than it saves
                image, letterbox = self._prepare(frame, options)
        except FrameError as err:
            return error_result(frame, str(err), result)
        except Exception as err:  # e.g. an OpenCV assertion on a degenerate frame: that frame fails, nothing else
            return error_result(frame, f"could not preprocess the frame: {type(err).__name__}: {err}", result)
        shapes = self.output_shapes(options, image.shape[1:])
        reply = self.reply_bytes(options, image.shape[1:])
        if reply > self.max_reply_bytes:
            return error_result(frame, f"the reply would be {reply:,} bytes, over the server's message limit of "
                                       f"{self.max_reply_bytes:,}: ask for fewer or deeper layers, pooling, float16, "
                                       f"or a smaller imgsz", result)
        prepared = time.perf_counter()
        try:
            out = await self.device.run(image, options.output_keys, shapes)
        except FrameTooLarge as err:
            return error_result(frame, str(err), result)
        except DeviceFrameError as err:  # a failed batch (e.g. CUDA out of memory) fails its frames, not the server
            return error_result(frame, f"feature computation failed: {err}", result)
        encode_start = time.perf_counter()
        try:
            _identify(result, frame, pb.FRAME_STATUS_OK)
            result.letterbox.CopyFrom(wire.letterbox_to_proto(letterbox.as_dict()))
            for layer, array in zip(options.layers, out.arrays):
                wire.fill_tensor(result.tensors.add(), layer.name, layer.index, layer.stride, array, options.dtype)
        finally:
            out.release()
        result.batch_size = out.batch_size
        timings = result.timings
        timings.queued_us = out.queued_us
        timings.preprocess_us = int((prepared - start) * 1e6)
        timings.compute_us = out.compute_us
        timings.encode_us = out.fetch_us + int((time.perf_counter() - encode_start) * 1e6)
        return result


def _identify(result: pb.FrameResult, frame: pb.Frame, status: int) -> None:
    result.frame_id = frame.frame_id
    result.capture_timestamp_us = frame.capture_timestamp_us
    result.status = status


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
