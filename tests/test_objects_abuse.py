"""Abuse of detections and object vectors: hostile options, hostile boxes, cancellation, mixed streams.

Every bad stream option must end only its own call with INVALID_ARGUMENT and a short message naming the field
(however much the client sent); every bad box must fail only its frame; nothing may leak shared memory or hang.
test_objects_service.py checks the happy paths and a first set of errors; this file walks the edges.
"""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from conftest import cli_cmd, cpu_runner, in_process_server, raw_frame, serve_env
from yolostream.client import DetectOptions, FeatureClient, FrameError, ObjectFeatureOptions
from yolostream.client.cli import read_boxes
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.server.model.objects import ObjectLayer, object_features
from yolostream.server.common.object_request import ObjectOptions
from yolostream.server.frontend.objects_wire import detection_options
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

#: Longest details an INVALID_ARGUMENT may carry here, whatever the client sent.
SHORT = 400
MAX_BOXES = 4


@pytest.fixture(scope="module")
def server():
    with in_process_server(max_boxes=MAX_BOXES) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.FeatureServiceStub(channel)
    channel.close()


def _stream(stub, options: pb.FeatureOptions, frames: list[pb.Frame], **config) -> list[pb.FrameResult]:
    requests = [pb.StreamRequest(config=pb.StreamConfig(options=options, **config))]
    requests += [pb.StreamRequest(frame=f) for f in frames]
    return [r.result for r in stub.StreamFeatures(iter(requests), timeout=30)]


def _boxed(k: int, values, ids=()) -> pb.Frame:
    frame = raw_frame(k)
    frame.boxes[:] = list(values)
    frame.box_ids[:] = list(ids)
    return frame


def _det(**fields) -> pb.FeatureOptions:
    return pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG,
                             detection=pb.DetectionOptions(enabled=True, **fields))


def _obj(**fields) -> pb.FeatureOptions:
    return pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG,
                             object_features=pb.ObjectFeatureOptions(**fields))


def _wait_idle(server, timeout: float = 5.0) -> None:
    """Until the front-end holds nothing at the device and no shared memory, at most ``timeout`` s."""
    link = server.server.link
    deadline = time.monotonic() + timeout
    while (link.in_flight or link.slots._used) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert link.in_flight == 0, f"{link.in_flight} frames still at the device"
    assert link.slots._used == {}, f"arena slots still held: {link.slots._used}"
    assert link._credit._value == link.capacity


# -- stream options ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("conf inf", _det(conf_thres=float("inf")), "conf_thres inf"),
    ("conf -inf", _det(conf_thres=float("-inf")), "conf_thres -inf"),
    ("conf nan", _det(conf_thres=float("nan")), "conf_thres nan"),
    ("conf negative", _det(conf_thres=-0.1), "conf_thres -0.1"),
    ("conf over 1", _det(conf_thres=1.0001), "conf_thres 1.0001"),
    ("iou inf", _det(iou_thres=float("inf")), "iou_thres inf"),
    ("iou negative", _det(iou_thres=-1e-6), "iou_thres -"),
    ("max_det 30001", _det(max_det=30001), "max_det 30001 is out of range: choose 1..30000"),
    ("max_det uint32 max", _det(max_det=2**32 - 1), "max_det 4294967295"),
    ("class -1", _det(classes=[-1]), "unknown class id(s) [-1]"),
    ("class 80", _det(classes=[0, 80]), "unknown class id(s) [80]"),
    ("class int32 extremes", _det(classes=[2**31 - 1, -2**31]), "unknown class id(s)"),
    ("a million bad classes", _det(classes=list(range(100, 1_000_100))), "unknown class id(s) [100, 101, 102, 103, 104 …]"),
    ("mode -1", _obj(mode=-1), "unknown object feature mode -1"),
    ("mode 4", _obj(mode=4), "unknown object feature mode 4"),
    ("roi_size 17", _obj(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=17), "roi_size must be an integer between 1 and 16"),
    ("roi_size uint32 max", _obj(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=2**32 - 1), "got 4294967295"),
    ("flatten with anchor", _obj(mode=pb.OBJECT_FEATURE_MODE_ANCHOR, flatten=True), "flatten applies to roi mode only"),
    ("flatten with the default mode", _obj(flatten=True), "flatten applies to roi mode only"),
    ("dtype 7", _obj(dtype=7), "object features: unsupported tensor dtype 7: choose DTYPE_FLOAT32"),
    ("dtype -1", _obj(dtype=-1), "object features: unsupported tensor dtype -1"),
    ("Detect layer", _obj(layers=["24"]), "object features: layer 24 is the Detect head"),
    ("unknown layer", _obj(layers=["P3", "nope"]), "object features: unknown layer 'nope'"),
    ("empty layer name", _obj(layers=[""]), "object features: unknown layer ''"),
    ("negative index", _obj(layers=["-1"]), "object features: unknown layer '-1'"),
    ("100k-character layer", _obj(layers=["x" * 100_000]), "(100,000 characters)"),
    ("worst case over the message limit",
     pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, max_det=30000),
                       object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=16,
                                                               flatten=True, layers=["all"])),
     "over the server's message limit"),
]


@pytest.mark.parametrize(("options", "words"), [case[1:] for case in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_a_bad_object_option_ends_the_stream_and_the_unary_call_with_a_short_invalid_argument(stub, options, words):
    with pytest.raises(grpc.RpcError) as err:
        _stream(stub, options, [raw_frame(0)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details() and len(err.value.details()) < SHORT, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Extract(pb.ExtractRequest(options=options, frame=raw_frame(0)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details() and len(err.value.details()) < SHORT, err.value.details()


def test_the_server_still_serves_after_every_bad_option(stub):
    [result] = _stream(stub, _det(conf_thres=0.01, max_det=2), [raw_frame(1)])
    assert result.status == pb.FRAME_STATUS_OK and len(result.boxes) == 8


EDGE_OPTIONS = [
    # (name, options, number of boxes: exact int, or a (lo, hi) range)
    ("conf -0.0 is the default", _det(conf_thres=-0.0), None),
    ("conf exactly 1 keeps nothing", _det(conf_thres=1.0), 0),
    ("iou exactly 1", _det(iou_thres=1.0, conf_thres=0.01, max_det=5), 5),
    ("iou denormal", _det(iou_thres=1e-45, conf_thres=0.01, max_det=5), (1, 5)),
    ("max_det 1", _det(max_det=1, conf_thres=1e-6), 1),
    ("max_det 30000", _det(max_det=30000, conf_thres=1e-6), (1, 30000)),
    ("duplicate classes", _det(classes=[3, 3, 3], conf_thres=1e-6, max_det=4), (0, 4)),
    ("mode none ignores roi fields", pb.FeatureOptions(
        detection=pb.DetectionOptions(enabled=True, conf_thres=0.01, max_det=3),
        object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_NONE, roi_size=99, flatten=True)), 3),
    ("disabled detection ignores its fields", pb.FeatureOptions(
        detection=pb.DetectionOptions(enabled=False, conf_thres=5, max_det=99999, classes=[-7])), 0),
    ("object layers all", pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, conf_thres=0.01, max_det=2),
                                            object_features=pb.ObjectFeatureOptions(layers=["all"])), 2),
    ("object layers repeated", pb.FeatureOptions(
        detection=pb.DetectionOptions(enabled=True, conf_thres=0.01, max_det=2),
        object_features=pb.ObjectFeatureOptions(layers=["P3"] * 10_000)), 2),
]


@pytest.mark.parametrize(("options", "count"), [c[1:] for c in EDGE_OPTIONS], ids=[c[0] for c in EDGE_OPTIONS])
def test_edge_values_of_valid_options_are_served(stub, options, count):
    [result] = _stream(stub, options, [raw_frame(2)])
    assert result.status == pb.FRAME_STATUS_OK, result.error_message
    n = len(result.boxes) // 4
    if isinstance(count, tuple):
        assert count[0] <= n <= count[1]
    elif count is not None:
        assert n == count
    found = wire.objects_from_proto(result)
    if found.features is not None:
        assert found.features.shape[0] == n and np.isfinite(found.features).all()
    if len(options.object_features.layers) == 10_000:
        assert found.slices == {"P3": (0, 64)}


def test_class_filter_is_a_set_so_a_million_repeats_cost_nothing():
    msg = pb.DetectionOptions(enabled=True, classes=[5, 0, 5] * 333_334)
    assert detection_options(msg, 80).classes == (0, 5)
    assert detection_options(pb.DetectionOptions(enabled=True), 80).classes is None


def test_repeated_classes_detect_as_the_class_given_once(stub):
    once = _stream(stub, _det(classes=[0], conf_thres=1e-6, max_det=50), [raw_frame(3)])[0]
    many = _stream(stub, _det(classes=[0] * 200_000, conf_thres=1e-6, max_det=50), [raw_frame(3)])[0]
    assert once.status == many.status == pb.FRAME_STATUS_OK
    assert list(once.boxes) == list(many.boxes) and set(many.classes) <= {0}


# -- boxes on frames ----------------------------------------------------------------------------------------------

GOOD = [1, 2, 30, 40]
BAD_BOXES = [
    ("inf", [0, 0, float("inf"), 10], (), "box 0 has a NaN or infinite coordinate"),
    ("-inf", [1, 1, 5, 5, float("-inf"), 0, 5, 10], (), "box 1 has a NaN or infinite coordinate"),
    ("nan", [float("nan")] * 4, (), "box 0 has a NaN"),
    ("max_boxes + 1", GOOD * (MAX_BOXES + 1), (), f"{MAX_BOXES + 1} boxes on one frame; the limit is {MAX_BOXES}"),
    ("100k boxes", GOOD * 100_000, (), f"100000 boxes on one frame; the limit is {MAX_BOXES}"),
    ("ids without boxes", [], (1, 2), "2 box ids for 0 boxes"),
    ("a million ids without boxes", [], range(1_000_000), "1000000 box ids for 0 boxes"),
    ("too few ids", GOOD * 3, (1, 2), "2 box ids for 3 boxes"),
    ("not a multiple of 4", [1, 2, 3, 4, 5], (), "holds 5 values, not 4 per box"),
    ("x2 == x1", [5, 1, 5, 9], (), "box 0 is empty"),
    ("y2 < y1", [1, 9, 5, 1], (), "box 0 is empty"),
]


@pytest.mark.parametrize("mode", [pb.OBJECT_FEATURE_MODE_ANCHOR, pb.OBJECT_FEATURE_MODE_ROI])
def test_bad_boxes_fail_only_their_frame_with_a_short_message(stub, mode):
    options = _obj(mode=mode, normalize=True)
    frames = []
    for k, (_, values, ids, _) in enumerate(BAD_BOXES):
        frames += [_boxed(2 * k, values, ids), _boxed(2 * k + 1, GOOD, [k])]
    results = _stream(stub, options, frames)
    assert [r.frame_id for r in results] == list(range(len(frames)))
    for k, (name, _, _, words) in enumerate(BAD_BOXES):
        bad, good = results[2 * k], results[2 * k + 1]
        assert bad.status == pb.FRAME_STATUS_ERROR, name
        assert bad.error_message.startswith("bad boxes: ") and words in bad.error_message, (name, bad.error_message)
        assert len(bad.error_message) < 200, name
        assert not bad.boxes and not bad.HasField("object_features")
        assert good.status == pb.FRAME_STATUS_OK and list(good.box_ids) == [k], name
        assert good.object_features.shape == [1, 448]


@pytest.mark.parametrize("mode", [pb.OBJECT_FEATURE_MODE_ANCHOR, pb.OBJECT_FEATURE_MODE_ROI])
@pytest.mark.parametrize(
    ("values", "clipped"),
    [
        ([-50, -50, -10, -10], [0, 0, 0, 0]),  # wholly above-left of the frame: clipped to the corner
        ([100, 100, 200, 200], [64, 48, 64, 48]),  # wholly below-right
        ([64, 0, 80, 10], [64, 0, 64, 10]),  # zero width once clipped
        ([-1e38, -1e38, 1e38, 1e38], [0, 0, 64, 48]),  # finite but huge
        ([0, 0, 64, 48], [0, 0, 64, 48]),  # exactly the frame
        ([1, 1, 1.0001, 1.0001], None),  # tiny but not empty
    ],
)
def test_boxes_past_the_frame_are_clipped_and_still_get_finite_vectors(stub, mode, values, clipped):
    options = _obj(mode=mode, normalize=True, dtype=pb.DTYPE_FLOAT16)
    [result] = _stream(stub, options, [_boxed(0, values, [9])])
    assert result.status == pb.FRAME_STATUS_OK, result.error_message
    assert result.box_source == pb.BOX_SOURCE_CLIENT and list(result.box_ids) == [9]
    if clipped is not None:
        assert list(result.boxes) == clipped
    found = wire.objects_from_proto(result)
    assert found.features.shape == (1, 448) and found.features.dtype == np.float16
    assert np.isfinite(found.features.astype(np.float32)).all()


def test_exactly_max_boxes_is_served_and_echoes_full_range_ids(stub):
    ids = [0, 1, 2**63, 2**64 - 1]
    [result] = _stream(stub, _obj(), [_boxed(0, GOOD * MAX_BOXES, ids)])
    assert result.status == pb.FRAME_STATUS_OK and list(result.box_ids) == ids
    assert result.object_features.shape == [MAX_BOXES, 448]


def test_frames_with_and_without_boxes_mix_in_one_detecting_stream(stub):
    options = pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG,
                                detection=pb.DetectionOptions(enabled=True, conf_thres=0.01, max_det=3),
                                object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=2))
    frames = [_boxed(0, [1, 1, 20, 20]), raw_frame(1), _boxed(2, []), _boxed(3, GOOD * 2, [7, 8]),
              _boxed(4, [float("nan")] * 4), raw_frame(5)]
    results = _stream(stub, options, frames, max_in_flight=4)
    assert [r.frame_id for r in results] == list(range(6))
    assert [r.status for r in results] == [pb.FRAME_STATUS_OK] * 4 + [pb.FRAME_STATUS_ERROR, pb.FRAME_STATUS_OK]
    assert [r.box_source for r in results] == [pb.BOX_SOURCE_CLIENT, pb.BOX_SOURCE_DETECTOR, pb.BOX_SOURCE_DETECTOR,
                                               pb.BOX_SOURCE_CLIENT, pb.BOX_SOURCE_UNSPECIFIED,
                                               pb.BOX_SOURCE_DETECTOR]
    assert [len(r.boxes) // 4 for r in results] == [1, 3, 3, 2, 0, 3]
    assert not results[0].scores and len(results[1].scores) == 3 and list(results[3].box_ids) == [7, 8]


def test_extract_takes_boxes_and_ids_like_a_stream_frame(stub):
    options = _det(conf_thres=0.01, max_det=3)
    frame = _boxed(0, GOOD * 3, [1, 2, 3])
    unary = stub.Extract(pb.ExtractRequest(options=options, frame=frame), timeout=30)
    [streamed] = _stream(stub, options, [frame])
    assert unary.status == streamed.status == pb.FRAME_STATUS_OK
    assert list(unary.box_ids) == [1, 2, 3] and unary.box_source == pb.BOX_SOURCE_CLIENT
    np.testing.assert_array_equal(wire.objects_from_proto(unary).features, wire.objects_from_proto(streamed).features)
    bad = stub.Extract(pb.ExtractRequest(options=options, frame=_boxed(0, GOOD * 3, [1, 2])), timeout=30)
    assert bad.status == pb.FRAME_STATUS_ERROR and "2 box ids for 3 boxes" in bad.error_message


def test_dropped_realtime_frames_carry_no_boxes_and_every_frame_is_answered(server, stub):
    options = _det(conf_thres=0.01, max_det=2)
    frames = [_boxed(k, GOOD if k % 2 else [], [k] if k % 2 else []) for k in range(60)]
    results = _stream(stub, options, frames, realtime=True, max_in_flight=1)
    assert [r.frame_id for r in results] == list(range(60))
    assert results[-1].status == pb.FRAME_STATUS_OK
    for r in results:
        if r.status == pb.FRAME_STATUS_DROPPED:
            assert not r.boxes and not r.box_ids and r.box_source == pb.BOX_SOURCE_UNSPECIFIED
            assert not r.HasField("object_features")
        else:
            assert r.status == pb.FRAME_STATUS_OK
            assert r.box_source == (pb.BOX_SOURCE_CLIENT if r.frame_id % 2 else pb.BOX_SOURCE_DETECTOR)
    _wait_idle(server)


# -- cancellation, concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("realtime", [False, True])
def test_cancelling_a_detecting_stream_frees_its_shared_memory(server, stub, realtime):
    options = pb.FeatureOptions(layers=["P3"], detection=pb.DetectionOptions(enabled=True, max_det=30000),
                                object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=4))

    def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(options=options, max_in_flight=8, realtime=realtime))
        for k in range(100_000):
            yield pb.StreamRequest(frame=_boxed(k, GOOD) if k % 3 == 0 else raw_frame(k % 5))

    call = stub.StreamFeatures(requests(), timeout=30)
    for count, _ in enumerate(call, 1):
        if count == 5:
            call.cancel()
            break
    _wait_idle(server)
    [result] = _stream(stub, _det(conf_thres=0.01, max_det=1), [raw_frame(0)])
    assert result.status == pb.FRAME_STATUS_OK


def test_concurrent_streams_with_different_object_requests_each_get_their_own(server, stub):
    """Frames of different streams meet in one device batch; each must be answered by its own stream's options."""
    cases = {
        "max_det 2": _det(conf_thres=0.01, max_det=2),
        "class 7 only": _det(conf_thres=1e-6, classes=[7], max_det=20),
        "no objects": pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG),
        "float16 roi": pb.FeatureOptions(layers=["P3"], detection=pb.DetectionOptions(enabled=True, conf_thres=0.01,
                                                                                      max_det=3),
                                         object_features=pb.ObjectFeatureOptions(
                                             mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=2, dtype=pb.DTYPE_FLOAT16,
                                             layers=["P4"])),
        "bfloat16 flatten client": _obj(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=2, flatten=True,
                                        dtype=pb.DTYPE_BFLOAT16, layers=["P5"], normalize=True),
        "agnostic multi-label": _det(conf_thres=0.01, agnostic=True, multi_label=True, max_det=4),
    }
    out: dict[str, list[pb.FrameResult]] = {}

    def run(name: str, options: pb.FeatureOptions) -> None:
        frames = [_boxed(k, GOOD, [k]) if name.endswith("client") else raw_frame(k) for k in range(6)]
        out[name] = _stream(stub, options, frames, max_in_flight=6)

    threads = [threading.Thread(target=run, args=item) for item in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(out) == sorted(cases)
    for name, results in out.items():
        assert [r.status for r in results] == [pb.FRAME_STATUS_OK] * 6, name
    assert all(len(r.boxes) == 8 and r.object_features.shape == [2, 448] for r in out["max_det 2"])
    assert all(set(r.classes) <= {7} for r in out["class 7 only"])
    assert all(r.box_source == pb.BOX_SOURCE_UNSPECIFIED and not r.boxes for r in out["no objects"])
    for r in out["float16 roi"]:
        assert r.object_features.dtype == pb.DTYPE_FLOAT16 and r.object_features.shape == [3, 128]
        assert [s.name for s in r.object_feature_slices] == ["P4"]
    for r in out["bfloat16 flatten client"]:
        found = wire.objects_from_proto(r)
        assert r.object_features.dtype == pb.DTYPE_BFLOAT16 and found.features.shape == (1, 256 * 4)
        assert list(r.box_ids) == [r.frame_id]
        np.testing.assert_allclose(np.linalg.norm(found.features, axis=1), 1.0, rtol=2e-2)
    assert all(len(r.boxes) == 16 for r in out["agnostic multi-label"])
    _wait_idle(server)


def test_normalize_keeps_zero_vectors_zero_in_every_dtype():
    features = [torch.zeros(1, 8, 4, 4), torch.ones(1, 4, 2, 2)]
    layers = [ObjectLayer("a", 0), ObjectLayer("b", 1)]
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 8.0, 8.0]])]
    for dtype in ("float32", "float16", "bfloat16"):
        for mode in ("anchor", "roi"):
            got = object_features(features, layers, boxes, (32, 32),
                                  ObjectOptions(mode=mode, normalize=True, dtype=dtype)).vectors[0].float()
            assert torch.isfinite(got).all(), (dtype, mode)
            assert torch.equal(got[:, :8], torch.zeros(2, 8)), (dtype, mode)
            torch.testing.assert_close(got[:, 8:].norm(dim=1), torch.full((2,), 0.5 ** 0.5), rtol=1e-2, atol=1e-2)


# -- the client --------------------------------------------------------------------------------------------------


def test_client_detect_options_take_numpy_classes_and_refuse_ids_out_of_range():
    assert list(DetectOptions(classes=np.array([2, 5])).to_proto().classes) == [2, 5]
    assert list(DetectOptions(classes=()).to_proto().classes) == []
    for classes, words in (([-1], "got -1"), ([2**40, 2**41], "got 1099511627776 and 1 more")):
        with pytest.raises(ValueError, match="detection classes are class ids >= 0") as err:
            DetectOptions(classes=classes).to_proto()
        assert words in str(err.value)
    for conf in (0.0, -1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="detection conf must be in"):
            DetectOptions(conf=conf).to_proto()


def test_client_extract_with_hostile_boxes_fails_the_call_not_the_client(server):
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), np.uint8)
    with FeatureClient(server.address) as client:
        with pytest.raises(ValueError, match=r"boxes must be an \(N, 4\) array"):
            client.extract(image, boxes=[1, 2, 3, 4])
        with pytest.raises(ValueError, match="2 box ids for 1 boxes"):
            client.extract(image, boxes=[[1, 2, 3, 4]], box_ids=[1, 2])
        with pytest.raises(FrameError, match="box 0 has a NaN or infinite coordinate"):
            client.extract(image, layers="P3", encoding="raw", boxes=[[0, 0, np.inf, 4]])
        result = client.extract(image, layers="P3", encoding="raw", boxes=np.zeros((0, 4)),
                                detect=DetectOptions(conf=0.01, max_det=2),
                                objects=ObjectFeatureOptions(mode="roi", dtype="bfloat16"))
        assert result.ok and result.detections.source == "detector" and len(result.detections) == 2
        assert result.object_features.shape == (2, 448)


def test_boxes_file_ids_past_uint64_are_a_named_line_error(tmp_path):
    path = tmp_path / "boxes.csv"
    for line in ("0,1,2,3,4,18446744073709551616", "0,1,2,3,4,-1"):
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match="line 1: expected 'frame,x1,y1,x2,y2\\[,id\\]'"):
            read_boxes(str(path))
    path.write_text("0,1,2,3,4,18446744073709551615\n")
    assert read_boxes(str(path))[0][1].tolist() == [2**64 - 1]


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=serve_env(), timeout=60, cwd=cwd)


def test_cli_object_errors_are_one_line_and_exit_2_before_connecting(tmp_path):
    """Nothing listens on the --server port: each error must come before any connection attempt."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("0,1,2,3,4,18446744073709551616\n")
    cases = {
        ("--boxes", str(boxes)): "line 1: expected 'frame,x1,y1,x2,y2[,id]'",
        ("--conf", "0"): "--conf set detection options: add --detect",
        ("--max-det", "0"): "--max-det set detection options: add --detect",
        ("--detect", "--classes", "-1"): "detection classes are class ids >= 0, got -1",
        ("--detect", "--classes", "99999999999999"): "detection classes are class ids >= 0",
    }
    for extra, words in cases.items():
        out = _cli("stream", str(tmp_path), "--server", "127.0.0.1:9", *extra, cwd=tmp_path)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, (extra, out.stderr)
        assert lines[0].startswith("yolostream stream: error: ") and words in lines[0], (extra, lines[0])


def test_the_onnxruntime_backend_serves_the_same_objects(stub):
    """Detections and roi vectors on a non-Detect layer, and client boxes, through ``--backend onnxruntime``."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    options = pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG,
                                detection=pb.DetectionOptions(enabled=True, conf_thres=0.01, max_det=5),
                                object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI,
                                                                        layers=["P3", "9"]))
    frames = [raw_frame(0), _boxed(1, [1, 1, 30, 30], [4])]
    want = [stub.Extract(pb.ExtractRequest(options=options, frame=f), timeout=30) for f in frames]
    runner = cpu_runner(imgsz=64, backend="onnxruntime")
    with ServerThread(runner, ServerSettings(port=0, workers=1)) as onnx_server:
        channel = grpc.insecure_channel(onnx_server.address)
        onnx_stub = pb_grpc.FeatureServiceStub(channel)
        assert onnx_stub.GetModelInfo(pb.GetModelInfoRequest()).backend == "onnxruntime"
        got = [onnx_stub.Extract(pb.ExtractRequest(options=options, frame=f), timeout=60) for f in frames]
        channel.close()
    for a, b in zip(want, got):
        assert a.status == b.status == pb.FRAME_STATUS_OK, b.error_message
        x, y = wire.objects_from_proto(a), wire.objects_from_proto(b)
        assert x.source == y.source and x.features.shape == y.features.shape == (len(x.boxes), 320)
        np.testing.assert_allclose(y.boxes, x.boxes, atol=1e-2)
        np.testing.assert_allclose(y.features, x.features, rtol=1e-3, atol=1e-3)
    assert list(got[1].box_ids) == [4]
