"""The wire's detection and object-feature options, validated into the device-side option objects.

A stream config or Extract request carries ``DetectionOptions`` and ``ObjectFeatureOptions`` messages whose zero
values mean "the default" (proto3 has no unset scalars). This module applies those defaults (upstream's, for
NMS) and turns a bad value into a ValueError that names the field and its valid range, which the service sends
back as INVALID_ARGUMENT.
"""

from __future__ import annotations

import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from ..common.card import ModelCard
from ..common.object_request import MAX_NMS, NmsOptions, ObjectOptions, ObjectRequest

_DEFAULT_NMS = NmsOptions()
_DEFAULT_OBJECTS = ObjectOptions()
_MODES = {pb.OBJECT_FEATURE_MODE_ANCHOR: "anchor", pb.OBJECT_FEATURE_MODE_ROI: "roi"}


def object_request(msg: pb.FeatureOptions, card: ModelCard) -> ObjectRequest:
    """Validate the detection and object-feature parts of ``msg`` for the served model, with the vector layers
    bound to the model's layers (ValueError names the problem and the valid choices)."""
    detection = detection_options(msg.detection, card.num_classes)
    if detection is not None and not card.detect_inputs:
        raise ValueError(f"detection: the model {card.name} has no Detect head")
    objects = object_options(msg.object_features)
    if objects is None:
        return ObjectRequest(detection, None)
    if msg.object_features.layers:
        try:
            chosen = card.resolve(list(msg.object_features.layers))
        except ValueError as err:
            raise ValueError(f"object features: {err}") from None
    else:
        chosen = card.default_object_layers()
    layers = tuple((layer.name, layer.index, layer.stride, objects.width(card.channels(layer.index)))
                   for layer in chosen)
    return ObjectRequest(detection, objects, layers)


def detection_options(msg: pb.DetectionOptions, nc: int) -> NmsOptions | None:
    """NmsOptions from a DetectionOptions message (zero fields → upstream's defaults), None when not enabled.

    ``classes`` is kept sorted and without repeats (the filter is a set): a client that sends a million copies of
    one id gets the options, and the cost per frame, of sending it once."""
    if not msg.enabled:
        return None
    for name in ("conf_thres", "iou_thres"):
        value = getattr(msg, name)
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"detection {name} {value} is out of range: choose a value in (0, 1] "
                             f"(or 0 for the default {getattr(_DEFAULT_NMS, name)})")
    if msg.max_det > MAX_NMS:
        raise ValueError(f"detection max_det {msg.max_det} is out of range: choose 1..{MAX_NMS} "
                         f"(or 0 for the default {_DEFAULT_NMS.max_det})")
    options = NmsOptions(
        conf_thres=_decimal(msg.conf_thres) or _DEFAULT_NMS.conf_thres,
        iou_thres=_decimal(msg.iou_thres) or _DEFAULT_NMS.iou_thres,
        classes=tuple(sorted(set(msg.classes))) or None,
        agnostic=msg.agnostic,
        multi_label=msg.multi_label,
        max_det=msg.max_det or _DEFAULT_NMS.max_det,
    )
    try:
        return options.validate(nc)
    except ValueError as err:
        raise ValueError(f"detection {err}") from None


def _decimal(value: float) -> float:
    """The decimal a client meant by a float32 field: 0.45 travels as 0.449999988…, and NMS compares in double."""
    return float(str(np.float32(value)))


def object_options(msg: pb.ObjectFeatureOptions) -> ObjectOptions | None:
    """ObjectOptions from an ObjectFeatureOptions message (zero fields → defaults), None for mode NONE."""
    if msg.mode == pb.OBJECT_FEATURE_MODE_NONE:
        return None
    mode = _MODES.get(msg.mode or pb.OBJECT_FEATURE_MODE_ANCHOR)
    if mode is None:
        raise ValueError(f"unknown object feature mode {msg.mode}: choose "
                         + ", ".join(pb.ObjectFeatureMode.Name(v) for v in pb.ObjectFeatureMode.values()))
    if msg.dtype and msg.dtype not in wire.ITEMSIZE:
        raise ValueError(f"object features: unsupported tensor dtype {msg.dtype}: choose "
                         + ", ".join(pb.Dtype.Name(v) for v in sorted(wire.ITEMSIZE))
                         + " (or leave it unset for float32)")
    dtype = wire.dtype_name(msg.dtype) if msg.dtype else _DEFAULT_OBJECTS.dtype
    options = ObjectOptions(mode=mode, roi_size=msg.roi_size or _DEFAULT_OBJECTS.roi_size, flatten=msg.flatten,
                            normalize=msg.normalize, dtype=dtype)
    try:
        return options.validate()
    except ValueError as err:
        raise ValueError(f"object features: {err}") from None


def default_detection_message() -> pb.DetectionOptions:
    """Upstream's NMS defaults as a DetectionOptions, for ModelInfo.default_detection."""
    d = _DEFAULT_NMS
    return pb.DetectionOptions(enabled=False, conf_thres=d.conf_thres, iou_thres=d.iou_thres, agnostic=d.agnostic,
                               multi_label=d.multi_label, max_det=d.max_det)
