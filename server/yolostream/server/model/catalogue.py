"""The layer catalogue and the names a request may use.

Feature metadata (role, stride, shape, aliases) is kept apart from the network: it is derived from the graph of
whatever model was loaded, never hard-coded per model size, so ``backbone``, ``C3..C6`` and ``P3..P6`` mean the
same thing for yolov5n, a P6 model or a legacy v5.0 file (see DESIGN.md §Naming).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.card import LayerInfo, ResolvedLayer, alias_table, resolve_layers
from .plan import layer_inputs, make_plan, run_plan

__all__ = ["LayerInfo", "ResolvedLayer", "alias_table", "build_catalogue", "resolve_layers"]


def _short_type(module: nn.Module) -> str:
    dotted = getattr(module, "type", None) or type(module).__name__
    return str(dotted).rsplit(".", 1)[-1]


def _is_detect(module: nn.Module) -> bool:
    return type(module).__name__ in ("Detect", "Segment")


@torch.inference_mode()
def _probe(layers: nn.Sequential, input_hw: tuple[int, int]) -> dict[int, tuple[int, ...]]:
    """Output shape (C, H, W) of every non-Detect layer for one input of ``input_hw``."""
    first = next(layers.parameters())
    feature_layers = [i for i in range(len(layers)) if not _is_detect(layers[i])]
    x = torch.zeros((1, 3, *input_hw), dtype=first.dtype, device=first.device)
    if x.device.type == "cuda" and first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    outputs = run_plan(layers, x, make_plan(layers, feature_layers))
    return {i: tuple(int(d) for d in t.shape[1:]) for i, t in outputs.items()}


def build_catalogue(model: nn.Module, input_hw: tuple[int, int]) -> list[LayerInfo]:
    """Describe every layer of ``model`` for an input of ``input_hw`` (a multiple of the model stride)."""
    layers: nn.Sequential = model.model
    shapes = _probe(layers, input_hw)
    strides = {i: round(input_hw[0] / s[1]) if len(s) == 3 and s[1] else 0 for i, s in shapes.items()}
    backbone_end = int(model.backbone_end)
    aliases = _aliases(layers, backbone_end, strides)
    rows: list[LayerInfo] = []
    for i, module in enumerate(layers):
        source = layer_inputs(i, module.f) if i else (-1,)
        params = int(getattr(module, "np", sum(p.numel() for p in module.parameters())))
        if _is_detect(module):
            role = "detect"
            level_strides = [strides[j] for j in source]
            rows.append(LayerInfo(i, _short_type(module), tuple(source), params, role,
                                  int(module.no * module.na), max(level_strides), (), ()))
            continue
        role = "backbone" if i <= backbone_end else "neck"
        shape = shapes[i]
        rows.append(LayerInfo(i, _short_type(module), tuple(source) if i else (), params, role,
                              shape[0], strides[i], shape, tuple(aliases.get(i, ()))))
    return rows


def _aliases(layers: nn.Sequential, backbone_end: int, strides: dict[int, int]) -> dict[int, list[str]]:
    """Derive ``backbone``, ``C<k>`` and ``P<k>`` from the graph (k = log2 of the stride)."""
    names: dict[int, list[str]] = {backbone_end: ["backbone"]}
    last_at_stride: dict[int, int] = {}
    for i in range(backbone_end + 1):
        last_at_stride[strides[i]] = i
    for stride, i in sorted(last_at_stride.items()):
        level = int(round(math.log2(stride))) if stride > 0 else 0
        if stride >= 8 and 2**level == stride:
            names.setdefault(i, []).append(f"C{level}")
    detect = [m for m in layers if _is_detect(m)]
    if detect:
        head = detect[-1]
        for j in layer_inputs(head.i, head.f):
            level = int(round(math.log2(strides[j])))
            names.setdefault(j, []).append(f"P{level}")
    return names
