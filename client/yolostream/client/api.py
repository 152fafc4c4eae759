"""FeatureClient: the Python API of a yolostream server, with grpc, protobuf, numpy and OpenCV only (no torch).

``stream`` keeps three things moving at once, so that neither side waits for the other:

- a *sender thread* pulls frames from the caller's iterable (a camera, say), encodes them (JPEG, PNG or raw) and
  keeps them, numbered, until they are answered;
- gRPC's own thread takes them from there, in order, and writes them to the connection;
- the caller's thread reads the answers as they arrive and turns them into :class:`FeatureResult` objects.

Backpressure, the choice made here. Outside realtime mode the sender waits for room in a window of
``2 × max_in_flight`` unanswered frames *before* it reads the next frame from the source: a slow server slows the
source down and the client never buffers more than the window. In realtime mode the sender does not wait for
answers; the server keeps only the newest waiting frame and answers the others DROPPED, so a fast camera is never
held back by a slow model. The sender then only waits while gRPC has not taken its few frames read ahead, which
happens when the connection itself cannot take more bytes. The client never drops frames on its own: every frame
it read gets exactly one result (OK, ERROR or DROPPED) from the server.

Many replicas. The address may name several servers (a list, ``ipv4:a:p,b:p``, ``dns:///name:port``): the channel
balances calls round-robin over the healthy ones (see :mod:`.resume`). Keeping every unanswered frame is what lets
a stream survive its replica: on UNAVAILABLE the stream is reopened on another and those frames are sent again.

The sender thread always ends: when the answers run out, when the server fails, when the caller stops iterating
early (``close()``, leaving a ``with`` block, ``break`` and letting the stream go) or on KeyboardInterrupt, the call
is cancelled, the waiting threads are woken and the sender is joined. A server that dies mid-stream (and no replica
to resume on) ends the iteration with :class:`FeatureServerError` (UNAVAILABLE) thanks to the closed connection or,
for a host that vanishes silently, to the channel's keepalive pings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import vocab, wire

from .resume import (
    DRAIN_REFUSAL,
    RESUMABLE_CODES,
    ResumePolicy,
    balancing_options,
    channel_target,
    is_address_list,
    names_one_address,
    resume_policy,
)
from .sources import file_bytes

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Largest gRPC message either way: a raw 1080p frame is 6.2 MB, a multi-scale float32 reply at 640 ~5.7 MB.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: The server's default ``max_in_flight``; the client window is twice the stream's value.
SERVER_DEFAULT_IN_FLIGHT = 8
#: Default FeatureClient.settle_s for targets that may name several replicas.
DEFAULT_SETTLE_S = 0.5
#: Frames encoded ahead of gRPC's writer in realtime mode (outside it, the window bounds them).
REALTIME_SEND_QUEUE = 2

ENCODINGS = ("jpeg", "png", "raw")
POOLINGS = vocab.POOLINGS
LETTERBOXES = vocab.LETTERBOX_POLICIES
STATUSES = vocab.names_of(vocab.STATUSES)
ROLES = vocab.names_of(vocab.ROLES)
TIMING_FIELDS = ("queued_us", "preprocess_us", "compute_us", "encode_us")

#: Longest wait in close() for the sender thread, which may be stuck in a network camera's read.
SENDER_JOIN_S = 30.0


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
        )


@dataclass(frozen=True)
class TensorInfo:
    """Where a returned tensor comes from: the model layer index and its stride in input pixels."""

    layer_index: int
    stride: int


@dataclass(frozen=True)
class Detections:
    """The boxes of one frame: the server's detections, or the client's own boxes sent with the frame.

    ``boxes`` (N, 4) float32 x1, y1, x2, y2 in original-frame pixels (unrounded, clipped to the frame);
    detections come in descending score order. ``scores`` (N,) float32 and ``classes`` (N,) int32 for detections,
    None for client boxes; ``names`` the class name of each box when the model carries names, else None;
    ``box_ids`` (N,) uint64, the ids sent with client boxes, else None; ``source`` ``"detector"`` or ``"client"``.
    ``slices`` maps each layer to its (start, stop) columns of ``FeatureResult.object_features``.
    """

    boxes: np.ndarray
    scores: np.ndarray | None
    classes: np.ndarray | None
    names: list[str] | None
    box_ids: np.ndarray | None
    source: str
    slices: dict[str, tuple[int, int]]

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class DetectOptions:
    """Detection settings (upstream ``detect.py``'s, applied by the server); None means the server's default.

    ``conf`` (objectness and score threshold, default 0.25), ``iou`` (NMS IoU threshold, default 0.45), ``classes``
    (keep only these class ids), ``agnostic`` (one NMS over all classes), ``multi_label`` (a box per class above
    ``conf``), ``max_det`` (most boxes per frame, default 300).
    """

    conf: float | None = None
    iou: float | None = None
    classes: Sequence[int] | None = None
    agnostic: bool = False
    multi_label: bool = False
    max_det: int | None = None

    def to_proto(self) -> pb.DetectionOptions:
        for name, value in (("conf", self.conf), ("iou", self.iou)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"detection {name} must be in (0, 1], got {value}")
        if self.max_det is not None and self.max_det < 1:
            raise ValueError(f"max_det must be at least 1, got {self.max_det}")
        classes = [int(c) for c in (self.classes if self.classes is not None else ())]
        bad = [c for c in classes if not 0 <= c < 2**31]
        if bad:
            raise ValueError(f"detection classes are class ids >= 0, got {bad[0]}"
                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
        return pb.DetectionOptions(enabled=True, conf_thres=self.conf or 0.0, iou_thres=self.iou or 0.0,
                                   classes=classes, agnostic=self.agnostic,
                                   multi_label=self.multi_label, max_det=self.max_det or 0)


#: Object vector modes: "anchor" (the detection's anchor cell), "roi" (RoIAlign), "none" (boxes only).
OBJECT_MODES = {"anchor": pb.OBJECT_FEATURE_MODE_ANCHOR, "roi": pb.OBJECT_FEATURE_MODE_ROI,
                "none": pb.OBJECT_FEATURE_MODE_NONE}


@dataclass(frozen=True)
class ObjectFeatureOptions:
    """How one vector per box is made; None means the server's default.

    ``mode`` (``anchor``, ``roi`` or ``none``), ``layers`` (list or comma string; default the Detect inputs
    P3, P4, P5), ``normalize`` (unit-norm rows, each layer an equal share), ``dtype`` (float32, float16 or
    bfloat16), ``roi_size`` (roi mode: k×k samples, default 7), ``flatten`` (roi mode: keep all k×k samples).
    """

    mode: str = "anchor"
    layers: str | Sequence[str | int] | None = None
    normalize: bool = False
    dtype: str | None = None
    roi_size: int | None = None
    flatten: bool = False

    def to_proto(self) -> pb.ObjectFeatureOptions:
        if self.mode not in OBJECT_MODES:
            raise ValueError(f"unknown object feature mode {self.mode!r}; choose one of {', '.join(OBJECT_MODES)}")
        return pb.ObjectFeatureOptions(
            mode=OBJECT_MODES[self.mode], layers=_names(self.layers), normalize=self.normalize,
            dtype=wire.dtype_from_name(self.dtype) if self.dtype is not None else pb.DTYPE_UNSPECIFIED,
            roi_size=self.roi_size or 0, flatten=self.flatten)


@dataclass
class FeatureResult:
    """The answer for one frame.

    ``features`` maps each layer name as requested to a read-only array, (C, H, W) or (C,) when pooled, that is a
    zero-copy view of the response bytes for float32/float16 (bfloat16 arrives as float32). ``timestamp`` is the
    capture time in seconds as given to ``stream`` (to the microsecond). ``latency`` is the client-measured round
    trip in seconds, from the moment the frame was handed to gRPC until its answer was read. ``letterbox`` (dict of
    ``LetterboxInfo`` fields) maps model-input pixels back to the frame with ``yolostream.v1.vocab.input_to_frame``:
    ``x = (x_in - pad_left) * original_width / resized_width``.
    ``retries`` is how many times the frame was sent again because the replica it was on failed before answering
    (0 normally); ``latency`` then runs from its first send.
    ``detections`` holds the frame's boxes when the stream detects or the frame carried boxes (else None), and
    ``object_features`` their (N, D) vectors, one row per box (None when not asked for).
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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _detections(msg: pb.FrameResult, class_names: Sequence[str]) -> tuple[Detections | None, np.ndarray | None]:
    if msg.box_source == pb.BOX_SOURCE_UNSPECIFIED:
        return None, None
    found = wire.objects_from_proto(msg)
    names = None
    if found.classes is not None and class_names:
        names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in found.classes.tolist()]
    source = "client" if found.source == pb.BOX_SOURCE_CLIENT else "detector"
    return Detections(found.boxes, found.scores, found.classes, names, found.box_ids, source,
                      found.slices), found.features


def _result_from_proto(msg: pb.FrameResult, latency: float | None, image: np.ndarray | None,
                       class_names: Sequence[str] = ()) -> FeatureResult:
    features = {t.name: wire.tensor_from_proto(t) for t in msg.tensors}
    ok = msg.status == pb.FRAME_STATUS_OK
    detections, vectors = _detections(msg, class_names) if ok else (None, None)
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
        object_features=vectors,
    )


def _names(layers: str | Sequence[str | int] | None) -> list[str]:
    if layers is None:
        return []
    if isinstance(layers, str):
        return [s.strip() for s in layers.split(",") if s.strip()]
    return [str(s).strip() for s in layers]


def feature_options(layers: str | Sequence[str | int] | None = None, dtype: str | None = None,
                    pooling: str | None = None, letterbox: str | None = None,
                    imgsz: int | None = None, detect: DetectOptions | bool | None = None,
                    objects: ObjectFeatureOptions | str | None = None) -> pb.FeatureOptions:
    """The wire options; None means the server default. ``layers`` is a list or a comma-separated string.
    ``detect``: True (upstream's defaults) or ``DetectOptions`` to detect objects; ``objects``: how each box gets
    its vector, as ``ObjectFeatureOptions`` or just its mode (``"anchor"``, ``"roi"``, ``"none"``)."""
    names = _names(layers)
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if letterbox is not None and letterbox not in LETTERBOXES:
        raise ValueError(f"unknown letterbox policy {letterbox!r}; choose one of {', '.join(LETTERBOXES)}")
    if imgsz is not None and imgsz <= 0:
        raise ValueError(f"imgsz must be positive, got {imgsz}")
    return pb.FeatureOptions(
        layers=names,
        dtype=wire.dtype_from_name(dtype) if dtype is not None else pb.DTYPE_UNSPECIFIED,
        pooling=POOLINGS[pooling] if pooling is not None else pb.POOLING_UNSPECIFIED,
        letterbox=LETTERBOXES[letterbox] if letterbox is not None else pb.LETTERBOX_POLICY_UNSPECIFIED,
        imgsz=imgsz or 0,
        detection=(DetectOptions() if detect is True else detect).to_proto() if detect else None,
        object_features=(ObjectFeatureOptions(objects) if isinstance(objects, str) else objects).to_proto()
        if objects is not None else None,
    )


def _check_encoding(encoding: str, quality: int) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")


def fill_frame(frame: pb.Frame, image: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> None:
    """Put ``image`` (BGR, BGRA or grey, uint8, as OpenCV returns it) into a Frame message, encoded as asked.

    PNG uses the fastest compression level (it is lossless at every level); ``quality`` applies to JPEG only. An
    :class:`~yolostream.client.sources.ImageFile` (a frame of an image source) whose file is already in the chosen
    encoding goes as the file's own bytes: re-encoding would change the pixels the server sees.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = f"array of {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"frames must be uint8 numpy arrays (BGR, as OpenCV reads them), got {kind}")
    own = file_bytes(image, encoding)
    if own is not None:
        frame.encoded = own
        return
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or image.size == 0:
        raise ValueError(f"frames must be HxWx3 BGR, HxWx4 BGRA or HxW grey images, got shape {image.shape}")
    if encoding == "raw":
        h, w = image.shape[:2]
        channels = 1 if image.ndim == 2 else 3
        frame.raw.data = np.ascontiguousarray(image).tobytes()
        frame.raw.height, frame.raw.width, frame.raw.channels = h, w, channels
        frame.raw.format = pb.PIXEL_FORMAT_GRAY if channels == 1 else pb.PIXEL_FORMAT_BGR
        return
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} frame as {encoding}")
    frame.encoded = buf.tobytes()


class FeatureClient:
    """A connection to a yolostream server or to several replicas; use it as a context manager.

    ``address`` is ``host:port``, a list of ``ip:port`` replicas (or one comma-separated string of them), or any
    gRPC target (``dns:///name:port``, ``ipv4:a:p,b:p``). Calls are balanced round-robin over the replicas that
    are up and report SERVING on their health service; a replica that drains or warms up gets no new calls.
    ``token`` is sent as ``authorization: Bearer <token>`` with every call. TLS is used when ``tls`` is true or
    ``tls_ca`` (a PEM file of root certificates; the system roots otherwise) is given; ``tls_server_name`` overrides
    the name the certificate must carry (required with a list of IP addresses, which names no host). ``timeout``
    (seconds) is the deadline of ``model_info`` and ``extract``; streams have none, as a camera may run for days, and
    rely on keepalive pings every ``keepalive_s`` (answered within ``keepalive_timeout_s``) to notice a server host
    that disappears without closing the connection. ``resume`` (a :class:`ResumePolicy`, or False to turn it off)
    says how streams move to another replica when theirs fails; it is on by default. ``settle_s`` is how long the
    first streams of a new client wait for every replica to connect, so that they spread (see ``_settle``; None:
    ``DEFAULT_SETTLE_S``, or 0 when the target is one IP address, which cannot name several replicas).
    """

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *, token: str | None = None,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_server_name: str | None = None,
                 timeout: float | None = 30.0, max_message_bytes: int = MAX_MESSAGE_BYTES, keepalive_s: float = 20.0,
                 keepalive_timeout_s: float = 10.0, resume: ResumePolicy | bool = True,
                 settle_s: float | None = None) -> None:
        target = channel_target(address)
        self.address = address if isinstance(address, str) else ",".join(address)
        self.target = target
        self.timeout = timeout
        self.resume = resume_policy(resume, ResumePolicy())
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            # Every ping gets this deadline too: without it, a BDP-probe ping that is in flight when the server
            # freezes is never timed out and keeps the keepalive ping from being sent (measured: a stream to a
            # SIGSTOPped server then hangs forever instead of failing after keepalive_s + keepalive_timeout_s).
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            *balancing_options(),
        ]
        if tls or tls_ca is not None:
            if is_address_list(target) and not tls_server_name:
                raise ValueError("TLS over a list of IP addresses needs tls_server_name (--tls-server-name): the "
                                 "name every replica's certificate carries")
            root = Path(tls_ca).read_bytes() if tls_ca is not None else None
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        # When a replica was first reached (a call answered, or the channel seen ready): a stream that fails
        # before that has nothing to resume and fails at once. Found without a standing connectivity subscription,
        # whose polling thread races channel.close() in grpcio ("Cannot monitor channel state: Channel closed!").
        self._reached_at: float | None = None
        self.settle_s = (0.0 if names_one_address(target) else DEFAULT_SETTLE_S) if settle_s is None else settle_s
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._in_flight_default: int | None = None
        self._class_names: tuple[str, ...] | None = None

    @property
    def _reached(self) -> bool:
        return self._reached_at is not None

    def _mark_reached(self) -> None:
        if self._reached_at is None:
            self._reached_at = time.monotonic()

    def _settle(self) -> None:
        """Before the first streams of a new channel, give every replica ``settle_s`` to connect.

        round_robin spreads calls over the replicas that are ready *when each call starts*; the first replica to
        answer its health check makes the channel ready while the others are still connecting, so streams opened
        at once on a new client would all land on it and, being long-lived, stay there (measured on 3 loopback
        replicas and a loaded 2-core machine, 6 streams: 0/4/2 without settling, 1/4/1 with 0.25 s, 2/2/2 with
        1 s). Waiting ``settle_s`` after the channel first became ready (and at most ``settle_s`` for it to)
        costs that once per client.
        """
        if self.settle_s <= 0:
            return
        if self._reached_at is None:
            self._wait_ready(self.settle_s)
        if self._reached_at is not None:
            left = self._reached_at + self.settle_s - time.monotonic()
            if left > 0:
                threading.Event().wait(left)

    def _wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a replica that is up and healthy; False if none came."""
        if timeout <= 0:
            return False
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
            self._mark_reached()
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()

    def __enter__(self) -> "FeatureClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; streams still open on it end with an error."""
        self._channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            reply = method(request, timeout=self.timeout, metadata=self._metadata)
            self._mark_reached()
            return reply
        except grpc.RpcError as err:
            raise FeatureServerError.from_rpc(err, self.address) from None

    def model_info(self) -> ModelInfo:
        """The served model, its layer catalogue, the server's defaults and limits."""
        info = ModelInfo.from_proto(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        self._in_flight_default = int(info.batching["max_in_flight"]) or SERVER_DEFAULT_IN_FLIGHT
        self._class_names = info.class_names
        return info

    def class_names(self) -> tuple[str, ...]:
        """The served model's class names (asked once; empty when its checkpoint carries none)."""
        if self._class_names is None:
            self.model_info()
        return self._class_names

    def _server_in_flight(self) -> int:
        """The server's default max_in_flight (asked once): the send window follows what the server will hold."""
        if self._in_flight_default is None:
            self.model_info()
        return self._in_flight_default

    def extract(self, image: np.ndarray, *, layers: str | Sequence[str | int] | None = None,
                dtype: str | None = None, pooling: str | None = None, letterbox: str | None = None,
                imgsz: int | None = None, encoding: str = "png", quality: int = 90,
                detect: DetectOptions | bool | None = None, objects: ObjectFeatureOptions | str | None = None,
                boxes: Any = None, box_ids: Any = None) -> FeatureResult:
        """Features of one BGR image (lossless PNG by default, so they equal ``yolostream extract``'s).

        ``detect`` and ``objects`` as for :func:`feature_options`. ``boxes``: your own (N, 4) x1, y1, x2, y2 boxes
        in image pixels, each to get an object vector instead of running detection, with optional ``box_ids``
        (N integers, echoed in ``result.detections.box_ids``).
        Raises FrameError when the server cannot process the image, FeatureServerError for a bad request.
        """
        _check_encoding(encoding, quality)
        request = pb.ExtractRequest(options=feature_options(layers, dtype, pooling, letterbox, imgsz, detect,
                                                            objects))
        fill_frame(request.frame, image, encoding, quality)
        if boxes is not None:
            wire.set_frame_boxes(request.frame, boxes, box_ids)
        request.frame.capture_timestamp_us = int(round(time.time() * 1e6))
        names = self.class_names() if detect else ()
        start = time.perf_counter()
        msg = self._unary(self._stub.Extract, request)
        result = _result_from_proto(msg, time.perf_counter() - start, None, names)
        if result.status != "ok":
            raise FrameError(f"server {self.address} could not process the image: {result.error}")
        return result

    def stream(self, frames: Iterable[np.ndarray | tuple[np.ndarray, float]], *,
               layers: str | Sequence[str | int] | None = None, dtype: str | None = None,
               pooling: str | None = None, letterbox: str | None = None, imgsz: int | None = None,
               realtime: bool = False, max_in_flight: int | None = None, encoding: str = "jpeg",
               quality: int = 90, keep_images: bool = False,
               resume: ResumePolicy | bool | None = None, detect: DetectOptions | bool | None = None,
               objects: ObjectFeatureOptions | str | None = None) -> "FeatureStream":
        """Stream ``frames`` (BGR arrays, or ``(array, capture_time_seconds)`` pairs) and iterate over the results.

        A frame may also come with boxes of its own, as ``(array, time, boxes)`` or ``(array, time, boxes, ids)``
        (time may be None): those boxes get object vectors instead of detection (a tracker's predicted boxes,
        say). ``detect`` and ``objects`` as for :func:`feature_options`.

        Results come in frame order, one per frame, with frame ids 0, 1, 2... in the order of ``frames``; a frame
        without a timestamp is stamped with ``time.time()`` when read. ``max_in_flight`` is how many frames the
        server holds at once (None: the server's default, from GetModelInfo); ``keep_images`` puts each frame on its result (``image``),
        for drawing. The iterable is consumed in a background thread; an exception it raises (a camera that
        disappears) is re-raised after the results of the frames read before it. ``resume`` overrides the client's
        policy for this stream (False: end with UNAVAILABLE as soon as the replica carrying it fails).
        """
        _check_encoding(encoding, quality)
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        config = pb.StreamConfig(options=feature_options(layers, dtype, pooling, letterbox, imgsz, detect, objects),
                                 max_in_flight=max_in_flight or 0, realtime=realtime)
        names = self.class_names() if detect else ()
        window = None if realtime else 2 * (max_in_flight or self._server_in_flight())
        self._settle()
        return FeatureStream(self, frames, config, encoding=encoding, quality=quality, window=window,
                             keep_images=keep_images, policy=resume_policy(resume, self.resume), class_names=names)

    def _open_stream(self, requests: Iterator[pb.StreamRequest]) -> Any:
        return self._stub.StreamFeatures(requests, metadata=self._metadata)


@dataclass
class _Pending:
    """A frame read from the source and not answered yet: kept, encoded, so that it can be sent again."""

    request: pb.StreamRequest
    image: np.ndarray | None
    sent: float | None = None
    sends: int = 0


@dataclass
class _Attempt:
    """One StreamFeatures call of a stream; ``cursor`` is the id of the next frame its request iterator sends."""

    cursor: int
    closed: bool = False


class _SendState:
    """Shared by the sender thread, gRPC's request threads and the reader; never references the FeatureStream,
    so that dropping the stream object lets it be finalised (and closed) while the threads still run.

    Frames are numbered 0, 1, 2... as read; ``answered`` is the lowest id without an answer, ``read`` the next id,
    and ``frames`` holds every id in between. Each attempt (call) sends from its own cursor, so a new call can start
    again at ``answered`` while the sender keeps adding frames. ``room`` bounds how far the sender reads ahead: the
    window of unanswered frames outside realtime mode, the frames not yet taken by the current call in it.
    """

    def __init__(self, window: int | None, send_ahead: int) -> None:
        self.cond = threading.Condition()
        self.window = window
        self.send_ahead = send_ahead
        self.stop = threading.Event()
        self.frames: dict[int, _Pending] = {}
        self.read = 0
        self.answered = 0
        self.source_done = False
        self.error: BaseException | None = None
        self.attempt = _Attempt(0)

    def has_room(self) -> bool:
        if self.window is not None:
            return self.read - self.answered < self.window
        return self.read - self.attempt.cursor < self.send_ahead

    def wait_for_room(self) -> bool:
        """Block until the sender may read another frame; False once the stream is closed."""
        with self.cond:
            self.cond.wait_for(lambda: self.stop.is_set() or self.has_room())
            return not self.stop.is_set()

    def add(self, pending: _Pending) -> None:
        with self.cond:
            self.frames[self.read] = pending
            self.read += 1
            self.cond.notify_all()

    def answer(self, frame_id: int) -> _Pending | None:
        """Take the answered frame out; answers come in frame order, so it is the lowest unanswered one."""
        with self.cond:
            pending = self.frames.pop(frame_id, None)
            self.answered = max(self.answered, frame_id + 1)
            self.cond.notify_all()
            return pending

    def new_attempt(self) -> _Attempt:
        """Close the current call's request iterator and start another at the first unanswered frame."""
        with self.cond:
            self.attempt.closed = True
            self.attempt = _Attempt(self.answered)
            self.cond.notify_all()
            return self.attempt

    def finish(self) -> None:
        """Wake every waiting thread after ``stop`` was set."""
        self.stop.set()
        with self.cond:
            self.attempt.closed = True
            self.cond.notify_all()


def _send_frames(state: _SendState, frames: Iterable[Any], encoding: str, quality: int, keep_images: bool) -> None:
    """Sender thread: read and encode frames until the source ends, fails or the stream is closed."""
    iterator = iter(frames)
    try:
        while state.wait_for_room():
            try:
                item = next(iterator)
            except StopIteration:
                break
            boxes = ids = None
            if isinstance(item, tuple):
                if not 2 <= len(item) <= 4:
                    raise ValueError(f"a frame tuple is (image, time[, boxes[, ids]]), got {len(item)} items")
                image, timestamp, boxes, ids = (*item, None, None)[:4]
            else:
                image, timestamp = item, None
            if timestamp is None:
                timestamp = time.time()
            request = pb.StreamRequest()
            fill_frame(request.frame, image, encoding, quality)
            if boxes is not None:
                wire.set_frame_boxes(request.frame, boxes, ids)
            request.frame.frame_id = state.read
            request.frame.capture_timestamp_us = int(round(float(timestamp) * 1e6))
            state.add(_Pending(request, image if keep_images else None))
    except BaseException as err:  # re-raised in the reader's thread once the answers are in
        state.error = err
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # a source failing to release must not hide the stream's own outcome
                log.exception("closing the frame source failed")
        with state.cond:
            state.source_done = True
            state.cond.notify_all()


def _requests(state: _SendState, attempt: _Attempt, config: pb.StreamConfig) -> Iterator[pb.StreamRequest]:
    """The request iterator of one call, consumed by gRPC in its own thread: the config, then every frame from the
    attempt's cursor on, until the source ends (the half-close lets the server finish) or the attempt is closed."""
    yield pb.StreamRequest(config=config)
    while True:
        with state.cond:
            state.cond.wait_for(lambda: attempt.closed or max(attempt.cursor, state.answered) < state.read
                                or state.source_done)
            following = max(attempt.cursor, state.answered)
            if attempt.closed or following >= state.read:
                return  # closed, or the source ended and every frame went out on this call
            pending = state.frames[following]
            attempt.cursor = pending.request.frame.frame_id + 1
            pending.sends += 1
            if pending.sent is None:
                pending.sent = time.perf_counter()
            state.cond.notify_all()
        yield pending.request


class FeatureStream:
    """An iterator of :class:`FeatureResult`, one per frame in frame order; also a context manager.

    When the replica carrying the stream fails (UNAVAILABLE: it died, drained, or keepalive found it frozen), the
    stream is reopened over the same channel, which round_robin places on a healthy replica, and the frames sent
    but not answered are sent again: every frame still gets exactly one result, in order, and ``retries`` on a
    result says how many times it was re-sent. ``resumes`` counts the reopenings. The policy bounds the attempts
    and the time; past them the stream ends with FeatureServerError UNAVAILABLE. A stream whose first call fails
    while the channel has never reached any replica fails at once (there is nothing to resume).

    ``close()`` stops early: it cancels the call and joins the sender thread. It runs by itself when the iteration
    ends, fails, or the object is garbage-collected. ``frames_read`` counts frames taken from the source.
    """

    def __init__(self, client: FeatureClient, frames: Iterable[Any], config: pb.StreamConfig, *, encoding: str,
                 quality: int, window: int | None, keep_images: bool, policy: ResumePolicy,
                 class_names: Sequence[str] = ()) -> None:
        self._closed = True  # until fully started, so that a failed start leaves nothing for __del__ to close
        self._client = client
        self._config = config
        self._policy = policy
        self._class_names = tuple(class_names)
        self._address = client.address
        self._state = state = _SendState(window, REALTIME_SEND_QUEUE)
        self._sender = threading.Thread(target=_send_frames, args=(state, frames, encoding, quality, keep_images),
                                        name="yolostream-sender", daemon=True)
        self._call = client._open_stream(_requests(state, state.attempt, config))
        self.resumes = 0
        self._cut: tuple[float, FeatureServerError] | None = None  # when and why the stream was cut, until an answer
        self._failures = 0
        # Cancels a resumed call that has not answered by the end of the resume time (a replica that accepts the
        # connection but never answers would otherwise hold the stream for as long as keepalive takes to tell).
        self._watchdog = threading.Timer(0, lambda: None)
        self._expired = threading.Event()
        self._sender.start()
        self._closed = False

    @property
    def frames_read(self) -> int:
        return self._state.read

    def __iter__(self) -> "FeatureStream":
        return self

    def __next__(self) -> FeatureResult:
        if self._closed:
            raise StopIteration
        state = self._state
        while True:
            try:
                msg = next(self._call)
            except StopIteration:
                self.close()
                if state.error is not None:
                    raise state.error from None
                raise
            except grpc.RpcError as err:
                error = FeatureServerError.from_rpc(err, self._address)
                if self._expired.is_set():
                    self._give_up(error)
                self._resume_or_raise(error)
                continue
            except BaseException:
                self.close()
                raise
            result = msg.result
            if (self._policy.enabled and result.status == pb.FRAME_STATUS_ERROR
                    and result.error_message.startswith(DRAIN_REFUSAL)):
                self._resume_or_raise(FeatureServerError(grpc.StatusCode.UNAVAILABLE, result.error_message,
                                                         self._address))
                continue
            break
        received = time.perf_counter()
        if result.frame_id != state.answered:
            self.close()
            raise FeatureServerError(grpc.StatusCode.INTERNAL, f"answer for frame {result.frame_id} while frame "
                                     f"{state.answered} was expected: answers must come once each, in order",
                                     self._address)
        pending = state.answer(result.frame_id)
        self._client._mark_reached()
        if self._cut is not None:
            self._watchdog.cancel()
            self._cut, self._failures = None, 0
        sent = pending.sent if pending is not None else None
        answer = _result_from_proto(result, received - sent if sent is not None else None,
                                    pending.image if pending is not None else None, self._class_names)
        answer.retries = max(0, pending.sends - 1) if pending is not None else 0
        return answer

    def _resume_or_raise(self, error: FeatureServerError) -> None:
        """Reopen the stream after ``error``, or close it and raise: not resumable, or out of attempts or time."""
        policy = self._policy
        if not policy.enabled or error.code not in RESUMABLE_CODES or not self._client._reached:
            self.close()
            raise error
        now = time.monotonic()
        if self._cut is None:
            self._cut = (now, error)
        since = self._cut[0]
        self._failures += 1
        remaining = since + policy.timeout_s - now
        if self._failures > policy.max_attempts or remaining <= 0:
            self._give_up(error)
        self._state.stop.wait(min(policy.backoff(self._failures), remaining))
        if not self._client._wait_ready(since + policy.timeout_s - time.monotonic()):
            self._give_up(error)
        if self._state.stop.is_set():
            raise StopIteration
        self._call.cancel()
        attempt = self._state.new_attempt()
        log.info("resuming the stream at frame %d after %s", attempt.cursor, error)
        self._call = call = self._client._open_stream(_requests(self._state, attempt, self._config))
        self.resumes += 1
        self._watchdog.cancel()
        self._watchdog = threading.Timer(max(0.0, since + policy.timeout_s - time.monotonic()), self._expire, (call,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self, call: Any) -> None:
        """Watchdog: the resume time ran out before the resumed call answered; end it, and the stream with it."""
        if call is self._call and self._cut is not None:
            self._expired.set()
            call.cancel()

    def _give_up(self, last: FeatureServerError) -> None:
        since, first = self._cut
        self.close()
        policy = self._policy
        raise FeatureServerError(
            grpc.StatusCode.UNAVAILABLE,
            f"stream lost and not resumed within {policy.timeout_s:g} s / {policy.max_attempts} attempt(s) "
            f"({self._failures - 1} reopening(s) over {time.monotonic() - since:.1f} s); cut by: {first.details}"
            + (f"; last: {last.details}" if last is not first else ""),
            self._address) from None

    def close(self) -> None:
        """End the stream now; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        self._state.finish()
        self._call.cancel()
        if self._sender is not threading.current_thread():
            # The sender notices the stop at once, unless it is inside a source read; a network camera that hangs
            # there must not hang the caller too (the thread is a daemon).
            self._sender.join(timeout=SENDER_JOIN_S)
            if self._sender.is_alive():
                log.warning("the frame source did not return within %.0f s; leaving its thread behind", SENDER_JOIN_S)

    def __enter__(self) -> "FeatureStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
