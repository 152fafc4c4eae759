"""A bench-only stand-in for the model: the service moves real-sized replies while no layer runs.

``make bench`` uses it to measure the transport alone (decode, queueing, encoding, gRPC) against a plain
TCP socket moving the same bytes. It answers with zero arrays of exactly the shapes and dtypes the real engine
would return for each frame, derived from the real engine's catalogue, so message sizes are identical.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from yolostream.v1 import wire
from yolostream.v1.vocab import DTYPES

from ..common import affine
from ..ipc.messages import OutputKey
from .engine import DeviceRunner, PendingBatch


class ModelBypass:
    """Looks like an DeviceRunner to the batcher and pipeline; ``launch`` allocates zeros instead of computing."""

    def __init__(self, engine: DeviceRunner) -> None:
        self._engine = engine
        self._channels = {row.index: (row.out_channels, row.stride) for row in engine.default_catalogue}

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def launch(self, images: Sequence[np.ndarray], keys: Sequence[OutputKey]) -> PendingBatch:
        n = len(images)
        h, w, _ = images[0].shape
        host = {}
        for key in keys:
            index, pooling, dtype = key
            channels, stride = self._channels[index]
            frame = (channels,) if pooling != "none" else (channels, h // stride, w // stride)
            if dtype == "uint8":  # one 8-bit record per frame (common/affine.py)
                host[key] = np.zeros((n, affine.record_bytes(frame)), np.uint8)
            else:
                host[key] = np.zeros((n, *frame), wire.storage_dtype(DTYPES[dtype]))
        return PendingBatch(n, tuple(keys), host=host)

    def collect(self, pending: PendingBatch) -> PendingBatch:
        return pending

    def warmup(self, max_batch: int, imgsz: int | None = None) -> None:
        return None
