"""Boxes and vectors of a batch's frames, from the feature maps its forward already computed.

Frames of one batch may carry different object requests (detect or not, other vector layers); they are grouped
by request so each group is one call of ``model.objects.frame_objects`` over the rows that asked for it. Results
come back to the host as the arrays the slot layout (``common.object_request.ObjectLayout``) writes; 8-bit vectors
are coded here, per frame, into the record that layout holds for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..common.object_request import CODED, ObjectJob, ObjectRequest, ObjectResult
from ..model.detections import detect_input_layers
from ..model.objects import frame_objects, object_layers
from ..model.placement import to_host
from .quantize import object_record


def object_inputs(model: nn.Module, request: ObjectRequest) -> set[int]:
    """The layers a request's detections and vectors are computed from (the forward must include them).

    Args:
        model: the served model (its Detect head's inputs).
        request: what the frames ask for.
    """
    needed = {index for _, index, _, _ in request.layers} if request.objects is not None else set()
    if request.detection is not None:
        needed |= set(detect_input_layers(model))
    return needed


def batch_objects(model: nn.Module, outputs: dict[int, torch.Tensor], jobs: Sequence[ObjectJob | None],
                  input_hw: tuple[int, int]) -> list[ObjectResult | None]:
    """Boxes and vectors of every frame with a job, one ``frame_objects`` call per distinct request.

    Args:
        model: the served model.
        outputs: the batch's layer outputs on the device, by index (rows = frames).
        jobs: per frame, its ``ObjectJob`` or None.
        input_hw: the batch's model input shape.
    """
    groups: dict[ObjectRequest, list[int]] = {}
    for row, job in enumerate(jobs):
        if job is not None:
            groups.setdefault(job.request, []).append(row)
    found: list[ObjectResult | None] = [None] * len(jobs)
    for request, rows in groups.items():
        some_output = next(iter(outputs.values()))
        pick = torch.tensor(rows, device=some_output.device)
        maps = {j: outputs[j].index_select(0, pick) for j in object_inputs(model, request)}
        layers = (object_layers(model, [(name, index) for name, index, _, _ in request.layers])
                  if request.objects is not None else None)
        frames = frame_objects(model, maps, tuple(input_hw), [jobs[r].orig_hw for r in rows],
                               nms=request.detection, objects=request.objects, layers=layers,
                               boxes=[jobs[r].boxes for r in rows])
        for row, frame in zip(rows, frames):
            detected = frame.scores is not None
            found[row] = ObjectResult(
                boxes=frame.boxes.float().cpu().numpy(),
                scores=frame.scores.float().cpu().numpy() if detected else None,
                classes=frame.classes.to(torch.int32).cpu().numpy() if detected else None,
                vectors=_host_vectors(frame.vectors, request),
                anchors=anchor_columns(frame.cells) if detected else None)
    return found


def _host_vectors(vectors: torch.Tensor | None, request: ObjectRequest) -> np.ndarray | None:
    """A frame's vectors as its slot holds them: in the request's dtype's storage, or for 8-bit codes their record,
    coded here on the device from this frame's (N, D) float32 vectors alone (the proto's per-column channels)."""
    if vectors is None:
        return None
    if request.vector_dtype == CODED:
        return object_record(vectors).cpu().numpy()
    return to_host(vectors)


def anchor_columns(cells: torch.Tensor) -> np.ndarray:
    """(level, anchor, gy, gx) cells of ``detections.row_cells`` as the slot's (N, 4) int32 anchors, in
    ``ANCHOR_COLUMNS`` order (level, row, column, anchor), the order the reply and the client use."""
    return cells[:, [0, 2, 3, 1]].to(torch.int32).cpu().numpy()
