"""What a yolostream server answers, as Python objects: model information, per-frame results with their feature
arrays and detections, and the two errors (a failed call, a frame the server could not process).

Torch-free: grpc, protobuf and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab, wire

from .options import LETTERBOXES

STATUSES = vocab.names_of(vocab.STATUSES)
ROLES = vocab.names_of(vocab.ROLES)
TIMING_FIELDS = ("queued_us", "preprocess_us", "compute_us", "encode_us")


class FeatureServerError(RuntimeError):
    """The server (or the connection to it) failed a call; ``code`` is the gRPC status, ``details`` its text."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str = "") -> None:
        self.code = code
        self.details = details
        self.address = address
        where = f"server {address}" if address else "server"
        super().__init__(f"{where}: {code.name}: {details}")

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, address: str) -> "FeatureServerError":
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = (err.details() if hasattr(err, "details") else None) or str(err)
        return cls(code, details, address)


class FrameError(ValueError):
    """The server could not process one image (undecodable, too large...); raised by ``extract``."""


@dataclass(frozen=True)
class LayerInfo:
    """One row of the server's layer catalogue."""

    index: int
    type: str
    inputs: tuple[int, ...]
    params: int
    role: str
    out_channels: int
    stride: int
    output_shape: tuple[int, ...]  # (C, H, W) for one frame at the server's default square imgsz
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What the server runs: model, device, defaults, layer catalogue, batching and limits."""

    model_name: str
    source: str
    random_weights: bool
    device: str
    dtype: str
    default_letterbox: str
    default_imgsz: int
    stride: int
    layers: tuple[LayerInfo, ...]
    batching: dict[str, float]
    limits: dict[str, int]
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    default_object_feature_dim: int = 0
    backend: str = ""
    #: ``allowed`` (the server maps regions of clients on its host: ``FeatureClient(shared_memory=True)``) and
    #: ``max_region_bytes``.
    shared_memory: dict[str, Any] = field(default_factory=lambda: {"allowed": False, "max_region_bytes": 0})

    def layer(self, name: str | int) -> LayerInfo:
        """The catalogue row of a layer named by index (``9`` or ``"9"``) or alias (``"backbone"``, ``"P3"``)."""
        key = str(name).strip()
        for row in self.layers:
            if key == str(row.index) or key in row.aliases:
                return row
        raise KeyError(f"layer {key!r} is not in the catalogue of {self.model_name}")

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> "ModelInfo":
        layers = tuple(
            LayerInfo(index=row.index, type=row.type, inputs=tuple(row.inputs), params=row.params,
                      role=ROLES.get(row.role, "?"), out_channels=row.out_channels, stride=row.stride,
                      output_shape=tuple(row.output_shape), aliases=tuple(row.aliases))
            for row in msg.layers
        )
        letterbox = vocab.names_of(LETTERBOXES).get(msg.default_letterbox, "?")
        return cls(
            model_name=msg.model_name, source=msg.source, random_weights=msg.random_weights, device=msg.device,
            dtype=msg.dtype, default_letterbox=letterbox, default_imgsz=msg.default_imgsz, stride=msg.stride,
            layers=layers,
            batching={"max_batch": msg.batching.max_batch, "max_delay_ms": msg.batching.max_delay_ms,
                      "max_in_flight": msg.batching.max_in_flight, "queue_capacity": msg.batching.queue_capacity,
                      "workers": msg.batching.workers},
            limits={"max_pixels": msg.limits.max_pixels, "max_frame_bytes": msg.limits.max_frame_bytes,
                    "max_message_bytes": msg.limits.max_message_bytes, "max_boxes": msg.limits.max_boxes},
            num_classes=msg.num_classes, class_names=tuple(msg.class_names),
            default_object_feature_dim=msg.default_object_feature_dim, backend=msg.backend,
            shared_memory={"allowed": msg.shared_memory.allowed,
                           "max_region_bytes": msg.shared_memory.max_region_bytes},
        )


@dataclass(frozen=True)
class TensorInfo:
    """Where a returned tensor comes from: the model layer index and its stride in input pixels."""

    layer_index: int
    stride: int


#: The columns of ``Detections.anchor_cells`` (and of a save's ``objects.anchor_cells``), in order.
ANCHOR_CELL_COLUMNS = ("level", "row", "col", "anchor")


@dataclass(frozen=True)
class Detections:
    """The boxes of one frame: the server's detections, or the client's own boxes sent with the frame.

    ``boxes`` (N, 4) float32 x1, y1, x2, y2 in original-frame pixels (unrounded, clipped to the frame);
    detections come in descending score order. ``scores`` (N,) float32 and ``classes`` (N,) int32 for detections,
    None for client boxes; ``names`` the class name of each box when the model carries names, else None;
    ``box_ids`` (N,) uint64, the ids sent with client boxes, else None; ``source`` ``"detector"`` or ``"client"``.
    ``slices`` maps each layer to its (start, stop) columns of ``FeatureResult.object_features``.
    ``anchor_cells`` (N, 4) int32 for detections: which anchor made each box, as columns ``ANCHOR_CELL_COLUMNS``
    (Detect level, grid row, grid column, anchor index); level k is the k-th Detect input (0, 1, 2 = P3, P4,
    P5), and ``features["P3"][:, row, col]`` is the P3 cell of a level-0 detection. None for client boxes (and
    from a server too old to send it).
    ``track_ids`` (N,) uint64 and ``track_new`` (N,) bool on a tracked stream (``stream(track=...)``): each box's
    track id, stable within ``FeatureResult.track_epoch`` (0: no confirmed track), and whether it is new on this
    frame; None when the stream does not track.
    """

    boxes: np.ndarray
    scores: np.ndarray | None
    classes: np.ndarray | None
    names: list[str] | None
    box_ids: np.ndarray | None
    source: str
    slices: dict[str, tuple[int, int]]
    anchor_cells: np.ndarray | None = None
    track_ids: np.ndarray | None = None
    track_new: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class FeatureResult:
    """The answer for one frame.

    ``features`` maps each layer name as requested to a read-only array, (C, H, W) or (C,) when pooled, that is a
    zero-copy view of the response bytes for float32/float16 (bfloat16 and 8-bit codes arrive as float32; a
    compressed tensor is a view of its decompressed bytes). ``timestamp`` is the capture time in seconds as given to
    ``stream`` (to the microsecond). ``latency`` is the client-measured round
    trip in seconds, from the moment the frame was handed to gRPC until its answer was read. ``letterbox`` (dict of
    ``LetterboxInfo`` fields) maps model-input pixels back to the frame with ``yolostream.v1.vocab.input_to_frame``:
    ``x = (x_in - pad_left) * original_width / resized_width``.
    ``retries`` is how many times the frame was sent again because the replica it was on failed before answering
    (0 normally); ``latency`` then runs from its first send.
    ``detections`` holds the frame's boxes when the stream detects or the frame carried boxes (else None), and
    ``object_features`` their (N, D) vectors, one row per box (None when not asked for); float32 when they came as
    8-bit codes.
    ``codes`` maps each layer sent as 8-bit codes (``dtype="uint8"``) to its ``yolostream.v1.wire.AffineCodes``: the
    uint8 ``codes`` as sent (read-only), the float32 ``scales`` and ``offsets`` (one per channel: C for a (C, H, W)
    map, 1 for a pooled vector, D for object vectors) and the channel ``axis`` (0, 1 for object vectors, or None for
    one channel); ``features`` holds the same layer decoded to float32 (``codes[name].dequantize()``). Object vectors
    sent as codes (``ObjectFeatureOptions(dtype="uint8")``) are under ``"object_features"``
    (``yolostream.v1.wire.OBJECT_FEATURES_NAME``), decoded in ``object_features``. Empty for other dtypes.
    ``track_epoch`` is the server's tracker state on a tracked stream (0 when not tracked): it changes when that
    state restarts (the stream resumed on another replica), and ids of two epochs are unrelated. ``track_vectors``
    (N, D) float32 each box's track vector, with ``TrackOptions(return_vectors=True)``.
    """

    frame_id: int
    timestamp: float
    status: str  # "ok" | "error" | "dropped"
    error: str
    features: dict[str, np.ndarray]
    tensors: dict[str, TensorInfo]
    letterbox: dict[str, Any] | None
    timings_us: dict[str, int]
    batch_size: int
    latency: float | None
    image: np.ndarray | None = field(default=None, repr=False)
    retries: int = 0
    detections: Detections | None = None
    object_features: np.ndarray | None = field(default=None, repr=False)
    codes: dict[str, wire.AffineCodes] = field(default_factory=dict, repr=False)
    track_epoch: int = 0
    track_vectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _detections(msg: pb.FrameResult, class_names: Sequence[str]) -> tuple[Detections | None, wire.Objects | None]:
    """The frame's boxes as ``Detections`` and the wire's reading of its box fields (vectors and their codes)."""
    if msg.box_source == pb.BOX_SOURCE_UNSPECIFIED:
        return None, None
    found = wire.objects_from_proto(msg)
    names = None
    if found.classes is not None and class_names:
        names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in found.classes.tolist()]
    source = "client" if found.source == pb.BOX_SOURCE_CLIENT else "detector"
    tracked = msg.track_epoch > 0
    return Detections(found.boxes, found.scores, found.classes, names, found.box_ids, source, found.slices,
                      found.anchors, np.asarray(msg.track_ids, np.uint64) if tracked else None,
                      np.asarray(msg.track_new, bool) if tracked else None), found


def result_from_proto(msg: pb.FrameResult, latency: float | None, image: np.ndarray | None,
                       class_names: Sequence[str] = (), features: dict[str, np.ndarray] | None = None) -> FeatureResult:
    """The FeatureResult of a FrameResult message. ``features``: its arrays when already made (views of the stream's
    shared memory); by default they are read from the message, and 8-bit codes also give ``codes``."""
    codes = {}
    if features is None:
        features = {}
        for t in msg.tensors:
            if t.dtype == pb.DTYPE_UINT8_AFFINE:  # decompressed and read once, for both forms
                codes[t.name] = wire.affine_from_proto(t)
                features[t.name] = codes[t.name].dequantize()
            else:
                features[t.name] = wire.tensor_from_proto(t)
    ok = msg.status == pb.FRAME_STATUS_OK
    detections, found = _detections(msg, class_names) if ok else (None, None)
    if found is not None and found.codes is not None:
        codes[wire.OBJECT_FEATURES_NAME] = found.codes
    return FeatureResult(
        frame_id=msg.frame_id,
        timestamp=msg.capture_timestamp_us / 1e6,
        status=STATUSES.get(msg.status, "error"),
        error=msg.error_message,
        features=features,
        tensors={t.name: TensorInfo(t.layer_index, t.stride) for t in msg.tensors},
        letterbox=wire.letterbox_from_proto(msg.letterbox) if ok and msg.HasField("letterbox") else None,
        timings_us={name: getattr(msg.timings, name) for name in TIMING_FIELDS},
        batch_size=msg.batch_size,
        latency=latency,
        image=image,
        detections=detections,
        object_features=found.features if found is not None else None,
        codes=codes,
        track_epoch=msg.track_epoch if ok else 0,
        track_vectors=wire.tensor_from_proto(msg.track_features) if ok and msg.HasField("track_features") else None,
    )
