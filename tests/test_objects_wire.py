"""DetectionOptions / ObjectFeatureOptions messages become validated device-side options, or a clear error."""

from __future__ import annotations

import pytest

from conftest import cpu_runner
from yolostream.server.common.object_request import NmsOptions, ObjectOptions
from yolostream.server.frontend.objects_wire import default_detection_message, object_request
from yolostream.v1 import feature_service_pb2 as pb


@pytest.fixture(scope="module")
def card():
    return cpu_runner().card()


def test_zero_fields_mean_upstreams_defaults_and_anchor_vectors_on_the_detect_inputs(card):
    req = object_request(pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True)), card)
    assert req.detection == NmsOptions()
    assert req.objects == ObjectOptions()
    assert req.layers == (("P3", 17, 8, 64), ("P4", 20, 16, 128), ("P5", 23, 32, 256))
    assert req.dim == 448 and req.slices[1] == ("P4", 20, 16, 64, 192)


def test_detection_is_off_unless_enabled_and_vectors_can_be_turned_off(card):
    req = object_request(pb.FeatureOptions(
        object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_NONE)), card)
    assert req.detection is None and req.objects is None and req.dim == 0


def test_every_option_is_passed_through(card):
    msg = pb.FeatureOptions(
        detection=pb.DetectionOptions(enabled=True, conf_thres=0.5, iou_thres=0.6, classes=[0, 2], agnostic=True,
                                      multi_label=True, max_det=5),
        object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI, layers=["P3", "9"], normalize=True,
                                                dtype=pb.DTYPE_FLOAT16, roi_size=3, flatten=True),
    )
    req = object_request(msg, card)
    assert req.detection == NmsOptions(0.5, 0.6, (0, 2), True, True, 5)
    assert req.objects == ObjectOptions("roi", 3, True, True, "float16")
    assert req.layers == (("P3", 17, 8, 64 * 9), ("9", 9, 32, 256 * 9))


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, conf_thres=1.5)),
         r"detection conf_thres 1.5 is out of range: choose a value in \(0, 1\] \(or 0 for the default 0.25\)"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, iou_thres=-0.5)), "detection iou_thres -0.5"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, max_det=30001)),
         "detection max_det 30001 is out of range: choose 1..30000"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, classes=[3, 80])),
         r"detection unknown class id\(s\) \[80\]: the model has classes 0..79"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(mode=7)),
         "unknown object feature mode 7: choose OBJECT_FEATURE_MODE_UNSPECIFIED"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(roi_size=17, mode=pb.OBJECT_FEATURE_MODE_ROI)),
         "object features: roi_size must be an integer between 1 and 16"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(flatten=True)),
         "object features: flatten applies to roi mode only"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(dtype=9)), "unsupported tensor dtype 9"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(layers=["P9"])),
         "object features: unknown layer 'P9': valid layers are"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, classes=list(range(70, 200)))),
         r"unknown class id\(s\) \[80, 81, 82, 83, 84 …\]"),
    ],
)
def test_bad_options_name_the_problem(msg, message, card):
    with pytest.raises(ValueError, match=message):
        object_request(msg, card)


def test_default_detection_message_states_upstreams_defaults():
    msg = default_detection_message()
    assert (round(msg.conf_thres, 6), round(msg.iou_thres, 6), msg.max_det) == (0.25, 0.45, 300)
