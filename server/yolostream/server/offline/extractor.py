"""YOLOv5 features inside your own PyTorch code: a truncated, optionally trainable backbone with ``feature_info``.

``feature_extractor(weights="yolov5s.pt", layers=["P3", "P4", "P5"])`` gives an ``nn.Module`` whose forward takes a
float (N, 3, H, W) RGB batch in [0, 1] and returns name → tensor, running only the layers those features need (the
same ``TruncatedModel`` that the server and ``export`` run). ``extract`` is the numpy convenience on top of it:
BGR uint8 frames in, upstream's letterbox, float32 arrays and the letterbox geometry out; the ``extract`` command is
built on it. Weights go through the server's safe loader, so no checkpoint can run code while it loads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..model.catalogue import build_catalogue, resolve_layers
from ..model.graph import input_stride
from ..model.loader import LoadedModel, load_model
from ..model.modules import fuse_model
from ..model.truncated import TruncatedModel
from ..common.preprocess import Letterbox, prepare


@dataclass(frozen=True)
class FeatureInfo:
    """One output, in timm's spirit: its name as requested, layer index, channels, stride (reduction), module type."""

    name: str
    index: int
    channels: int
    stride: int
    type: str


class FeatureInfoList(tuple):
    """The outputs' ``FeatureInfo`` in forward order, with timm-style column accessors."""

    def names(self) -> list[str]:
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

    features: dict[str, np.ndarray]
    letterbox: Letterbox
    strides: dict[str, int]

    def cell_to_original(self, name: str, row: int, col: int, clip: bool = True) -> np.ndarray:
        """The frame region (x1, y1, x2, y2) under feature cell (row, col) of output ``name`` (its footprint)."""
        return self.letterbox.cell_to_original(row, col, self.strides[name], clip=clip)


class FeatureExtractor(TruncatedModel):
    """A YOLOv5 model cut after the requested layers: ``forward(x)`` → {name: tensor}; see ``feature_extractor``.

    Args:
        loaded: a model from ``load_model`` (its layers are taken over, not copied).
        layers: names as everywhere in yolostream: indices, ``backbone``, ``C3``..``C6``, ``P3``..``P6``, ``all``; a
            list, or one comma-separated string as on the command line.
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
        resolved = resolve_layers(catalogue, layers.split(",") if isinstance(layers, str) else layers)
        if fuse:
            fuse_model(model)
        super().__init__(model.model, {r.name: r.index for r in resolved})
        rows = {row.index: row for row in catalogue}
        self.feature_info = FeatureInfoList(
            FeatureInfo(r.name, r.index, rows[r.index].out_channels, rows[r.index].stride, rows[r.index].type)
            for r in resolved
        )
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
        device: where the model lives (``"cpu"``, ``"cuda"``, a ``torch.device``).
    """
    extractor = FeatureExtractor(load_model(weights, cfg), layers, trainable=trainable, fuse=fuse, imgsz=imgsz)
    return extractor.to(torch.device(device))
