"""What a request asks for beyond feature maps, and how the answer travels: torch-free, so front-ends use it.

A front-end validates a stream's detection and object-vector options into an :class:`ObjectRequest` (see
``objects_wire``), checks each frame's own boxes with :func:`client_boxes`, and sends the device one
:class:`ObjectJob` per frame. The device answers with an :class:`ObjectResult` written into the frame's
shared-memory slot. The slot is reserved before the frame is computed, so its size is the worst case the
request allows (``max_det`` detections, or the frame's own box count): :class:`ObjectLayout` says where each
array lies, and its ``nbytes`` bound what one frame can cost. The device-side computation (decode, NMS, vectors)
is in ``model/detections.py`` and ``model/objects.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from yolostream.v1 import vocab, wire

from . import affine

#: Upstream's cap on candidates entering NMS per image, and so the largest ``max_det``.
MAX_NMS = 30000
#: Most boxes a client may attach to one frame (``--max-boxes`` may lower it).
MAX_CLIENT_BOXES = 1024
#: How per-object vectors are read (see ``model/objects.py``).
MODES = ("anchor", "roi")
#: Element types of object vectors: every wire dtype; ``uint8`` is 8-bit codes, one scale and offset per column.
VECTOR_DTYPES = tuple(vocab.DTYPES)
#: The vector dtype whose slot region is one ``common.affine`` record instead of an (rows, D) array.
CODED = "uint8"


@dataclass(frozen=True)
class NmsOptions:
    """Upstream ``non_max_suppression`` options, with upstream's defaults.

    Arguments: ``conf_thres`` (0..1; objectness and obj × cls must exceed it), ``iou_thres`` (0..1; a box is
    suppressed when its IoU with a kept box exceeds it), ``classes`` (keep only these class ids; None keeps all),
    ``agnostic`` (one NMS over all classes), ``multi_label`` (one row per class above conf_thres, not only the
    best class), ``max_det`` (most boxes kept per image, 1..30000).
    """

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    classes: tuple[int, ...] | None = None
    agnostic: bool = False
    multi_label: bool = False
    max_det: int = 300

    def validate(self, nc: int) -> NmsOptions:
        """Return self, or raise ValueError naming the bad option and its valid range (``nc``: class count)."""
        for name in ("conf_thres", "iou_thres"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        if isinstance(self.max_det, bool) or not isinstance(self.max_det, int) or not 1 <= self.max_det <= MAX_NMS:
            raise ValueError(f"max_det must be an integer between 1 and {MAX_NMS}, got {self.max_det!r}")
        if self.classes is not None:
            bad = [c for c in self.classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < nc]
            if bad:
                shown = ", ".join(str(c) for c in bad[:5]) + (" …" if len(bad) > 5 else "")
                raise ValueError(f"unknown class id(s) [{shown}]: the model has classes 0..{nc - 1}")
        return self


@dataclass(frozen=True)
class ObjectOptions:
    """How per-object vectors are made.

    Arguments: ``mode`` (``anchor`` or ``roi``), ``roi_size`` (k: k×k samples per box in ``roi`` mode, 1..16),
    ``flatten`` (``roi`` mode: keep the k×k samples, C·k·k values per layer, instead of their mean),
    ``normalize`` (L2, per layer slice, see ``model/objects.py``), ``dtype`` (``float32``, ``float16``,
    ``bfloat16`` or ``uint8``: 8-bit codes per column of each frame's (N, D) vectors; applied last, on the device,
    after ``normalize``).
    """

    mode: str = "anchor"
    roi_size: int = 7
    flatten: bool = False
    normalize: bool = False
    dtype: str = "float32"

    def validate(self) -> ObjectOptions:
        """Return self, or raise ValueError naming the bad option and the valid choices."""
        if self.mode not in MODES:
            raise ValueError(f"unknown object feature mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.roi_size, bool) or not isinstance(self.roi_size, int) or not 1 <= self.roi_size <= 16:
            raise ValueError(f"roi_size must be an integer between 1 and 16, got {self.roi_size!r}")
        if self.flatten and self.mode != "roi":
            raise ValueError("flatten applies to roi mode only")
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(VECTOR_DTYPES)}")
        return self

    def width(self, channels: int) -> int:
        """Columns one layer of ``channels`` channels takes in the concatenated vector."""
        return channels * self.roi_size**2 if self.flatten else channels


@dataclass(frozen=True)
class ObjectRequest:
    """What a stream (or call) asks for beyond feature maps; hashable, so the device groups frames by it.

    ``detection``: NMS options, or None when detection is off. ``objects``: vector options, or None for no
    vectors. ``layers``: ``(name, layer index, stride, width)`` of each layer vectors are read from, in column
    order (bound to the served model's layers by ``frontend.objects_wire.object_request``; empty for a request
    that asks for no vectors).
    """

    detection: NmsOptions | None
    objects: ObjectOptions | None
    layers: tuple[tuple[str, int, int, int], ...] = ()

    @property
    def dim(self) -> int:
        """D, the width of one object vector (0 when no vectors are asked for)."""
        return sum(layer[3] for layer in self.layers) if self.objects is not None else 0

    @property
    def slices(self) -> list[tuple[str, int, int, int, int]]:
        """Each layer's columns as ``(name, layer index, stride, start, stop)``."""
        out, start = [], 0
        for name, index, stride, width in self.layers if self.objects is not None else ():
            out.append((name, index, stride, start, start + width))
            start += width
        return out

    def layout(self, client_box_count: int | None) -> ObjectLayout | None:
        """The shared-memory layout of one frame's answer: room for ``max_det`` detections, or for the frame's
        own ``client_box_count`` boxes; None when the frame gets no boxes (no detection and no boxes of its own)."""
        if client_box_count is not None:
            return ObjectLayout(client_box_count, self.dim, self.vector_dtype, detections=False)
        if self.detection is None:
            return None
        return ObjectLayout(self.detection.max_det, self.dim, self.vector_dtype, detections=True)

    @property
    def vector_dtype(self) -> str:
        return self.objects.dtype if self.objects is not None else "float32"


#: numpy storage of each vector dtype (bfloat16 travels as its uint16 bit patterns).
_STORAGE = {name: wire.storage_dtype(code) for name, code in vocab.DTYPES.items()}


#: Columns of ``ObjectResult.anchors``: a detection's Detect level, the row and column of its grid cell on that
#: level's map, and the anchor's index within the level (the order of FrameResult fields 16–19).
ANCHOR_COLUMNS = ("level", "row", "col", "anchor")


@dataclass(frozen=True)
class ObjectLayout:
    """Where one frame's boxes, scores, classes, anchors and vectors lie in its slot, for up to ``rows`` boxes.

    Arrays follow one another, each in full (``rows`` long): boxes (rows, 4) float32, scores (rows,) float32,
    classes (rows,) int32, then for detections only anchors (rows, 4) int32 (``ANCHOR_COLUMNS``; client boxes
    have no anchor, so their slots keep no room for one), then vectors (rows, dim) in ``dtype``'s storage; only
    the first n rows hold an answer. For ``uint8`` the vectors are one ``common.affine`` record with room for
    ``rows`` rows (dim scales, dim offsets, then the codes row by row), so the record of the n rows answered is its
    prefix: the front-end reads it with ``affine.unpack`` as it reads a coded feature map.
    """

    rows: int
    dim: int
    dtype: str
    detections: bool

    @property
    def row_bytes(self) -> int:
        """Bytes of one box in the slot (and, within a few bytes, in the reply); 8-bit codes add their scales and
        offsets once per frame (``nbytes``)."""
        return 16 + 4 + 4 + (16 if self.detections else 0) + self.dim * _STORAGE[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self._arrays())

    def _arrays(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        anchors = [("anchors", (self.rows, 4), np.dtype(np.int32))] if self.detections else []
        vectors = ("vectors", self._vector_shape(self.rows), _STORAGE[self.dtype])  # uint8: the record's bytes
        return [("boxes", (self.rows, 4), np.dtype(np.float32)), ("scores", (self.rows,), np.dtype(np.float32)),
                ("classes", (self.rows,), np.dtype(np.int32)), *anchors, vectors]

    def _vector_shape(self, n: int) -> tuple[int, ...]:
        """The shape of the vectors of ``n`` boxes in the slot: (n, dim), or for 8-bit codes their record's bytes."""
        return (affine.record_bytes((n, self.dim)),) if self.dtype == CODED else (n, self.dim)

    def write(self, buffer: memoryview | np.ndarray, result: ObjectResult) -> None:
        """Copy ``result`` (at most ``rows`` boxes, vectors ``dim`` wide, or their 8-bit record) into ``buffer``
        (``nbytes`` long)."""
        n = len(result.boxes)
        if n > self.rows:
            raise ValueError(f"{n} boxes for a slot of {self.rows}")
        if result.vectors is not None and result.vectors.shape != self._vector_shape(n):
            raise ValueError(f"object vectors of shape {result.vectors.shape} for {n} boxes, the slot expects "
                             f"{self._vector_shape(n)} ({self.dtype}, width {self.dim})")
        if self.detections and (result.anchors is None or result.anchors.shape != (n, 4)):
            shape = None if result.anchors is None else result.anchors.shape
            raise ValueError(f"anchors of shape {shape} for {n} detections; the slot expects ({n}, 4)")
        views = self.views(buffer, n)
        for name in ("boxes", "scores", "classes", "anchors", "vectors"):
            value = getattr(result, name)
            if value is not None and views[name] is not None:
                np.copyto(views[name], value, casting="same_kind")

    def views(self, buffer: memoryview | np.ndarray, n: int) -> dict[str, np.ndarray | None]:
        """The first ``n`` rows of each array in ``buffer`` (scores, classes and anchors None for client boxes,
        vectors None when ``dim`` is 0; for 8-bit codes, vectors is the flat record of those ``n`` rows)."""
        raw = np.frombuffer(buffer, dtype=np.uint8, count=self.nbytes)
        out: dict[str, np.ndarray | None] = {}
        offset = 0
        for name, shape, dtype in self._arrays():
            size = int(np.prod(shape)) * dtype.itemsize
            full = raw[offset:offset + size].view(dtype).reshape(shape)
            out[name] = full[:self._vector_shape(n)[0]] if name == "vectors" else full[:n]
            offset += size
        if not self.detections:
            out["scores"] = out["classes"] = out["anchors"] = None
        if self.dim == 0:
            out["vectors"] = None
        return out


@dataclass
class ObjectJob:
    """One frame's object work for the device: the stream's ``request``, the frame's original ``orig_hw`` (to map
    boxes through the letterbox), its checked ``boxes`` (or None to detect), and the ``layout`` of its answer."""

    request: ObjectRequest
    orig_hw: tuple[int, int]
    boxes: np.ndarray | None
    layout: ObjectLayout


@dataclass
class ObjectResult:
    """One frame's answer on the host: ``boxes`` (N, 4) float32 original-frame xyxy; ``scores`` (N,) float32 and
    ``classes`` (N,) int32 for detections (None for client boxes); ``vectors`` (N, D) storage of the request's
    dtype (for ``uint8`` the frame's flat ``common.affine`` record instead), or None; ``anchors`` (N, 4) int32 for
    detections, the anchor that made each one as ``ANCHOR_COLUMNS`` (None for client boxes)."""

    boxes: np.ndarray
    scores: np.ndarray | None
    classes: np.ndarray | None
    vectors: np.ndarray | None
    anchors: np.ndarray | None = None


def client_boxes(boxes: object, orig_hw: tuple[int, int], max_boxes: int = MAX_CLIENT_BOXES) -> np.ndarray:
    """Validate boxes a client attached to a frame: (N, 4) x1, y1, x2, y2 in original-frame pixels.

    Returns them as float32, clipped to [0, w] × [0, h] (trackers' predicted boxes often reach past the edge).
    Raises ValueError, saying which box and why, for a wrong shape, more than ``max_boxes`` boxes, a NaN or
    infinite coordinate, or x2 ≤ x1 or y2 ≤ y1.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) array of x1, y1, x2, y2, got shape {arr.shape}")
    if len(arr) > max_boxes:
        raise ValueError(f"{len(arr)} boxes on one frame; the limit is {max_boxes}")
    bad = ~np.isfinite(arr).all(1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"box {i} has a NaN or infinite coordinate: {arr[i].tolist()}")
    bad = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"box {i} is empty (needs x2 > x1 and y2 > y1): {arr[i].tolist()}")
    h, w = orig_hw
    arr[:, 0::2] = arr[:, 0::2].clip(0, w)
    arr[:, 1::2] = arr[:, 1::2].clip(0, h)
    return arr.astype(np.float32)
