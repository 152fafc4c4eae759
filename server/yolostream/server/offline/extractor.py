"""YOLOv5 features inside your own PyTorch code: a truncated, optionally trainable backbone with ``feature_info``.

``feature_extractor(weights="yolov5s.pt", layers=["P3", "P4", "P5"])`` gives an ``nn.Module`` whose forward takes a
float (N, 3, H, W) RGB batch in [0, 1] and returns name → tensor, running only the layers those features need (the
same ``TruncatedModel`` that the server and ``export`` run). Outputs are keyed as they were asked for: ``"P3"`` by
``"P3"``, ``9`` by ``9``. The forward refuses, with one message naming the rule, an input that would otherwise fail
deep inside torch or, worse, silently give maps of the wrong size. ``extract`` is the numpy convenience on top of it:
BGR uint8 frames in, upstream's letterbox, float32 arrays and the letterbox geometry out; the ``extract`` command is
built on it. Weights go through the server's safe loader, so no checkpoint can run code while it loads.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..common.card import LayerInfo, ResolvedLayer
from ..common.errors import quote
from ..common.preprocess import Letterbox, prepare
from ..model.catalogue import build_catalogue, resolve_layers
from ..model.graph import input_stride
from ..model.loader import LoadedModel, load_model
from ..model.modules import fuse_model
from ..model.placement import resolve_device
from ..model.truncated import TruncatedModel


@dataclass(frozen=True)
class FeatureInfo:
    """One output, in timm's spirit: its key as requested (an int for an index given as an int, else the str),
    layer index, channels, stride (reduction), module type. ``out[info.name]`` is that output of the forward."""

    name: str | int
    index: int
    channels: int
    stride: int
    type: str


class FeatureInfoList(tuple):
    """The outputs' ``FeatureInfo`` in forward order, with timm-style column accessors."""

    def names(self) -> list[str | int]:
        return [f.name for f in self]

    def indices(self) -> list[int]:
        return [f.index for f in self]

    def channels(self) -> list[int]:
        return [f.channels for f in self]

    def strides(self) -> list[int]:
        return [f.stride for f in self]

    def reduction(self) -> list[int]:
        """timm's name for the strides."""
        return self.strides()


@dataclass
class ImageFeatures:
    """One image's features (name → float32 (C, H, W)) and how its pixels map to the model input.

    ``letterbox`` is the geometry the client receives (``letterbox.as_dict()`` is its dict); ``strides`` maps each
    output name to its layer's stride, so that a cell can be mapped back to the frame.
    """

    features: dict[str | int, np.ndarray]
    letterbox: Letterbox
    strides: dict[str | int, int]

    def cell_to_original(self, name: str | int, row: int, col: int, clip: bool = True) -> np.ndarray:
        """The frame region (x1, y1, x2, y2) under feature cell (row, col) of output ``name`` (its footprint).

        Args:
            name: an output of this result, keyed as it was asked for (``"P3"``, ``9``).
            row, col: the cell, within the output's (H, W) map: ``0 <= row < H``, ``0 <= col < W``.
            clip: limit the region to the frame (a cell over the letterbox padding maps partly or wholly outside it).

        Raises ValueError for a name this result does not hold (the message lists those it does) and IndexError for
        a cell outside the map (the message gives the valid range): a zero-size or off-frame box would otherwise
        pass unnoticed.
        """
        if name not in self.strides or name not in self.features:
            shown = repr(name) if isinstance(name, int) else quote(name)
            held = ", ".join(repr(k) for k in self.features)
            raise ValueError(f"no output {shown} in this result: it holds {held}")
        shape = np.shape(self.features[name])
        if len(shape) < 2:
            raise ValueError(f"output {name!r} has shape {shape}, not a (C, H, W) map: it has no cells")
        height, width = shape[-2:]
        for what, value, size in (("row", row, height), ("col", col, width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
            if not 0 <= value < size:
                raise IndexError(f"cell ({row}, {col}) is outside output {name!r}, whose map is {height}x{width}: "
                                 f"valid cells are rows 0..{height - 1} and columns 0..{width - 1}")
        return self.letterbox.cell_to_original(int(row), int(col), self.strides[name], clip=clip)


class FeatureExtractor(TruncatedModel):
    """A YOLOv5 model cut after the requested layers: ``forward(x)`` → {key: tensor}; see ``feature_extractor``.

    ``forward`` takes float RGB in [0, 1], shaped (N, 3, H, W), with H and W multiples of ``input_stride`` (the
    largest stride among the layers that run: 32 once the forward reaches the end of a P5 backbone, 64 for P6
    models), in the weights' dtype and on their device; anything else raises one TypeError or ValueError naming the
    rule. The checks read only shapes, dtypes and devices, so tracing, ``torch.export`` and ``torch.compile`` capture
    the same graph as before (shapes are static there, except a symbolic batch, which is never checked).

    Args:
        loaded: a model from ``load_model`` (its layers are taken over, not copied).
        layers: names as everywhere in yolostream: indices, ``backbone``, ``C3``..``C6``, ``P3``..``P6``, ``all``; a
            list, or one comma-separated string as on the command line. Each output is keyed by what was passed:
            an int by that int (``9``), a str by that str (``"9"``, ``"P3"``); ``all`` gives every layer keyed by its
            index as a str. ``torch.jit.trace`` can only return str keys, so trace an extractor built from strings.
        trainable: leave parameters trainable and let ``.train()`` put BatchNorm in training mode; otherwise the
            parameters are frozen and the module stays in eval mode whatever ``.train()`` asks, so a frozen backbone
            inside a model being trained keeps its BatchNorm statistics.
        fuse: fold BatchNorm into the convolutions (faster, equal within 1e-4 of each layer's scale). Defaults to
            ``not trainable``; fusing a trainable model is refused, since the folded statistics could not train.
        imgsz: default input size for ``extract`` (rounded up to the stride, as upstream).
    """

    def __init__(self, loaded: LoadedModel, layers: str | Iterable[str | int], *, trainable: bool = False,
                 fuse: bool | None = None, imgsz: int = 640) -> None:
        fuse = not trainable if fuse is None else bool(fuse)
        if fuse and trainable:
            raise ValueError("fuse=True folds BatchNorm into frozen conv weights: use it only with trainable=False")
        model = loaded.model.eval()
        stride = input_stride(model)
        catalogue = build_catalogue(model, (2 * stride, 2 * stride))
        outputs = _keyed_outputs(catalogue, layers.split(",") if isinstance(layers, str) else list(layers))
        if fuse:
            fuse_model(model)
        super().__init__(model.model, {key: r.index for key, r in outputs.items()})
        rows = {row.index: row for row in catalogue}
        self.feature_info = FeatureInfoList(
            FeatureInfo(key, r.index, rows[r.index].out_channels, rows[r.index].stride, rows[r.index].type)
            for key, r in outputs.items()
        )
        self.input_stride = max(rows[i].stride for i in self.plan.steps)
        self.model_name = loaded.name
        self.source = loaded.source
        self.random_weights = loaded.random_weights
        self.stride = stride
        self.imgsz = int(imgsz)
        self.fused = fuse
        self.trainable = bool(trainable)
        self.requires_grad_(self.trainable)
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Training mode for a trainable extractor; a frozen one stays in eval mode (see the class doc)."""
        return super().train(mode and self.trainable)

    def forward(self, x: torch.Tensor) -> dict[str | int, torch.Tensor]:
        """The requested outputs of ``x`` (float RGB in [0, 1], (N, 3, H, W)), keyed as asked, in requested order."""
        self.check_input(x)
        return super().forward(x)

    def by_index(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The same forward keyed by layer index (each layer once), with the same input checks."""
        self.check_input(x)
        return super().by_index(x)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise TypeError or ValueError, naming the rule, unless ``x`` is a valid input for ``forward``.

        Without it, a uint8 batch fails inside a convolution with a dtype message, a 100x100 batch fails at a Concat
        with "Sizes of tensors must match", and a 250x320 batch silently gives maps whose cells no longer line up
        with the image. Only the type, dtype, device and shape are read (never the values), so the checks cost
        nothing and stay out of traced, exported and compiled graphs.
        """
        if torch.jit.is_tracing():
            if any(isinstance(key, int) for key in self.output_names):
                as_str = [str(key) for key in self.output_names]
                raise TypeError(f"torch.jit.trace can only return str keys, and this extractor's keys are "
                                f"{list(self.output_names)}: build it with layers={as_str} to trace it (torch.export "
                                "and torch.compile take int keys)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_input(x)
        else:
            self._check_input(x)

    def _check_input(self, x: torch.Tensor) -> None:
        rule = (f"FeatureExtractor takes float RGB in [0, 1] shaped (N, 3, H, W), H and W multiples of "
                f"{self.input_stride}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{rule}; got a {type(x).__name__}, not a torch.Tensor (.extract() takes BGR uint8 "
                            "numpy frames)")
        if not x.is_floating_point():
            raise TypeError(f"{rule}; got dtype {x.dtype}: convert uint8 images with x.float() / 255 (or pass BGR "
                            "uint8 frames to .extract(), which letterboxes them)")
        if x.dim() != 4 or x.shape[1] != 3:
            hint = ": add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 and x.shape[0] == 3 else ""
            raise ValueError(f"{rule}; got shape {tuple(x.shape)}{hint}")
        height, width = x.shape[2], x.shape[3]
        step = self.input_stride
        if height < step or width < step or height % step or width % step:
            raise ValueError(f"{rule}; got {height}x{width}: {step} is the stride of the deepest layer this "
                             f"extractor runs, so other sizes give maps that do not line up with the image. Pad or "
                             f"resize to e.g. {_round_up(height, step)}x{_round_up(width, step)} (.extract() "
                             "letterboxes for you)")
        weight = next(self.parameters())
        if x.device != weight.device:
            raise ValueError(f"the input is on {x.device} but the model is on {weight.device}: move it with "
                             f"x.to({str(weight.device)!r})")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"the input is {x.dtype} but the weights are {weight.dtype}: convert it with "
                            f"x.to({weight.dtype}) (or run under torch.autocast)")

    def extract(self, images: Sequence[np.ndarray], *, imgsz: int | None = None, letterbox: str = "auto",
                batch_size: int = 8,
                forward: Callable[[torch.Tensor], dict] | None = None) -> list[ImageFeatures]:
        """Features of BGR uint8 (H, W, 3) images as float32 numpy, one ``ImageFeatures`` per image, in order.

        Each image is letterboxed exactly as upstream's detect.py does; images of the same letterboxed shape run
        together, at most ``batch_size`` per forward, in eval mode and without autograd.

        Args:
            images: BGR uint8 arrays (OpenCV's layout), any sizes.
            imgsz: model input size (default: the extractor's ``imgsz``), rounded up to the stride.
            letterbox: ``auto`` (minimal stride-multiple rectangle, as detect.py) or ``square`` (full imgsz).
            batch_size: most images per forward.
            forward: what runs a prepared batch (default: this module); ``extract --backend onnxruntime`` passes
                the same graph as an ONNX Runtime session (``offline.extract.onnxruntime_forward``).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        prepared = [prepare(image, imgsz or self.imgsz, self.stride, letterbox) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, (chw, _) in enumerate(prepared):
            groups.setdefault(chw.shape, []).append(k)
        strides = {f.name: f.stride for f in self.feature_info}
        results: dict[int, ImageFeatures] = {}
        with self._evaluating(), torch.inference_mode():
            for members in groups.values():
                for start in range(0, len(members), batch_size):
                    chunk = members[start:start + batch_size]
                    outputs = (forward or self)(self.to_input(np.stack([prepared[k][0] for k in chunk])))
                    arrays = {name: t.to(torch.float32).cpu().numpy() for name, t in outputs.items()}
                    for row, k in enumerate(chunk):
                        features = {name: np.array(a[row]) for name, a in arrays.items()}
                        results[k] = ImageFeatures(features, prepared[k][1], strides)
        return [results[k] for k in range(len(images))]

    def to_input(self, batch: np.ndarray) -> torch.Tensor:
        """A (N, 3, H, W) RGB uint8 batch as the model input: on the model's device and dtype, then / 255 (upstream's
        order), channels_last when the weights are."""
        weight = next(self.parameters())
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(weight.device).to(weight.dtype).div_(255)
        if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was_training)


def feature_extractor(
    weights: str | Path | None = None,
    cfg: str | Path | dict | None = None,
    layers: str | Iterable[str | int] = ("P3", "P4", "P5"),
    *,
    trainable: bool = False,
    fuse: bool | None = None,
    imgsz: int = 640,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Load a YOLOv5 model safely and cut it down to the layers that ``layers`` need.

    Args:
        weights: an official YOLOv5 ``.pt`` (any release, or a mid-training file: ``ema`` is used), a release name
            such as ``"yolov5s.pt"`` to download, or a plain state_dict file together with ``cfg``.
        cfg: a yolov5-format YAML or a built-in name (``yolov5n`` … ``yolov5x6``); alone it gives seeded random
            weights (``random_weights`` is then True). Neither: the built-in yolov5n with random weights.
        layers: the outputs, in order: indices, ``backbone``, ``C3``..``C6``, ``P3``..``P6``, or ``all`` (a list, or
            a comma-separated string such as ``"P3,P4,P5"``).
        trainable: gradients for the parameters and BatchNorm training under ``.train()``; frozen by default.
        fuse: fold BatchNorm into the convolutions; defaults to True when frozen, and must be False when trainable.
        imgsz: default input size of ``extract``.
        device: where the model lives: ``"cpu"``, ``"cuda"``/``"cuda:N"``, ``"auto"`` (CUDA when present), another
            torch device type, or a ``torch.device``. CUDA without a CUDA device is a ValueError saying so, as the
            ``--device`` flag is, checked before the weights load.
    """
    target = _device(device)
    extractor = FeatureExtractor(load_model(weights, cfg), layers, trainable=trainable, fuse=fuse, imgsz=imgsz)
    return extractor.to(target)


def _device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``: ``auto`` and CUDA go through the CLI's ``resolve_device`` (one message for
    a missing GPU everywhere), other device types (``mps``, ``xpu`` …) straight to torch."""
    name = str(device).strip().lower()
    if name == "auto" or name == "cpu" or name.startswith("cuda"):
        return resolve_device(name, option="device=")
    return torch.device(device)


def _keyed_outputs(catalogue: Sequence[LayerInfo], requested: list[object]) -> dict[str | int, ResolvedLayer]:
    """Bind each requested layer to its output key: the int itself for an int (``out[9]``), the name for a str.

    The whole request is resolved first, so an unknown name or an empty request raises the usual ValueError that
    lists the valid layers. A key asked for twice appears once, where it was first asked for.
    """
    resolve_layers(catalogue, requested)
    outputs: dict[str | int, ResolvedLayer] = {}
    for item in requested:
        as_int = isinstance(item, numbers.Integral) and not isinstance(item, bool)
        for layer in resolve_layers(catalogue, [item]):
            outputs.setdefault(int(item) if as_int else layer.name, layer)
    return outputs


def _round_up(value: int, step: int) -> int:
    return max(step, math.ceil(value / step) * step)

