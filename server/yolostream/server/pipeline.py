"""One frame's trip through the server, shared by the unary and the streaming RPCs.

decode (thread pool) → letterbox to uint8 → micro-batcher → pooled, cast outputs → Tensor messages.
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

from .batcher import MicroBatcher, OutputKey, ServerBusy
from .engine import Engine
from .frames import FrameError, FrameLimits, decode_frame
from .model.catalogue import ResolvedLayer

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
    """Validates options and runs frames; owns the decode pool, shares the engine and batcher."""

    def __init__(
        self,
        engine: Engine,
        batcher: MicroBatcher,
        limits: FrameLimits,
        *,
        default_layers: tuple[str, ...] = ("backbone",),
        max_imgsz: int = 4096,
        decode_threads: int = 4,
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
        self.default_layers = default_layers
        self.max_imgsz = max_imgsz
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="yolostream-decode")

    def close(self) -> None:
        self.decode_pool.shutdown(wait=True, cancel_futures=True)

    def options(self, msg: pb.FeatureOptions) -> FrameOptions:
        """Validate a FeatureOptions message; ValueError names the problem and the valid choices."""
        layers = tuple(self.engine.resolve(list(msg.layers) or list(self.default_layers)))
        dtype = _enum(msg.dtype, _DTYPES, pb.Dtype, "dtype", pb.DTYPE_FLOAT32)
        pooling = _POOLINGS[_enum(msg.pooling, _POOLINGS, pb.Pooling, "pooling", pb.POOLING_NONE)]
        policy_enum = _enum(msg.letterbox, _POLICIES, pb.LetterboxPolicy, "letterbox policy",
                            POLICY_ENUMS[self.engine.letterbox_policy])
        imgsz = int(msg.imgsz) or self.engine.imgsz
        if not 32 <= imgsz <= self.max_imgsz:
            raise ValueError(f"imgsz {imgsz} is out of range: choose 32..{self.max_imgsz} (or 0 for the server "
                             f"default {self.engine.imgsz})")
        return FrameOptions(layers, dtype, pooling, _POLICIES[policy_enum], imgsz)

    def _prepare(self, frame: pb.Frame, options: FrameOptions) -> tuple[np.ndarray, object]:
        image = decode_frame(frame, self.limits)
        return self.engine.preprocess(image, options.imgsz, options.policy)

    async def process(self, frame: pb.Frame, options: FrameOptions) -> pb.FrameResult:
        """The FrameResult for one frame: OK with tensors, or ERROR with a message. Never raises for bad input."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            image, letterbox = await loop.run_in_executor(self.decode_pool, self._prepare, frame, options)
        except FrameError as err:
            return error_result(frame, str(err))
        prepared = time.perf_counter()
        try:
            out = await self.batcher.submit(image, options.output_keys)
        except ServerBusy as err:
            return error_result(frame, str(err))
        except Exception as err:  # a failed batch (e.g. CUDA out of memory) fails its frames, not the server
            return error_result(frame, f"feature computation failed: {type(err).__name__}: {err}")
        encode_start = time.perf_counter()
        tensors = [
            wire.tensor_to_proto(layer.name, layer.index, layer.stride, array, options.dtype)
            for layer, array in zip(options.layers, out.arrays)
        ]
        encode_us = out.fetch_us + int((time.perf_counter() - encode_start) * 1e6)
        return pb.FrameResult(
            frame_id=frame.frame_id,
            capture_timestamp_us=frame.capture_timestamp_us,
            status=pb.FRAME_STATUS_OK,
            letterbox=letterbox_message(letterbox),
            tensors=tensors,
            timings=pb.Timings(queued_us=out.queued_us, preprocess_us=int((prepared - start) * 1e6),
                               compute_us=out.compute_us, encode_us=encode_us),
            batch_size=out.batch_size,
        )


def letterbox_message(lb) -> pb.LetterboxInfo:
    (oh, ow), (ih, iw), (rh_px, rw_px) = lb.orig_hw, lb.out_hw, lb.resized_hw
    return pb.LetterboxInfo(
        original_height=oh, original_width=ow, input_height=ih, input_width=iw,
        resized_height=rh_px, resized_width=rw_px, ratio_w=float(lb.ratio[0]), ratio_h=float(lb.ratio[1]),
        pad_left=lb.pad_left, pad_top=lb.pad_top, pad_right=lb.pad_right, pad_bottom=lb.pad_bottom,
    )


def error_result(frame: pb.Frame, message: str) -> pb.FrameResult:
    return pb.FrameResult(frame_id=frame.frame_id, capture_timestamp_us=frame.capture_timestamp_us,
                          status=pb.FRAME_STATUS_ERROR, error_message=message)


def dropped_result(frame: pb.Frame) -> pb.FrameResult:
    return pb.FrameResult(frame_id=frame.frame_id, capture_timestamp_us=frame.capture_timestamp_us,
                          status=pb.FRAME_STATUS_DROPPED,
                          error_message="dropped in realtime mode: a newer frame of this stream arrived first")
