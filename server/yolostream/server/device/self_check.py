"""Every fast path proves itself at start-up, before the server takes a frame.

The served configuration (its backend, dtype and memory format, and the staged CUDA path when it is on) runs
seeded frames at every input shape warm-up covers, and so does the reference path: the same fused weights in
float32, eager PyTorch, the direct path, on the CPU. Every checked layer's output must be within the model dtype's
tolerance of the reference's, relative to the reference's largest |value| (``placement.TOLERANCES``). A mismatch or an
exception stops the start-up with one line naming the path, the layer, the input and the error, so a broken
provider, kernel or export never serves a frame. When the served configuration *is* the reference path (float32
torch on the CPU, direct), there is nothing to compare and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..common.errors import one_line
from ..model.placement import TOLERANCES
from ..model.truncated import TruncatedModel

class FastPathMismatch(ValueError):
    """The served path disagrees with the reference path (or failed to run): the server must not start."""


@dataclass(frozen=True)
class CheckReport:
    """What the start-up check measured. ``worst`` is None when the served path is the reference path itself."""

    path: str
    worst: float | None = None
    layer: str = ""
    limit: float = 0.0

    def summary(self) -> str:
        """One line for ``GetModelInfo`` and the start-up line."""
        if self.worst is None:
            return f"{self.path} is the reference path"
        return f"{self.path} vs reference: worst relative error {self.worst:.1e} on {self.layer} (limit {self.limit:g})"


def check_served_path(runner, reference: nn.Module | None, layers: Sequence[tuple[str, int]],
                      shapes: Sequence[tuple[int, int]], path: str) -> CheckReport:
    """Run the served path and the reference on one seeded frame per input shape and compare ``layers``.

    Args:
        runner: the ``DeviceRunner`` as it will serve (backend resolved, warmed up).
        reference: the fused float32 model on the CPU, or None when the served path is the reference path.
        layers: (name, layer index) of each output to compare.
        shapes: the model input shapes (height, width) to run.
        path: how the served path is described in the report and in errors.

    Raises:
        FastPathMismatch: one line naming the path, the layer, the input shape and the error.
    """
    if reference is None:
        return CheckReport(path)
    limit = TOLERANCES[runner.dtype]
    indices = sorted({index for _, index in layers})
    keys = [(index, "none", "float32") for index in indices]
    plan = TruncatedModel(reference.model, indices)
    worst = CheckReport(path, 0.0, layers[0][0], limit)
    for seed, (h, w) in enumerate(shapes):
        frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        try:
            served = runner.collect(runner.launch([frame], keys)).host
        except Exception as err:
            raise FastPathMismatch(f"start-up check: the served path ({path}) failed at input {h}x{w}: "
                                   f"{one_line(f'{type(err).__name__}: {err}', 300)}") from err
        with torch.inference_mode():
            wanted = plan.by_index(torch.from_numpy(frame)[None].permute(0, 3, 1, 2).flip(1).float().div(255))
        for name, index in layers:
            want = wanted[index][0].numpy().astype(np.float64)
            got = np.asarray(served[(index, "none", "float32")][0], dtype=np.float64)
            scale = float(np.abs(want).max()) if want.size else 0.0
            diff = float(np.abs(got - want).max()) if want.size else 0.0
            error = diff / scale if scale else diff
            if not error <= limit:  # NaN fails too
                raise FastPathMismatch(f"start-up check: the served path ({path}) differs from the reference path "
                                       f"(float32, eager, direct, CPU) on layer {name} at input {h}x{w}: worst "
                                       f"relative error {error:.2e}, over the limit {limit:g}")
            if error > worst.worst:
                worst = CheckReport(path, error, name, limit)
    return worst
