"""The YOLOv5 layer graph: an ``nn.Sequential`` of layers routed by their YAML ``from`` entries.

``model.<i>.…`` state_dict keys, the per-layer ``.i/.f/.type/.np`` attributes and the ``save`` list follow
upstream, so checkpoints load key-for-key and the truncated-forward planner can read the routing off the
layers. Detect strides are measured, not assumed, by one probe forward at build time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .config import REPEATS_INSIDE, LayerSpec, ModelSpec, load_config, module_class, parse_model
from .modules import BN_EPS, BN_MOMENTUM, Detect, default_activation, fuse_model

PROBE_SIZE = 256


def input_stride(model: nn.Module) -> int:
    """What every input side must be a multiple of: the model's largest level stride, and at least 32 (upstream's
    rule, so a model without a Detect head still gets whole cells at every level)."""
    return max(int(model.stride.max()), 32)


class YoloModel(nn.Module):
    """A YOLOv5 detection graph built from a config (see ``build_model``).

    Attributes: ``model`` (the layers), ``yaml`` (the config, with ``ch``), ``save`` (layers whose outputs
    later layers read), ``specs`` (resolved ``LayerSpec`` per layer, with params), ``backbone_end`` (index of the
    last backbone layer), ``detect_index`` (Detect's index or None), ``stride`` (Detect's level strides, fp32;
    ``[32.]`` without a Detect, as upstream), ``names`` (class index → name), ``nc``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        layers: list[nn.Module] = []
        specs: list[LayerSpec] = []
        with default_activation(spec.activation):
            for layer_spec in spec.layers:
                layer = _build_layer(layer_spec)
                if isinstance(layer, Detect):
                    layer.inplace = spec.inplace
                layers.append(layer)
                specs.append(dataclasses.replace(layer_spec, params=layer.np))
        self.model = nn.Sequential(*layers)
        _init_batchnorm(self.model)
        self.yaml = spec.yaml
        self.save = list(spec.save)
        self._save_set = frozenset(spec.save)
        self.specs = specs
        self.nc = spec.nc
        self.inplace = spec.inplace
        self.backbone_end = spec.backbone_len - 1
        detects = [i for i, m in enumerate(self.model) if isinstance(m, Detect)]
        self.detect_index = detects[-1] if detects else None
        self.names = _class_names(spec.yaml, spec.nc)
        self.stride = self._init_detect(spec.ch) if self.detect_index is not None else torch.tensor([32.0])

    def forward(self, x: torch.Tensor):
        """Run every layer; returns Detect's output (``(decoded, raw)`` in eval, raw maps in training)."""
        return self._forward_once(x)

    def fuse(self) -> YoloModel:
        """Fold BatchNorm into every Conv/DWConv (in place) for faster inference."""
        fuse_model(self)
        return self

    def _forward_once(self, x: torch.Tensor, stop: int | None = None):
        """Upstream routing; with ``stop``, return the (routed) input of layer ``stop`` instead of running it."""
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            if layer.i == stop:
                return x
            x = layer(x)
            outputs.append(x if layer.i in self._save_set else None)
        return x

    def _init_detect(self, ch: int) -> torch.Tensor:
        """Measure level strides with a zero-input probe, order the anchors by them, convert anchors to grid units."""
        detect: Detect = self.model[self.detect_index]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                levels = self._forward_once(torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE), stop=self.detect_index)
        except RuntimeError as err:
            raise ValueError(f"the config does not run on a {PROBE_SIZE}x{PROBE_SIZE} input: {err}") from err
        finally:
            self.train(was_training)
        stride = torch.tensor([PROBE_SIZE / t.shape[-2] for t in levels], dtype=torch.float32)
        with torch.no_grad():
            area = detect.anchors.prod(-1).mean(-1)
            d_area, d_stride = area[-1] - area[0], stride[-1] - stride[0]
            if d_area and d_area.sign() != d_stride.sign():
                detect.anchors.copy_(detect.anchors.flip(0))
            detect.anchors /= stride.view(-1, 1, 1)
        detect.stride = stride.clone()
        return stride


def _build_layer(spec: LayerSpec) -> nn.Module:
    """Instantiate one layer (n copies in a Sequential for modules that do not repeat internally)."""
    cls = module_class(spec.module)
    copies = 1 if spec.module in REPEATS_INSIDE else spec.n
    try:
        layer = nn.Sequential(*(cls(*spec.args) for _ in range(copies))) if copies > 1 else cls(*spec.args)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"layer {spec.index}: cannot build {spec.module}{tuple(spec.args)}: {err}") from err
    layer.i, layer.f, layer.type = spec.index, spec.from_, spec.type
    layer.np = sum(p.numel() for p in layer.parameters())
    return layer


def _init_batchnorm(layers: nn.Module) -> None:
    """Every BatchNorm2d gets YOLOv5's eps/momentum, including YAML-level ``nn.BatchNorm2d`` rows."""
    for module in layers.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = BN_EPS, BN_MOMENTUM


def _class_names(cfg: dict, nc: int) -> dict[int, str]:
    names = cfg.get("names")
    if isinstance(names, dict) and len(names) == nc:
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, list) and len(names) == nc:
        return dict(enumerate(map(str, names)))
    return {i: str(i) for i in range(nc)}


def build_model(cfg: str | Path | dict, ch: int | None = None) -> YoloModel:
    """Build a randomly initialised model from a config dict, YAML path or built-in name (``"yolov5s"``).

    ``ch`` (input channels) defaults to the config's ``ch``, else 3. The YAML's ``activation:`` applies to this
    build only. The model is left in training mode, like any fresh ``nn.Module``.
    """
    return YoloModel(parse_model(load_config(cfg), ch))
