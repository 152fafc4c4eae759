"""What a client asks of a yolostream server: feature, detection and object-vector options as messages, and one
image encoded into a ``Frame`` (JPEG, PNG, raw, or a file's own bytes).

Torch-free: protobuf, numpy and OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab, wire

from .sources import file_bytes

ENCODINGS = ("jpeg", "png", "raw")
POOLINGS = vocab.POOLINGS
LETTERBOXES = vocab.LETTERBOX_POLICIES
COMPRESSIONS = vocab.COMPRESSIONS


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
    P3, P4, P5), ``normalize`` (unit-norm rows, each layer an equal share), ``dtype`` (float32, float16,
    bfloat16 or uint8: 8-bit codes with a scale and offset per column, decoded to float32 in
    ``result.object_features``, raw in ``result.codes["object_features"]``), ``roi_size`` (roi mode: k×k samples,
    default 7), ``flatten`` (roi mode: keep all k×k samples).
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
    ``dtype``: ``float32``, ``float16``, ``bfloat16`` or ``uint8`` (8-bit codes with a scale and offset per channel,
    a quarter of float32's bytes; results decode them to float32).
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


@dataclass(frozen=True)
class TrackOptions:
    """Server-side tracking of a stream's boxes (``StreamConfig.tracking``): each result's ``detections`` then carry
    ``track_ids`` (stable within ``result.track_epoch``) and ``track_new``. None fields take the server's defaults,
    documented on the proto's ``TrackingOptions``: ``high_score`` (0.5), ``low_score`` (0.1), ``new_track_score``
    (0.6), ``match_iou`` (0.2), ``appearance_threshold`` (cosine distance, 0.7), ``appearance_weight`` (0.5; 0 is
    IoU-only), ``max_lost`` frames (30), ``vector_smoothing`` (0.9); ``max_tracks`` (0: the server's 256);
    ``return_vectors`` puts each box's track vector on ``result.track_vectors``.
    """

    high_score: float | None = None
    low_score: float | None = None
    new_track_score: float | None = None
    match_iou: float | None = None
    appearance_threshold: float | None = None
    appearance_weight: float | None = None
    max_lost: int | None = None
    vector_smoothing: float | None = None
    max_tracks: int = 0
    return_vectors: bool = False

    def to_proto(self, previous_epoch: int = 0) -> pb.TrackingOptions:
        """The message; ``previous_epoch``: the last epoch seen, when a stream resumes (the server's is one more)."""
        msg = pb.TrackingOptions(enabled=True, max_tracks=int(self.max_tracks), return_vectors=self.return_vectors,
                                 previous_epoch=int(previous_epoch))
        for field in msg.DESCRIPTOR.fields:  # the message's optional fields, which these None fields mirror
            value = getattr(self, field.name) if field.containing_oneof is not None else None
            if value is not None:
                setattr(msg, field.name, value)
        return msg


def stream_tracking(track: "TrackOptions | bool | None") -> pb.TrackingOptions | None:
    """The StreamConfig.tracking for ``stream(track=...)``: True for the defaults, a TrackOptions, or None/False."""
    if track is None or track is False:
        return None
    if track is True:
        return TrackOptions().to_proto()
    if isinstance(track, TrackOptions):
        return track.to_proto()
    raise TypeError(f"track must be True, False, None or a TrackOptions, got {type(track).__name__}")


def stream_compression(name: str | None) -> int:
    """The StreamConfig.compression for ``name``: None or ``"none"`` (plain bytes), or ``"zstd"`` (byte shuffle, then
    Zstandard; lossless). ValueError for another name; ``wire.CodecMissingError`` (an ImportError naming the
    ``compress`` extra) when ``zstd`` is asked for and the zstandard package is missing, so a stream fails before
    its first frame rather than at its first compressed answer.

    Args:
        name: the codec's name (``vocab.COMPRESSIONS``).
    """
    if name is None:
        return pb.COMPRESSION_UNSPECIFIED
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
    if COMPRESSIONS[name] == pb.COMPRESSION_SHUFFLE_ZSTD:
        wire.zstd_module()
    return COMPRESSIONS[name]


def check_encoding(encoding: str, quality: int) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")


def frame_pixels(image: np.ndarray) -> np.ndarray:
    """``image`` as uncompressed frames carry it: HxW grey or HxWx3 BGR, uint8 (BGRA loses its alpha channel, HxWx1
    becomes HxW; no copy otherwise). ValueError for anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = f"array of {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"frames must be uint8 numpy arrays (BGR, as OpenCV reads them), got {kind}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or image.size == 0:
        raise ValueError(f"frames must be HxWx3 BGR, HxWx4 BGRA or HxW grey images, got shape {image.shape}")
    return image


def fill_frame(frame: pb.Frame, image: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> None:
    """Put ``image`` (BGR, BGRA or grey, uint8, as OpenCV returns it) into a Frame message, encoded as asked.

    PNG uses the fastest compression level (it is lossless at every level); ``quality`` applies to JPEG only. An
    :class:`~yolostream.client.sources.ImageFile` (a frame of an image source) whose file is already in the chosen
    encoding goes as the file's own bytes: re-encoding would change the pixels the server sees.
    """
    own = file_bytes(image, encoding) if isinstance(image, np.ndarray) and image.dtype == np.uint8 else None
    if own is not None:
        frame.encoded = own
        return
    image = frame_pixels(image)
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
