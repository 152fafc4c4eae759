"""What runs a truncated forward: one small interface over torch and ONNX Runtime.

A backend makes a *plan* for a set of layers (the truncated graph up to the deepest of them, built once and kept,
least recently used dropped first), and a plan runs a batch: ``plan.by_index(x)`` takes the (N, 3, H, W) input on
the engine's device, in the model's dtype and memory format, and returns each planned layer's output there, by
layer index. Everything around the forward (staging, pooling and casting, copies back, objects) is the engine's
(``engine.DeviceRunner``) and is the same for every backend. Warm-up is running plans: the engine warms the
backend it serves with (``DeviceRunner.warmup``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

import torch
from torch import nn

from ..model.truncated import TruncatedModel

#: Truncated forwards kept built (one per set of layers asked for), least recently used dropped first.
MAX_PLANS = 64


class ForwardPlan(Protocol):
    """One set of layers, ready to run."""

    def by_index(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run the truncated forward on ``x``; outputs on the engine's device, by layer index."""


class Backend(Protocol):
    """A way of running truncated forwards (``torch``, ``onnxruntime``)."""

    name: str

    def plan(self, indices: tuple[int, ...]) -> ForwardPlan:
        """The plan for ``indices`` (ascending, distinct), built on first use and kept."""


class TorchBackend:
    """Eager PyTorch: the model's own (fused, placed) layers, run by a ``TruncatedModel`` per set of layers.

    Args:
        layers: the model's layer list (shared, not copied).
    """

    name = "torch"

    def __init__(self, layers: nn.Sequential) -> None:
        self.layers = layers
        self._plans: OrderedDict[tuple[int, ...], TruncatedModel] = OrderedDict()
        self._lock = threading.Lock()

    def plan(self, indices: tuple[int, ...]) -> TruncatedModel:
        with self._lock:
            plan = self._plans.pop(indices, None)
            if plan is None:
                plan = TruncatedModel(self.layers, indices)
            self._plans[indices] = plan  # most recently used last
            while len(self._plans) > MAX_PLANS:  # clients choose layer sets: keep what they cost bounded
                self._plans.popitem(last=False)
        return plan
