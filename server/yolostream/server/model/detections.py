"""Detections from the Detect head: upstream's inference decode, ``non_max_suppression`` and ``scale_boxes``.

Written from UPSTREAM_FACTS §3 and §11, not from upstream code. Everything runs in torch on whatever device the
tensors live on, batched over images, and carries the *anchor row* of every kept box (the row of the decoded
output, i.e. which level, anchor and grid cell produced it) so per-object feature vectors can be read from the
same forward pass (see ``objects.py``).

Semantics kept from upstream (``detect.py`` defaults): candidates need objectness > conf_thres, then
obj × cls > conf_thres (both strict); best class (first index on ties) or multi-label rows; the ``classes``
filter; the 30,000 best candidates per image; class-aware greedy NMS through a ``class × 7680`` px offset (0 when
agnostic), suppressing IoU strictly above iou_thres; the first ``max_det`` survivors.

Differences, on purpose:

- **No time limit.** Upstream stops after 0.5 + 0.05·bs seconds and returns the remaining images empty.
- **Deterministic tie-break.** Upstream sorts with an unstable sort, so which of two *equal*-score overlapping
  boxes survives is implementation-defined (and differs between CPU, CUDA and torchvision's kernel). Here every
  sort is stable: equal scores keep candidate order, i.e. ascending anchor row (and ascending class within a row
  in multi-label mode). This is the fixture's ``@stablesort`` variant; the result is the same on every device
  and with or without torchvision.
- **float32 NMS.** fp16 decoded outputs are converted to float32 first: the class offsets (up to 79 × 7680)
  overflow float16.
- **Bounded memory.** NMS never builds the n × n IoU matrix of 30,000 candidates (3.6 GB); it walks the sorted
  candidates in blocks (see :func:`_greedy_nms_sorted`) and stops once ``max_det`` boxes are kept, which does not
  change the result because greedy NMS decides boxes in score order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from ..common.object_request import MAX_NMS, NmsOptions
from .modules import Detect

#: Upstream's class offset for class-aware NMS, in pixels.
MAX_WH = 7680
#: Elements (images × block × block) of one IoU block in the pure-torch NMS; bounds its memory (~16 MB each).
IOU_BLOCK_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=1)
def torchvision_ops() -> ModuleType | None:
    """``torchvision.ops`` when torchvision imports and its compiled ops load, else None.

    Any failure counts as absent: PyPI's torchvision wheels do not load with every torch build (a missing
    module, or an import that raises because the C++ operators do not match).
    """
    try:
        import torchvision.ops as ops

        ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception:
        return None
    return ops


@dataclass
class Detections:
    """Kept boxes of one image, in descending score order (ties: ascending anchor row, then class).

    ``boxes`` (n, 4) float32 x1, y1, x2, y2 in model-input pixels; ``scores`` (n,) float32 obj × cls;
    ``classes`` (n,) int64; ``rows`` (n,) int64, the row of the decoded output (level-major, then anchor, y, x)
    that produced each box; :func:`row_cells` turns rows into (level, anchor, gy, gx).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def detect_input_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the layers feeding Detect (P3, P4, P5[, P6]), in Detect's level order."""
    index = getattr(model, "detect_index", None)
    if index is None:
        raise ValueError("the model has no Detect head, so it cannot detect objects")
    head = model.model[index]
    sources = [head.f] if isinstance(head.f, int) else list(head.f)
    return tuple(j if j >= 0 else index + j for j in sources)


def decode(detect: Detect, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upstream's inference decode, run by the model's own Detect module on its inputs (the P-level maps).

    Returns ``pred`` (bs, Σ na·ny·nx, 5 + nc): cx, cy, w, h in model-input pixels, objectness, class scores,
    all after the sigmoid; rows level-major, then anchor, then y, then x. Grids are built from the maps' shapes.
    """
    if detect.training:
        raise ValueError("Detect is in training mode, which returns raw maps only: call model.eval() first")
    if len(maps) != detect.nl:
        raise ValueError(f"Detect takes {detect.nl} maps, got {len(maps)}")
    decoded, _ = detect(list(maps))
    return decoded


def level_grids(maps: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(ny, nx) of each Detect level, from its input map (B, C, ny, nx)."""
    return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]


def row_cells(rows: torch.Tensor, grids: Sequence[tuple[int, int]], na: int) -> torch.Tensor:
    """(level, anchor, gy, gx) (n, 4) int64 of decoded-output rows, for Detect levels of ``grids`` (ny, nx)."""
    sizes = torch.tensor([na * ny * nx for ny, nx in grids], device=rows.device)
    starts = torch.cumsum(sizes, 0) - sizes
    level = torch.bucketize(rows, torch.cumsum(sizes, 0), right=True)
    if rows.numel() and int(level.max()) >= len(grids):
        raise ValueError(f"row {int(rows.max())} is beyond the {int(sizes.sum())} rows of these grids")
    ny = torch.tensor([g[0] for g in grids], device=rows.device)[level]
    nx = torch.tensor([g[1] for g in grids], device=rows.device)[level]
    rest = rows - starts[level]
    cell = rest % (ny * nx)
    return torch.stack((level, rest // (ny * nx), cell // nx, cell % nx), 1)


def xywh_to_xyxy(xywh: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes to corners, as upstream: x1 = cx − w/2, x2 = cx + w/2 (likewise y)."""
    half = xywh[..., 2:4] / 2
    return torch.cat((xywh[..., 0:2] - half, xywh[..., 0:2] + half), -1)


def box_iou_over(a: torch.Tensor, b: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """Whether IoU(a_i, b_j) > threshold, (..., n, m) bool, for (..., n, 4) and (..., m, 4) xyxy boxes.

    The arithmetic is torchvision's CPU kernel's, in the boxes' dtype: w = max(0, min(x2) − max(x1)), h alike,
    inter = w·h, iou = inter / ((area_a + area_b) − inter); ``threshold`` must already be
    :func:`_dtype_threshold`'s value so the comparison equals the kernel's ``double(iou) > threshold``.
    """
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp_(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area_a[..., :, None] + area_b[..., None, :]) - inter
    return (inter / union) > threshold


def _dtype_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value ≤ ``threshold``: for x of that dtype, x > it ⟺ double(x) > threshold."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    t = np_dtype(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np_dtype(-np.inf))
    return float(t)


def _greedy_nms_sorted(boxes: torch.Tensor, valid: torch.Tensor, threshold: float, max_keep: int,
                       block: int | None = None) -> torch.Tensor:
    """Greedy NMS over boxes already sorted by descending score, for several images at once.

    ``boxes`` (B, L, 4) xyxy, ``valid`` (B, L) bool (padding is False), ``threshold`` the IoU threshold,
    ``max_keep`` stops an image once that many boxes are kept (greedy NMS decides boxes in order, so the kept
    prefix is unchanged), ``block`` the largest block (default: bounded by IOU_BLOCK_ELEMENTS). Returns the
    keep mask (B, L).

    Why blocks: the IoU matrix of 30,000 candidates would take 3.6 GB. Candidates are walked in blocks, 256
    first and doubling up to ``block`` (with max_det boxes to keep, the first few hundred candidates often
    decide everything); a block is first checked against the boxes kept so far (in chunks), then resolved
    internally by the Cluster-NMS fixed point (Zheng et al. 2020): keep = alive ∧ ¬(Sᵀ keep) over the block's
    upper-triangular suppression matrix S, iterated from keep = alive. Entry j depends only on entries < j, so
    the iteration reaches the unique fixed point, which is exactly the greedy result. Memory: O(B·block²).
    """
    n_img, length = valid.shape
    if block is None:
        block = max(64, min(1024, int(math.sqrt(IOU_BLOCK_ELEMENTS / max(n_img, 1)))))
    thr = _dtype_threshold(threshold, boxes.dtype)
    device = boxes.device
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    keep = torch.zeros_like(valid)
    cap = min(max_keep, length)
    kept_boxes = boxes.new_zeros(n_img, cap, 4)
    kept_areas = areas.new_zeros(n_img, cap)
    n_kept = torch.zeros(n_img, dtype=torch.long, device=device)
    later = torch.ones(block, block, dtype=torch.bool, device=device).triu_(1)
    start, size = 0, min(256, block)
    while start < length:
        stop = min(start + size, length)
        alive = valid[:, start:stop] & (n_kept < cap)[:, None]
        if bool(alive.any()):
            _resolve_block(boxes[:, start:stop], areas[:, start:stop], alive, kept_boxes, kept_areas, n_kept,
                           later, thr, block)
            keep[:, start:stop] = alive
        elif not bool((valid[:, start:] & (n_kept < cap)[:, None]).any()):
            break
        start, size = stop, min(2 * size, block)
    return keep


def _resolve_block(blk: torch.Tensor, blk_areas: torch.Tensor, alive: torch.Tensor, kept_boxes: torch.Tensor,
                   kept_areas: torch.Tensor, n_kept: torch.Tensor, later: torch.Tensor, thr: float,
                   chunk: int) -> None:
    """One block of :func:`_greedy_nms_sorted`: turn ``alive`` into the block's keep mask and append the kept
    boxes to ``kept_boxes``/``kept_areas``/``n_kept`` (all updated in place)."""
    device = blk.device
    cap = kept_boxes.shape[1]
    most = int(n_kept.max())
    for k0 in range(0, most, chunk):
        k1 = min(k0 + chunk, most)
        over = box_iou_over(kept_boxes[:, k0:k1], blk, kept_areas[:, k0:k1], blk_areas, thr)
        real = torch.arange(k0, k1, device=device)[None, :] < n_kept[:, None]
        alive &= ~(over & real[:, :, None]).any(1)
    size = blk.shape[1]
    sup = box_iou_over(blk, blk, blk_areas, blk_areas, thr) & later[:size, :size]
    sup &= alive[:, :, None] & alive[:, None, :]
    current = alive.clone()
    while True:
        nxt = alive & ~(sup & current[:, :, None]).any(1)
        if torch.equal(nxt, current):
            break
        current = nxt
    rank = n_kept[:, None] + torch.cumsum(current, 1)
    current &= rank <= cap
    img, pos = current.nonzero(as_tuple=True)
    dest = rank[img, pos] - 1
    kept_boxes[img, dest] = blk[img, pos]
    kept_areas[img, dest] = blk_areas[img, pos]
    n_kept += current.sum(1)
    alive.copy_(current)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with torchvision.ops.nms's contract: int64 indices of kept boxes, by descending score.

    Boxes are (n, 4) xyxy; a box is suppressed when its IoU with a kept higher-scored box is strictly greater
    than ``iou_threshold``. Equal scores keep their input order (stable), on every device. Pure torch, memory
    bounded (see :func:`_greedy_nms_sorted`).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_boxes = boxes[order]
    keep = _greedy_nms_sorted(sorted_boxes[None], torch.ones(1, len(order), dtype=torch.bool, device=boxes.device),
                              iou_threshold, len(order))
    return order[keep[0]]


def _candidates(pred: torch.Tensor, opts: NmsOptions) -> tuple[torch.Tensor, ...]:
    """Upstream's per-image candidate steps 1–5 for the whole batch at once, in candidate order.

    Returns (image, row, class, conf) of every candidate, ordered by image, then row, then class. Scores are
    computed for every row at once (obj × cls, as upstream) so that only candidates are ever gathered.
    """
    obj = pred[..., 4:5]
    conf_all = pred[..., 5:] * obj
    wanted = obj > opts.conf_thres
    if opts.multi_label:
        mask = (conf_all > opts.conf_thres) & wanted
        if opts.classes is not None:
            mask &= _class_mask(opts.classes, conf_all.shape[-1], pred.device)
        img, row, cls = mask.nonzero(as_tuple=True)
        return img, row, cls, conf_all[img, row, cls]
    conf, cls = conf_all.max(-1)
    mask = (conf > opts.conf_thres) & wanted[..., 0]
    if opts.classes is not None:
        mask &= _class_mask(opts.classes, conf_all.shape[-1], pred.device)[cls]
    img, row = mask.nonzero(as_tuple=True)
    return img, row, cls[img, row], conf[img, row]


def _top_candidates(img: torch.Tensor, row: torch.Tensor, cls: torch.Tensor, conf: torch.Tensor,
                    bs: int) -> tuple[torch.Tensor, ...]:
    """Drop candidates that cannot be among their image's MAX_NMS best, before anything is sorted.

    Multi-label candidates can number rows × classes per image (758,545 for one 640×640 image of random weights);
    sorting and gathering all of them would cost far more than the NMS. Per image with more than MAX_NMS,
    ``kthvalue`` finds the MAX_NMS-th best score in linear time and only scores ≥ it stay (ties at the cut
    included, so the stable sort still decides them as without this step). Candidate order is kept.
    """
    counts = torch.bincount(img, minlength=bs)
    if not len(img) or int(counts.max()) <= MAX_NMS:
        return img, row, cls, conf
    keep = torch.ones_like(img, dtype=torch.bool)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    for b in (counts > MAX_NMS).nonzero().flatten().tolist():
        part = conf[starts[b]:starts[b] + int(counts[b])]
        cut = -torch.kthvalue(-part, MAX_NMS).values
        keep[starts[b]:starts[b] + len(part)] = part >= cut
    return img[keep], row[keep], cls[keep], conf[keep]


def _class_mask(classes: tuple[int, ...], nc: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(nc, dtype=torch.bool, device=device)
    mask[list(classes)] = True
    return mask


def non_max_suppression(pred: torch.Tensor, options: NmsOptions | None = None, *,
                        use_torchvision: bool | None = None) -> list[Detections]:
    """Upstream's ``non_max_suppression`` on decoded output ``pred`` (bs, N, 5 + nc), batched, with anchor rows.

    ``options`` defaults to upstream's defaults. Per image: candidates (see module docstring), a stable sort by
    descending score, the best 30,000, class-aware (or agnostic) greedy NMS, the first ``max_det``.
    ``use_torchvision``: None uses ``torchvision.ops.nms`` when it imports and the pure-torch
    :func:`_greedy_nms_sorted` otherwise; False forces pure torch; True requires torchvision. Both get the same
    stably sorted candidates (torchvision sees a strictly decreasing score ramp in that order, so its own
    unstable re-sort cannot reorder ties), so the results are identical.
    """
    opts = (options or NmsOptions()).validate(pred.shape[-1] - 5)
    if pred.dtype not in (torch.float32, torch.float64):
        pred = pred.float()
    bs = pred.shape[0]
    if opts.multi_label:
        # One image at a time: (row, class) pairs of a whole batch could number bs × rows × classes.
        parts = [_top_candidates(*_candidates(pred[b:b + 1], opts), 1) for b in range(bs)]
        img, row, cls, conf = (torch.cat([p[k] + (b if k == 0 else 0) for b, p in enumerate(parts)])
                               for k in range(4))
    else:
        img, row, cls, conf = _candidates(pred, opts)
    order = torch.argsort(conf, descending=True, stable=True)
    order = order[torch.argsort(img[order], stable=True)]
    counts = torch.bincount(img, minlength=bs)
    starts = torch.cumsum(counts, 0) - counts
    img = img[order]
    rank = torch.arange(len(img), device=img.device) - starts[img]
    take = rank < MAX_NMS
    order, img, rank = order[take], img[take], rank[take]
    row, cls, conf = row[order], cls[order], conf[order]
    boxes = xywh_to_xyxy(pred[img, row, :4])
    offset = boxes + (cls[:, None].to(boxes.dtype) * (0 if opts.agnostic else MAX_WH))

    ops = torchvision_ops() if use_torchvision is not False else None
    if use_torchvision and ops is None:
        raise RuntimeError("torchvision.ops is not available in this environment")
    if ops is not None:
        keep = torch.zeros(len(img), dtype=torch.bool, device=img.device)
        counts_host = torch.bincount(img, minlength=bs).tolist()
        start = 0
        for n in counts_host:
            if n:
                ramp = -torch.arange(n, device=img.device, dtype=boxes.dtype)
                kept = ops.nms(offset[start:start + n], ramp, opts.iou_thres)[:opts.max_det]
                keep[start + kept] = True
            start += n
    else:
        width = int(rank.max()) + 1 if len(rank) else 0
        padded = offset.new_zeros(bs, width, 4)
        padded[img, rank] = offset
        valid = torch.zeros(bs, width, dtype=torch.bool, device=img.device)
        valid[img, rank] = True
        keep = _greedy_nms_sorted(padded, valid, opts.iou_thres, opts.max_det)[img, rank]

    img, row, cls, conf, boxes = img[keep], row[keep], cls[keep], conf[keep], boxes[keep]
    sizes = torch.bincount(img, minlength=bs).tolist()
    return [Detections(b.float(), c.float(), k, r) for b, c, k, r in
            zip(boxes.split(sizes), conf.split(sizes), cls.split(sizes), row.split(sizes))]


def scale_boxes(boxes: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """Model-input boxes (n, 4) xyxy to original-frame pixels, upstream's ``scale_boxes`` without rounding.

    gain = min(input_h / orig_h, input_w / orig_w); pad = ((input_w − orig_w·gain) / 2, (input_h − orig_h·gain)
    / 2), the ideal half pad (the letterbox's own borders are rounded and may differ by up to a pixel; upstream
    lives with it, and so do we, to give upstream's boxes); x = (x − pad_x) / gain; then clipped to
    [0, orig_w] × [0, orig_h]. Returns a new tensor of ``boxes``' dtype.
    """
    gain, pad_x, pad_y = _gain_pad(input_hw, orig_hw)
    out = boxes.clone()
    out[:, 0::2] -= pad_x
    out[:, 1::2] -= pad_y
    out /= gain
    return clip_boxes(out, orig_hw)


def unscale_boxes(boxes: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`scale_boxes` (without the clip): original-frame boxes to model-input pixels."""
    gain, pad_x, pad_y = _gain_pad(input_hw, orig_hw)
    out = boxes * gain
    out[:, 0::2] += pad_x
    out[:, 1::2] += pad_y
    return out


def clip_boxes(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Clip (n, 4) xyxy boxes in place to [0, w] × [0, h] and return them."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, hw[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, hw[0])
    return boxes


def _gain_pad(input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> tuple[float, float, float]:
    gain = min(input_hw[0] / orig_hw[0], input_hw[1] / orig_hw[1])
    return gain, (input_hw[1] - orig_hw[1] * gain) / 2, (input_hw[0] - orig_hw[0] * gain) / 2


def detect(detect_head: Detect, maps: Sequence[torch.Tensor], options: NmsOptions | None = None) -> list[Detections]:
    """Decode the Detect inputs ``maps`` with the model's own head and run NMS: one Detections per image."""
    return non_max_suppression(decode(detect_head, maps), options)
