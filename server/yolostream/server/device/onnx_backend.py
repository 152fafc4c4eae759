"""The ONNX Runtime engine backend: the device runner's truncated forwards run as ONNX Runtime sessions.

``DeviceRunner(backend="onnxruntime")`` asks this backend (``backends.Backend``) for a plan per set of layers. The plan is the same
``TruncatedModel`` that the torch backend runs, exported once (batch, height and width symbolic, so every batch size
and letterboxed shape runs on one session) and kept as a session; its ``by_index`` takes and returns torch tensors on
the runner's device, as ``TruncatedModel.by_index`` does, so launch, pooling, casting and the copy back are shared.

Providers: TensorRT and CUDA (when the runner is on CUDA and the installed onnxruntime has them), then CPU. On CPU a
session gets the intra-op thread count that the torch worker calling it has (``DeviceRunner.share_cpu`` gives each
of two CPU workers half of the cores), so the two backends share the cores the same way.

``--backend auto`` (the default) picks this backend on CPU when onnxruntime is installed (``onnx_io.auto_backend``).

Imported by the device process only (onnxruntime is loaded lazily, and a missing install is a one-line error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Sequence

import torch

from ..model.onnx_io import OnnxPlan, Positional, onnx_bytes, require, session

log = logging.getLogger(__name__)

#: Sessions kept (one per set of layers and thread count), least recently used dropped first: each holds a copy of
#: the weights, and clients choose the layer sets.
MAX_SESSIONS = 8


def graph_bytes(layers: torch.nn.Sequential, indices: Sequence[int], example: torch.Tensor) -> bytes:
    """The ONNX model of the truncated forward for ``indices`` (batch, height and width symbolic)."""
    from ..model.truncated import TruncatedModel

    truncated = TruncatedModel(layers, indices)
    module = Positional(truncated, truncated.plan.targets, "by_index").eval()
    return onnx_bytes(module, example, len(module.keys), "shape")


class OnnxBackend:
    """ONNX Runtime sessions of the engine's layers (a ``backends.Backend``): one per (set of layers, thread count),
    built once and kept.

    Args:
        layers: the engine's (fused, cast, placed) layers, exported per set of layers.
        device: where they live; picks the providers, and where outputs go.
        dtype: the model's dtype (the exported input's).
        input_hw: the input shape the graph is traced at (height and width stay symbolic).
    """

    name = "onnxruntime"

    def __init__(self, layers: torch.nn.Sequential, device: torch.device, dtype: torch.dtype,
                 input_hw: tuple[int, int]) -> None:
        require("onnxruntime", "--backend onnxruntime")
        self.layers = layers
        self.device = device
        self.dtype = dtype
        self.input_hw = input_hw
        self._plans: OrderedDict[tuple[tuple[int, ...], int], OnnxPlan] = OrderedDict()
        self._lock = threading.Lock()

    def plan(self, indices: tuple[int, ...]) -> OnnxPlan:
        """The session for ``indices`` (ascending), with the calling worker's intra-op thread count on CPU."""
        threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        key = (indices, threads)
        with self._lock:
            plan = self._plans.pop(key, None)
            if plan is None:
                example = torch.zeros((2, 3, *self.input_hw), dtype=self.dtype, device=self.device)
                started = time.perf_counter()
                data = graph_bytes(self.layers, indices, example)
                plan = OnnxPlan(session(data, self.device, threads or None), indices, self.device)
                log.debug("onnxruntime session for layers %s (%d threads) built in %.2f s", list(indices), threads,
                          time.perf_counter() - started)
            self._plans[key] = plan  # most recently used last
            while len(self._plans) > MAX_SESSIONS:
                self._plans.popitem(last=False)
            return plan
