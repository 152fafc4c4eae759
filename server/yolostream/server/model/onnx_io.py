"""ONNX I/O shared by the offline exporter and the device's onnxruntime backend: tracing a graph to ONNX bytes,
opening an ONNX Runtime session with the right providers, and importing the optional ``onnx`` extra.

One home for both users, so neither imports the other. onnx, onnxscript and onnxruntime are imported lazily: a
missing install is a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
import io
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..common.errors import UserError, one_line

INPUT_NAME = "images"
OPSET = 17
ONNX_EXTRA_HINT = "pip install 'yolostream[onnx]'"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def require(module: str, why: str) -> Any:
    """Import an optional module of the ``onnx`` extra, or raise a one-line UserError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{why} needs {module}, which is not installed: {ONNX_EXTRA_HINT}") from err


def onnx_bytes(graph: nn.Module, example: torch.Tensor, count: int, dynamic: str | None) -> bytes:
    """``graph`` as a serialised ONNX model, traced on ``example``: input ``images``, outputs ``output_0`` …
    ``output_<count-1>`` (``name_outputs`` gives them their real names: the exporter refuses names like ``9``).

    Uses torch's TorchScript-based exporter (``dynamo=False``): it makes the batch (``dynamic='batch'``) or batch,
    height and width (``'shape'``) symbolic and exports in well under a second, where the dynamo exporter needs tens
    of seconds for the same graph.
    """
    names = [f"output_{k}" for k in range(count)]
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        axes[INPUT_NAME] = {0: "batch", 2: "height", 3: "width"} if dynamic == "shape" else {0: "batch"}
        axes.update({name: {0: "batch"} for name in names})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings: the parity check judges
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT_NAME], output_names=names,
                          dynamic_axes=axes or None, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return buffer.getvalue()


class Positional(nn.Module):
    """A module whose forward gives a mapping, with a tuple in ``keys`` order as its outputs instead: ONNX outputs
    are positional, so this is what gets exported.

    Args:
        module: the module to export.
        keys: the outputs to keep, in order.
        method: the method of ``module`` that maps an input to its outputs (``forward``, or ``by_index`` of a
            ``TruncatedModel``).
    """

    def __init__(self, module: nn.Module, keys: Sequence, method: str = "forward") -> None:
        super().__init__()
        self.module = module
        self.keys = list(keys)
        self.method = method

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = getattr(self.module, self.method)(x)
        return tuple(outputs[key] for key in self.keys)


class OnnxPlan:
    """An ONNX Runtime session run as a torch forward: ``by_index`` takes the (N, 3, H, W) input tensor and gives
    the session's outputs, in order, as tensors on ``device`` under ``keys`` (as ``TruncatedModel.by_index``).

    Args:
        sess: the session; its outputs are ``keys``, in that order.
        keys: what each output is called (layer indices for the device backend, the extractor's names offline).
        device: where the outputs go.
    """

    def __init__(self, sess: Any, keys: Sequence, device: torch.device) -> None:
        self.session = sess
        self.keys = tuple(keys)
        self.device = device
        self.input_name = sess.get_inputs()[0].name
        self.output_names = [o.name for o in sess.get_outputs()]

    def by_index(self, x: torch.Tensor) -> dict:
        """Run the session on ``x`` in the model's dtype; its outputs on ``device``, by key."""
        feed = np.ascontiguousarray(x.detach().cpu().numpy())
        outputs = self.session.run(self.output_names, {self.input_name: feed})
        return {key: torch.from_numpy(out).to(self.device) for key, out in zip(self.keys, outputs)}


def available() -> bool:
    """Whether onnxruntime can be imported (``--backend auto`` falls back to torch without it)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def auto_backend(device: torch.device) -> str:
    """What ``--backend auto`` runs: onnxruntime on a CPU when it is installed (faster there in every row of
    ``make bench``: BENCHMARKS.md), torch on CUDA (until a GPU measurement says otherwise) or without the extra.
    A rule, not a timing run, so that the default costs nothing at start-up.

    Args:
        device: where the model runs.
    """
    return "onnxruntime" if device.type == "cpu" and available() else "torch"


def providers_for(device: torch.device, installed: Sequence[str]) -> list[Any]:
    """Execution providers in preference order: TensorRT, CUDA (on a CUDA device, when installed), then CPU."""
    chosen: list[Any] = []
    if device.type == "cuda":
        options = {"device_id": device.index or 0}
        chosen += [(name, options) for name in GPU_PROVIDERS if name in installed]
    chosen.append("CPUExecutionProvider")
    return chosen


def session(model: str | bytes, device: torch.device, threads: int | None = None) -> Any:
    """An ONNX Runtime session for ``model`` (a path or a serialised model) on ``device``.

    Args:
        model: an ONNX file path or the model's bytes.
        device: where the runner lives; picks the providers.
        threads: intra-op threads (None: onnxruntime's default, every core).
    """
    ort = require("onnxruntime", "the onnxruntime backend")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=providers_for(device, ort.get_available_providers()))
    except Exception as err:  # onnxruntime's own exceptions derive from Exception alone
        raise UserError(f"onnxruntime cannot run this model on {device}: {one_line(str(err), 300)}") from err
