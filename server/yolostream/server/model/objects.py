"""One feature vector per object, from the same forward pass as the detections (issue 9).

Trackers and re-identification heads want an appearance vector per box, not a feature map. The backbone and neck
have already run for the detections, so the vectors are read from layer outputs the forward produced anyway:

- ``anchor`` mode (default for the server's own detections, as ultralytics does): on the Detect level that
  produced a detection, the feature vector at its anchor's grid cell; on every other requested layer (and for
  client boxes, which have no anchor), the cell under the box centre at that layer's stride (see *One box*
  below for which box and which cell).
- ``roi`` mode: RoIAlign with ``aligned=True`` semantics: k×k bilinear samples at the bin centres of the box
  (torchvision's ``roi_align(output_size=k, spatial_scale=1/stride, sampling_ratio=1, aligned=True)``), averaged
  to a C-vector, or flattened to C·k·k in (C, k, k) order.

The vectors of all requested layers are concatenated into one (N, D) tensor per image; ``ObjectFeatures.slices``
says which columns belong to which layer. With ``normalize`` each layer's slice is scaled to L2 norm 1/√L (L
layers), so every row has norm 1 and the dot product of two rows is the mean of the per-layer cosine
similarities.

One box, in both modes and for detections and client boxes alike: vectors are read for the box that is returned,
i.e. the box in original-frame pixels, clipped to the frame (a client's boxes are validated and clipped by
``object_request.client_boxes``, the detector's by ``detections.scale_boxes``), then mapped to model-input pixels
with :func:`detections.unscale_boxes` (x_in = x · gain + (input_w − orig_w · gain) / 2, the inverse of upstream's
``scale_boxes`` with its ideal half pad). The decoded box before clipping is never used: it can reach past the
frame, and its centre then lies in another cell than the returned box's (issue 21). So a client sending a
detection back as its own box gets the very same vector on every layer, except in anchor mode on the detection's
own Detect level, where the detection is read at its anchor's cell and the client box at its centre's.

The cell under a centre: (cx, cy) = ((x1 + x2) / 2, (y1 + y2) / 2) in model-input pixels (float32), column
⌊cx / s⌋ and row ⌊cy / s⌋ for the layer's stride s (input size / map size, a power of two, so the division is
exact), each clamped to the map. Cells are half-open, [k·s, (k+1)·s): a centre exactly on the boundary between
two cells belongs to the right (lower) one, and a centre on the input's right (bottom) edge, or past it, reads the
last column (row); one left of (above) the input, the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..common.object_request import CODED, ObjectOptions
from . import detections as det
from .placement import TORCH_DTYPES

#: Most elements (boxes × samples × channels) one RoIAlign gather holds; bounds its memory (~16 MB).
ROI_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ObjectLayer:
    """A layer object vectors are read from: its requested ``name``, model ``index``, and ``level``, the Detect
    level whose input it is (0 for P3 …), or None for any other layer."""

    name: str
    index: int
    level: int | None = None


@dataclass
class ObjectFeatures:
    """Per-image (N, D) vectors and each layer's columns as ``(name, layer index, stride, start, stop)`` (the
    tuple ``wire.fill_objects`` takes)."""

    vectors: list[torch.Tensor]
    slices: list[tuple[str, int, int, int, int]] = field(default_factory=list)


@dataclass
class FrameObjects:
    """Everything object-related for one frame, on the device the features were on.

    ``boxes`` (N, 4) float32 xyxy in original-frame pixels (unrounded, clipped); ``scores`` (N,) float32 and
    ``classes`` (N,) int64 for detections, None for client boxes; ``rows`` (N,) int64 anchor rows for
    detections, None for client boxes; ``vectors`` (N, D) in the requested dtype (float32 for ``uint8``, whose codes
    the device makes per frame from them), or None when no vectors were asked for; ``slices`` per layer as in
    :class:`ObjectFeatures`; ``cells`` (N, 4) int64 (level, anchor, gy, gx) of each detection's anchor
    (:func:`detections.row_cells` of ``rows``), None for client boxes: which anchor made a detection, returned to the
    client (issue 21).
    """

    boxes: torch.Tensor
    scores: torch.Tensor | None
    classes: torch.Tensor | None
    rows: torch.Tensor | None
    vectors: torch.Tensor | None
    slices: list[tuple[str, int, int, int, int]]
    cells: torch.Tensor | None = None


def object_layers(model: torch.nn.Module, layers: Sequence[tuple[str, int]]) -> list[ObjectLayer]:
    """Bind ``(name, index)`` pairs to :class:`ObjectLayer`, marking the Detect inputs with their level."""
    levels = {j: k for k, j in enumerate(det.detect_input_layers(model))}
    return [ObjectLayer(name, index, levels.get(index)) for name, index in layers]


def default_object_layers(model: torch.nn.Module) -> list[ObjectLayer]:
    """The default layers of object vectors: Detect's inputs, named P<log2 stride> (P3, P4, P5[, P6])."""
    strides = [int(s) for s in model.stride.tolist()]
    return object_layers(model, [(f"P{int(round(math.log2(s)))}", j)
                                 for s, j in zip(strides, det.detect_input_layers(model))])


def centre_cells(boxes: torch.Tensor, map_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(gy, gx) int64 of the cell under each box centre on a map of ``map_hw`` cells over an input of ``input_hw``.

    ``boxes`` (N, 4) xyxy in model-input pixels. The rule of the module docstring: ⌊centre / stride⌋ per axis,
    clamped to the map, so a centre on a cell boundary goes to the right (lower) cell. One function for detections
    and client boxes, so both always agree on the cell.
    """
    h, w = map_hw
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    gx = torch.floor(cx / (input_hw[1] / w)).long().clamp_(0, w - 1)
    gy = torch.floor(cy / (input_hw[0] / h)).long().clamp_(0, h - 1)
    return gy, gx


def anchor_vectors(feature: torch.Tensor, layer: ObjectLayer, image: torch.Tensor, boxes: torch.Tensor,
                   cells: torch.Tensor | None, input_hw: tuple[int, int]) -> torch.Tensor:
    """(N, C) vectors of ``feature`` (B, C, H, W) for boxes of images ``image`` (N,).

    A box whose ``cells`` row (level, anchor, gy, gx) names this layer's Detect level is read at (gy, gx); any
    other box (or every box, when ``cells`` is None) at the cell under its centre (:func:`centre_cells`; ``boxes``
    in input pixels, the returned boxes mapped to the input, never the decoded ones).
    """
    gy, gx = centre_cells(boxes, (int(feature.shape[-2]), int(feature.shape[-1])), input_hw)
    if cells is not None and layer.level is not None:
        own = cells[:, 0] == layer.level
        gy = torch.where(own, cells[:, 2], gy)
        gx = torch.where(own, cells[:, 3], gx)
    return feature[image, :, gy, gx]


def roi_align(feature: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, size: int,
              spatial_scale: float) -> torch.Tensor:
    """RoIAlign, aligned=True, one bilinear sample per bin: (N, C, size, size) float32.

    ``feature`` (B, C, H, W); ``image`` (N,) which image each box is on; ``boxes`` (N, 4) xyxy in input pixels;
    ``spatial_scale`` cells per input pixel. Uses torchvision.ops.roi_align when it imports, else
    :func:`roi_align_torch` (same semantics).
    """
    ops = det.torchvision_ops()
    feature = feature.float()
    if ops is None:
        return roi_align_torch(feature, image, boxes, size, spatial_scale)
    rois = torch.cat((image[:, None].to(boxes.dtype), boxes), 1).float()
    return ops.roi_align(feature, rois, output_size=size, spatial_scale=spatial_scale, sampling_ratio=1, aligned=True)


def roi_vectors(feature: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, size: int, spatial_scale: float,
                flatten: bool = False) -> torch.Tensor:
    """Roi-mode vectors of one layer: the mean of :func:`roi_align`'s size×size samples, (N, C) float32, or with
    ``flatten`` all of them, (N, C·size·size) in (C, size, size) order. Arguments as for :func:`roi_align`."""
    if flatten:
        return roi_align(feature, image, boxes, size, spatial_scale).flatten(1)
    if det.torchvision_ops() is not None:
        return roi_align(feature, image, boxes, size, spatial_scale).mean((2, 3))
    return roi_mean_torch(feature.float(), image, boxes, size, spatial_scale)


def roi_mean_torch(feature: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, size: int,
                   spatial_scale: float) -> torch.Tensor:
    """The mean of :func:`roi_align_torch`'s samples without materialising them: (N, C).

    Bilinear sampling on a grid of bin centres is separable: the mean over size×size samples is
    Σ_y Σ_x a_y · b_x · F[:, y, x], with a (N, H) and b (N, W) the samples' summed row and column weights (a
    sample outside the map weighs 0 on its axis, which zeroes it as RoIAlign does). That is one matrix product
    per image instead of 4·size² gathers of C values per box (on one CPU thread, 300 boxes at 7×7 on yolov5n's
    P3–P5 at 640: ~30 ms instead of ~170 ms, measured with bench/objects_bench.py's setup).
    """
    n_box = boxes.shape[0]
    _, c, h, w = feature.shape
    out = feature.new_zeros(n_box, c)
    if n_box == 0:
        return out
    b32 = boxes.float()
    rows = feature.new_zeros(n_box, h)
    cols = feature.new_zeros(n_box, w)
    for weights, lo_key, hi_key, extent in ((rows, 1, 3, h), (cols, 0, 2, w)):
        low, high, w_low, w_high, inside = _axis_samples(b32[:, lo_key], b32[:, hi_key], size, spatial_scale,
                                                         extent)
        weights.scatter_add_(1, low, w_low * inside / size)
        weights.scatter_add_(1, high, w_high * inside / size)
    chunk = max(1, ROI_CHUNK_ELEMENTS // (c * w))
    for b in torch.unique(image).tolist():
        sel = (image == b).nonzero().flatten()
        for s in range(0, len(sel), chunk):
            part = sel[s:s + chunk]
            along_x = torch.einsum("kh,chw->kcw", rows[part], feature[b])
            out[part] = torch.einsum("kcw,kw->kc", along_x, cols[part])
    return out


def _axis_samples(lo: torch.Tensor, hi: torch.Tensor, size: int, scale: float,
                  extent: int) -> tuple[torch.Tensor, ...]:
    """Bilinear taps along one axis for ``size`` bin-centre samples of [lo, hi] (input pixels), aligned=True.

    Returns (low index, high index, low weight, high weight, in-range) each (N, size): torchvision's rules, a
    sample outside [-1, extent] contributes 0, one in [-1, 0) reads the border, one past extent-1 the last cell.
    """
    start = lo * scale - 0.5
    bin_size = (hi * scale - 0.5 - start) / size
    steps = torch.arange(size, device=lo.device, dtype=lo.dtype)
    pos = start[:, None] + steps * bin_size[:, None] + 0.5 * bin_size[:, None]
    inside = (pos >= -1.0) & (pos <= extent)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    last = low >= extent - 1
    low = torch.where(last, torch.full_like(low, extent - 1), low)
    high = torch.where(last, low, low + 1)
    pos = torch.where(last, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    return low, high, 1 - frac, frac, inside


def roi_align_torch(feature: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, size: int,
                    spatial_scale: float) -> torch.Tensor:
    """Pure-torch RoIAlign (aligned=True, sampling_ratio=1): see :func:`roi_align`. Boxes are gathered in chunks so
    memory stays under ROI_CHUNK_ELEMENTS elements per corner whatever the box count."""
    n_box = boxes.shape[0]
    _, c, h, w = feature.shape
    out = feature.new_zeros(n_box, c, size, size)
    if n_box == 0:
        return out
    hwc = feature.permute(0, 2, 3, 1)
    b32 = boxes.float()
    chunk = max(1, ROI_CHUNK_ELEMENTS // (c * size * size))
    for s in range(0, n_box, chunk):
        e = min(s + chunk, n_box)
        y0, y1, wy0, wy1, in_y = _axis_samples(b32[s:e, 1], b32[s:e, 3], size, spatial_scale, h)
        x0, x1, wx0, wx1, in_x = _axis_samples(b32[s:e, 0], b32[s:e, 2], size, spatial_scale, w)
        img = image[s:e, None, None]
        acc = torch.zeros(e - s, size, size, c, device=feature.device, dtype=feature.dtype)
        for yi, wy in ((y0, wy0), (y1, wy1)):
            for xi, wx in ((x0, wx0), (x1, wx1)):
                weight = (wy[:, :, None] * wx[:, None, :]) * (in_y[:, :, None] & in_x[:, None, :])
                acc += weight[..., None] * hwc[img, yi[:, :, None], xi[:, None, :]]
        out[s:e] = acc.permute(0, 3, 1, 2)
    return out


def object_features(features: Sequence[torch.Tensor], layers: Sequence[ObjectLayer], boxes: Sequence[torch.Tensor],
                    input_hw: tuple[int, int], options: ObjectOptions | None = None,
                    cells: Sequence[torch.Tensor | None] | None = None) -> ObjectFeatures:
    """Per-object vectors of every image of a batch.

    ``features`` (B, C, H, W) per layer of ``layers``; ``boxes`` one (N_b, 4) xyxy tensor in model-input pixels
    per image; ``input_hw`` the model input size; ``cells`` per image the (level, anchor, gy, gx) of each box's
    anchor (:func:`detections.row_cells`), or None for boxes without one (client boxes). Returns per image an
    (N_b, D) tensor on the features' device in ``options.dtype`` (float32 for ``uint8``: its codes are per frame,
    made by the caller), D = Σ layer widths, and each layer's column slice.
    """
    opts = (options or ObjectOptions()).validate()
    if len(features) != len(layers):
        raise ValueError(f"{len(features)} feature maps for {len(layers)} layers")
    counts = [int(b.shape[0]) for b in boxes]
    device = features[0].device if features else torch.device("cpu")
    all_boxes = torch.cat(list(boxes)).to(device) if boxes else torch.zeros(0, 4, device=device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    all_cells = None
    if cells is not None and any(c is not None for c in cells):
        all_cells = torch.cat([c.to(device) if c is not None else torch.full((n, 4), -1, dtype=torch.long,
                                                                              device=device)
                               for c, n in zip(cells, counts)])
    parts: list[torch.Tensor] = []
    slices: list[tuple[str, int, int, int, int]] = []
    start = 0
    for feature, layer in zip(features, layers):
        if opts.mode == "anchor":
            part = anchor_vectors(feature, layer, image, all_boxes, all_cells, input_hw).float()
        else:
            scale = feature.shape[-1] / input_hw[1]
            part = roi_vectors(feature, image, all_boxes, opts.roi_size, scale, opts.flatten)
        if opts.normalize:
            norm = part.norm(dim=1, keepdim=True).clamp_(min=1e-12) * math.sqrt(len(layers))
            part = part / norm
        parts.append(part)
        stride = int(round(input_hw[0] / feature.shape[-2]))
        slices.append((layer.name, layer.index, stride, start, start + part.shape[1]))
        start += part.shape[1]
    joined = torch.cat(parts, 1) if parts else torch.zeros(len(image), 0, device=device)
    if opts.dtype != CODED:  # 8-bit codes are made per frame from these float32 values (device.quantize)
        joined = joined.to(TORCH_DTYPES[opts.dtype])
    return ObjectFeatures(list(joined.split(counts)), slices)


def frame_objects(
    model: torch.nn.Module,
    outputs: Mapping[int, torch.Tensor],
    input_hw: tuple[int, int],
    orig_hws: Sequence[tuple[int, int]],
    *,
    nms: det.NmsOptions | None = None,
    objects: ObjectOptions | None = None,
    layers: Sequence[ObjectLayer] | None = None,
    boxes: Sequence[np.ndarray | None] | None = None,
) -> list[FrameObjects]:
    """Detections and/or object vectors for a batch of frames, from one forward's layer ``outputs``.

    ``outputs`` maps layer index → (B, C, H, W) output of a forward over the batch (model input ``input_hw``);
    it must hold the Detect inputs (:func:`detections.detect_input_layers`) for frames that detect, and every
    layer of ``layers`` (default: the Detect inputs) when vectors are asked for. ``orig_hws``: each frame's size.
    ``nms``: detection options, or None for no detections. ``objects``: vector options, or None for no vectors.
    ``boxes``: per frame, client boxes (already checked by ``object_request.client_boxes``) or None; a frame with client
    boxes is not run through Detect, its boxes get vectors (anchor mode: the centre cell on every layer).
    Vectors of detections and of client boxes are read for the returned (clipped) box, mapped back to the input
    (module docstring), so equal boxes get equal vectors, except on a detection's own level in anchor mode.
    """
    bs = len(orig_hws)
    given = list(boxes) if boxes is not None else [None] * bs
    detect_frames = [b for b in range(bs) if given[b] is None] if nms is not None else []
    device = next(iter(outputs.values())).device
    found: dict[int, det.Detections] = {}
    if detect_frames:
        levels = det.detect_input_layers(model)
        pick = torch.tensor(detect_frames, device=device)
        maps = [outputs[j] if len(detect_frames) == bs else outputs[j][pick] for j in levels]
        found = dict(zip(detect_frames, det.detect(model.model[model.detect_index], maps, nms)))
    grids = det.level_grids([outputs[j] for j in det.detect_input_layers(model)]) if found else []
    na = model.model[model.detect_index].na if found else 0
    frames: list[FrameObjects] = []
    vector_boxes: list[torch.Tensor] = []
    cells: list[torch.Tensor | None] = []
    for b in range(bs):
        d = found.get(b)
        if d is not None:
            frame_boxes = det.scale_boxes(d.boxes, input_hw, orig_hws[b])
            anchor_cells = det.row_cells(d.rows, grids, na)
            frames.append(FrameObjects(frame_boxes, d.scores, d.classes, d.rows, None, [], anchor_cells))
            cells.append(anchor_cells)
        else:
            frame_boxes = torch.as_tensor(given[b] if given[b] is not None else np.zeros((0, 4), np.float32),
                                          dtype=torch.float32, device=device)
            frames.append(FrameObjects(frame_boxes, None, None, None, None, []))
            cells.append(None)
        # Every box is read through the box returned (clipped, in frame pixels), mapped back to the input the same
        # way for detections and client boxes: a client sending a detection back gets its vector.
        vector_boxes.append(det.unscale_boxes(frame_boxes, input_hw, orig_hws[b]))
    if objects is not None:
        chosen = list(layers) if layers is not None else default_object_layers(model)
        result = object_features([outputs[layer.index] for layer in chosen], chosen, vector_boxes, input_hw,
                                 objects, cells)
        for frame, vectors in zip(frames, result.vectors):
            frame.vectors, frame.slices = vectors, result.slices
    return frames
