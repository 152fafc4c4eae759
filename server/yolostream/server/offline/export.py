"""``yolostream export``: the truncated graph serving runs, as an ONNX or TorchScript file that carries its metadata.

The file holds exactly what ``serve`` computes for the requested layers (the same ``TruncatedModel``, BatchNorm fused
unless ``--no-fuse``): the deepest requested layer is the last one computed, and every requested layer is an output
named as requested (``backbone``, ``P3``, ``9``, …). With ``--detect`` the Detect head runs too and its decoded
output (upstream's ``pred``: boxes in input pixels, objectness and class scores) is one more output, ``detect``.
The input is ``images``: (N, 3, H, W) RGB in [0, 1], letterboxed as ``yolostream.letterbox`` says.

Everything a consumer needs to use the file is embedded as metadata (ONNX ``metadata_props``, TorchScript
``_extra_files``; the same ``yolostream.*`` keys, values JSON; ``read_metadata`` reads either). Every export ends
with a parity check: a seeded input runs through ONNX Runtime (or the saved TorchScript) and through the engine, and
the export fails, leaving no file, when an output is off by more than ``TOLERANCES`` (the start-up check's) of its largest |value|.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..common.card import ResolvedLayer
from ..common.errors import UserError
from ..model.plan import layer_inputs
from ..model.onnx_io import INPUT_NAME, onnx_bytes, require, session
from ..model.placement import TOLERANCES
from ..model.truncated import TruncatedModel

FORMATS = ("onnx", "torchscript")
#: ``batch``: the batch dimension is symbolic; ``shape``: batch, height and width are.
DYNAMIC = ("batch", "shape")
DETECT_OUTPUT = "detect"
METADATA_PREFIX = "yolostream."


class ExportGraph(nn.Module):
    """The truncated forward with positional outputs, optionally followed by Detect's decode.

    ONNX and TorchScript files name their outputs by position, so this returns a tuple in the order of ``names``
    (TorchScript gets a name → tensor dict when ``as_dict``). A layer asked for under two names (``backbone`` and
    ``C5``) is returned twice.

    Args:
        layers: the model's layer list (shared, not copied).
        outputs: output name → layer index, in output order (no Detect).
        detect: also run the Detect head (the model's last layer) and return its decoded output as ``detect``.
        as_dict: return a dict instead of a tuple.
    """

    def __init__(self, layers: nn.Sequential, outputs: Mapping[str, int], *, detect: bool = False,
                 as_dict: bool = False) -> None:
        super().__init__()
        self.names = tuple(outputs) + ((DETECT_OUTPUT,) if detect else ())
        self.indices = tuple(outputs.values())
        head = layers[len(layers) - 1]
        self.detect_inputs = layer_inputs(head.i, head.f) if detect else ()
        self.truncated = TruncatedModel(layers, sorted({*self.indices, *self.detect_inputs}))
        self.head = head if detect else None
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
        by_index = self.truncated.by_index(x)
        values = [by_index[i] for i in self.indices]
        if self.head is not None:
            values.append(self.head([by_index[j] for j in self.detect_inputs])[0])
        return dict(zip(self.names, values)) if self.as_dict else tuple(values)


def name_outputs(proto: Any, names: Sequence[str]) -> None:
    """Rename the graph outputs of an ``onnx.ModelProto``, in order, to ``names`` (every use of each value too)."""
    renames = {out.name: name for out, name in zip(proto.graph.output, names)}
    for node in proto.graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for value in (*proto.graph.output, *proto.graph.value_info):
        value.name = renames.get(value.name, value.name)


def worst_errors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per output: max |got − want| divided by max |want| (the parity measure; 0 for an all-zero output)."""
    errors = {}
    for name, reference in want.items():
        value = np.asarray(got[name], dtype=np.float64)
        reference = np.asarray(reference, dtype=np.float64)
        if value.shape != reference.shape:
            raise UserError(f"parity check: output {name} has shape {value.shape}, the engine's is {reference.shape}")
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        diff = float(np.abs(value - reference).max()) if reference.size else 0.0
        errors[name] = diff / scale if scale else diff
    return errors


def check_parity(errors: Mapping[str, float], tolerance: float) -> None:
    """Raise a one-line UserError naming every output whose worst relative error is over ``tolerance``."""
    bad = [f"{name} {err:.2e}" for name, err in errors.items() if not err <= tolerance]
    if bad:
        raise UserError(f"parity check failed: worst relative error over {tolerance:g} of the output's max |value| "
                        f"for {', '.join(bad)}; no file written")


def run_onnx(model: str | bytes | Path, inputs: np.ndarray, device: torch.device | None = None,
             threads: int | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX file (or serialised model) once through ONNX Runtime; output name → array."""
    sess = session(model if isinstance(model, bytes) else str(model), device or torch.device("cpu"), threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {INPUT_NAME: inputs})))


def run_torchscript(path: str | Path, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Run a TorchScript file written by ``export_model`` once; output name → array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation warning
        module = torch.jit.load(str(path), map_location=inputs.device)
    with torch.inference_mode():
        out = module(inputs)
    return {name: t.float().cpu().numpy() for name, t in out.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``yolostream.*`` metadata of an exported ONNX or TorchScript file, keys without the prefix, values decoded."""
    path = Path(path)
    raw: dict[str, str] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                folder, _, leaf = name.rpartition("/")
                if folder.endswith("extra") and leaf.startswith(METADATA_PREFIX):
                    raw[leaf] = archive.read(name).decode()
    else:
        onnx = require("onnx", "reading an ONNX file")
        raw = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {k.removeprefix(METADATA_PREFIX): json.loads(v) for k, v in raw.items() if k.startswith(METADATA_PREFIX)}


@dataclass(frozen=True)
class ExportRequest:
    """What to export (the ``export`` command's flags).

    Args:
        layers: the requested outputs, resolved against the catalogue (name as requested → layer).
        detect: add Detect's decoded output ``detect``.
        fmt: ``onnx`` or ``torchscript``.
        input_hw: the input (height, width) to trace on, multiples of the stride.
        batch: the batch to trace on (any batch runs when ``dynamic`` is set).
        dynamic: None, ``batch`` or ``shape``.
        letterbox: the letterbox policy consumers must apply (recorded in the metadata).
        imgsz: the ``--imgsz`` the input size came from (recorded).
        out: the file to write.
    """

    layers: tuple[ResolvedLayer, ...]
    detect: bool
    fmt: str
    input_hw: tuple[int, int]
    batch: int
    dynamic: str | None
    letterbox: str
    imgsz: int
    out: Path


def metadata(runner: Any, request: ExportRequest) -> dict[str, str]:
    """The embedded metadata: model, strides, the outputs' catalogue rows, input, letterbox policy, random weights."""
    rows = {row.index: row for row in runner.catalogue(request.input_hw)}
    outputs = [{"name": layer.name, **rows[layer.index].as_dict()} for layer in request.layers]
    strides: dict[str, Any] = {layer.name: layer.stride for layer in request.layers}
    if request.detect:
        head = runner.layers[len(runner.layers) - 1]
        strides[DETECT_OUTPUT] = [int(s) for s in head.stride.tolist()]
        outputs.append({"name": DETECT_OUTPUT, **rows[head.i].as_dict(), "nc": int(head.nc),
                        "columns": "cx, cy, w, h (input pixels), objectness, then nc class scores (after the sigmoid)",
                        "rows": "level-major (stride ascending), then anchor, then grid y, then grid x"})
    h, w = request.input_hw
    shape: list[Any] = ["batch" if request.dynamic else request.batch, 3,
                        "height" if request.dynamic == "shape" else h, "width" if request.dynamic == "shape" else w]
    values = {
        "model": runner.name,
        "source": runner.loaded.source,
        "random_weights": bool(runner.random_weights),
        "stride": runner.stride,
        "strides": strides,
        "outputs": outputs,
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": str(runner.dtype).removeprefix("torch."),
                  "layout": "NCHW, RGB, float in [0, 1] (uint8 / 255)"},
        "imgsz": request.imgsz,
        "input_hw": [h, w],
        "letterbox": request.letterbox,
        "dynamic": request.dynamic or "none",
        "fused": bool(runner.fused),
        "format": request.fmt,
    }
    return {METADATA_PREFIX + key: json.dumps(value) for key, value in values.items()}


def parity_inputs(request: ExportRequest, stride: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Seeded inputs for the parity check: the traced shape, another batch when it is dynamic, and a
    letterboxed (non-square) shape when height and width are."""
    h, w = request.input_hw
    shapes = [(request.batch, h, w)]
    if request.dynamic:
        shapes.append((request.batch + 2, h, w))
    if request.dynamic == "shape":
        shapes.append((1, max(stride, (h * 3 // 4) // stride * stride), w))
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 3, hh, ww), generator=generator, dtype=torch.uint8).float() / 255)
            .to(device, dtype) for n, hh, ww in shapes]


def export_model(runner: Any, request: ExportRequest, report: Callable[[str], None] = print) -> dict[str, float]:
    """Write ``request.out`` and check it against the engine; returns the worst relative error per output.

    The file is written next to its destination and moved into place only once the parity check passed, so a
    failed export leaves no file behind.

    Args:
        runner: the ``DeviceRunner`` holding the model (device, dtype and fusion as it serves).
        request: what to export.
        report: where the per-output parity lines go.
    """
    outputs = {layer.name: layer.index for layer in request.layers}
    graph = ExportGraph(runner.layers, outputs, detect=request.detect, as_dict=request.fmt == "torchscript").eval()
    names = graph.names
    example = parity_inputs(request, runner.stride, runner.dtype, runner.device)[0]
    meta = metadata(runner, request)
    request.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{request.out.name}.", suffix=".part", dir=request.out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 is for the half-written file, not for the export
    try:
        if request.fmt == "onnx":
            onnx = require("onnx", "--format onnx")
            require("onnxruntime", "the parity check of --format onnx")
            proto = onnx.load_from_string(onnx_bytes(graph, example, len(names), request.dynamic))
            name_outputs(proto, names)
            for key, value in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, and still works
                traced = torch.jit.trace(graph, example, strict=False, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files=meta)
        errors: dict[str, float] = {}
        graph.as_dict = True
        for x in parity_inputs(request, runner.stride, runner.dtype, runner.device):
            with torch.inference_mode():
                want = {name: t.float().cpu().numpy() for name, t in graph(x).items()}
            got = (run_onnx(tmp, x.cpu().numpy(), runner.device) if request.fmt == "onnx"
                   else run_torchscript(tmp, x))
            for name, err in worst_errors(got, want).items():
                errors[name] = max(errors.get(name, 0.0), err)
        tolerance = TOLERANCES[runner.dtype]
        for name, err in errors.items():
            report(f"parity  {name:<10} worst relative error {err:.2e} (limit {tolerance:g})")
        check_parity(errors, tolerance)
        tmp.replace(request.out)
    finally:
        tmp.unlink(missing_ok=True)
    return errors
