"""Detections and object vectors through the served path: options, per-frame boxes, replies, client and CLI.

The device-side computation is checked against upstream in test_detections.py and test_objects.py; here the same
results must come out of a server (front-end validation, shared-memory layout, reply fields), and bad options or
boxes must fail only what they belong to.
"""

from __future__ import annotations

import json
import subprocess
import threading

import cv2
import grpc
import numpy as np
import pytest

from conftest import cli_cmd, cpu_runner, fixture_path, in_process_server, raw_frame, serve_env, torch_threads
from yolostream.client import DetectOptions, FeatureClient, ObjectFeatureOptions, load_features
from yolostream.client.cli import read_boxes
from yolostream.server.model.loader import load_model
from yolostream.server.device.engine import DeviceRunner
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

SCORE_REL = 1e-4
BOX_ABS, BOX_REL = 0.01, 1e-4
FLIP_REL = 1e-6


@pytest.fixture(scope="module")
def fixture_server(fixture_weights):
    """The fixture checkpoint served on the CPU, fused (as detect.py runs it), one frame per batch; it takes a
    frame's 300 detections back as client boxes (the default --max-boxes)."""
    runner = DeviceRunner(load_model(fixture_weights), device="cpu", imgsz=320)
    with in_process_server(runner, workers=1, max_batch=1) as server:
        with torch_threads(2):  # the fixtures were made with 2 intra-op threads
            yield server


@pytest.fixture(scope="module")
def small_server():
    """The built-in yolov5n at a small input, for the option and box checks."""
    with in_process_server(max_boxes=4) as server:
        yield server


@pytest.fixture(scope="module")
def stub(small_server):
    channel = grpc.insecure_channel(small_server.address)
    yield pb_grpc.FeatureServiceStub(channel)
    channel.close()


def _stream(stub, options: pb.FeatureOptions, frames: list[pb.Frame]) -> list[pb.FrameResult]:
    requests = [pb.StreamRequest(config=pb.StreamConfig(options=options))]
    requests += [pb.StreamRequest(frame=f) for f in frames]
    return [r.result for r in stub.StreamFeatures(iter(requests), timeout=60)]


def _same_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, want: np.ndarray) -> str | None:
    """Why (boxes, scores, classes) is not ``want`` [x1, y1, x2, y2, conf, cls], or None. Order may differ only
    between scores equal within SCORE_REL (the reply carries no anchor rows, so boxes are matched by class and
    position within each group of equal scores)."""
    if len(boxes) != len(want):
        return f"{len(boxes)} boxes, want {len(want)}"
    if not np.allclose(scores, want[:, 4], rtol=SCORE_REL, atol=0):
        return f"scores differ: {scores[:5]} vs {want[:5, 4]}"
    s = want[:, 4]
    bounds = [0] + [i for i in range(1, len(s)) if s[i - 1] - s[i] > SCORE_REL * s[i - 1]] + [len(s)]
    flips = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        free = np.ones(b - a, bool)
        size = np.max(want[a:b, 2:4] - want[a:b, 0:2], axis=1, keepdims=True)
        tol = BOX_ABS + BOX_REL * np.maximum(np.abs(want[a:b, :4]), size)
        for i in range(a, b):
            fits = free & (want[a:b, 5] == classes[i]) & np.all(np.abs(want[a:b, :4] - boxes[i]) <= tol, axis=1)
            if not fits.any():
                # As test_detections allows: one box swapped for another of exactly the same score (a tie that
                # ulps of the forward decided); anything more is a real difference.
                swap = free & (np.abs(s[a:b] - scores[i]) <= FLIP_REL * scores[i])
                if flips or not swap.any():
                    return f"positions {a}..{b - 1}: class {classes[i]} box {boxes[i].tolist()} has no match"
                flips += 1
                fits = swap
            free[np.argmax(fits)] = False
    return None


def test_served_detections_equal_upstreams_on_letterboxed_frames(fixture_server):
    """Every stored image case (auto and square letterbox), mapped back to frame pixels, through gRPC."""
    meta = json.loads(fixture_path("yolov5n.detections.json").read_text())
    with np.load(fixture_path("yolov5n.detections.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    with np.load(fixture_path("letterbox_cases.npz")) as data:
        frames = {k: data[k] for k in data.files}
    with FeatureClient(fixture_server.address) as client:
        assert len(client.model_info().class_names) == 80
        cases = sorted(k for k in meta["cases"] if k.startswith("img|"))
        for case in cases:
            info = meta["cases"][case]
            frame = frames[f"case{int(info['frame'][2])}_frame_bgr_hwc"]
            result = client.extract(frame, layers="P3", pooling="avg", imgsz=info["imgsz"], encoding="raw",
                                    letterbox="auto" if info["auto"] else "square", detect=True, objects="none")
            found = result.detections
            assert found.source == "detector" and result.object_features is None
            assert found.names == [client.class_names()[c] for c in found.classes]
            why = {}
            for tie in ("", "@stablesort", "@tvsort"):
                key = f"{case}|fused|default{tie}|det_unrounded"
                if key in arrays:
                    why[tie or "upstream"] = _same_detections(found.boxes, found.scores, found.classes, arrays[key])
            assert any(v is None for v in why.values()), f"{case}: {why}"


def _letterbox_frame(case: int) -> np.ndarray:
    with np.load(fixture_path("letterbox_cases.npz")) as data:
        return data[f"case{case}_frame_bgr_hwc"]


def test_each_detection_names_its_anchor_whose_cell_of_its_level_is_its_anchor_vector(fixture_server):
    """Issue 21: level, grid row and column and anchor index per detection, checked against the P3/P4/P5 maps of the
    same call: the anchor-mode vector's part for the detection's level is that map at that cell."""
    vectors = ObjectFeatureOptions(mode="anchor", normalize=False, dtype="float32")
    with FeatureClient(fixture_server.address) as client:
        result = client.extract(_letterbox_frame(1), layers="P3,P4,P5", dtype="float32", imgsz=320,
                                encoding="raw", detect=True, objects=vectors)
        found = result.detections
        proper = (found.boxes[:, 2] > found.boxes[:, 0]) & (found.boxes[:, 3] > found.boxes[:, 1])
        sent = client.extract(_letterbox_frame(1), layers="P3", pooling="avg", imgsz=320, encoding="raw",
                              objects=vectors, boxes=found.boxes[proper][:3])
    cells = found.anchor_cells
    assert len(found) == 300 and cells.dtype == np.int32 and cells.shape == (300, 4)
    assert set(cells[:, 0].tolist()) == {0, 1, 2} and set(cells[:, 3].tolist()) == {0, 1, 2}
    for level, name in enumerate(("P3", "P4", "P5")):
        fmap = result.features[name]
        own = cells[:, 0] == level
        rows, cols = cells[own, 1], cells[own, 2]
        assert rows.max() < fmap.shape[1] and cols.max() < fmap.shape[2], name
        start, stop = found.slices[name]
        np.testing.assert_array_equal(result.object_features[own, start:stop], fmap[:, rows, cols].T, err_msg=name)
    assert sent.detections.source == "client" and sent.detections.anchor_cells is None


@pytest.mark.parametrize("case", [0, 2])
def test_detections_sent_back_as_client_boxes_keep_their_vectors_off_their_own_level(fixture_server, case):
    """Issue 21, the tracker's flow over the wire: detect, send the boxes back; on every layer but the anchor's own
    level the vector is read under the returned box's centre for both, so it stays the same, edge objects included."""
    frame = _letterbox_frame(case)
    vectors = ObjectFeatureOptions(layers="P3,P4,P5,C3,backbone")
    with FeatureClient(fixture_server.address) as client:
        detected = client.extract(frame, layers="P3", pooling="avg", imgsz=320, encoding="raw", detect=True,
                                  objects=vectors)
        found = detected.detections
        ok = (found.boxes[:, 2] > found.boxes[:, 0]) & (found.boxes[:, 3] > found.boxes[:, 1])
        sent = client.extract(frame, layers="P3", pooling="avg", imgsz=320, encoding="raw", objects=vectors,
                              boxes=found.boxes[ok])
    h, w = frame.shape[:2]
    at_edge = (found.boxes[ok, :2] == 0).any(1) | (found.boxes[ok, 2] == w) | (found.boxes[ok, 3] == h)
    assert at_edge.sum() >= 20 and np.array_equal(sent.detections.boxes, found.boxes[ok])
    level = found.anchor_cells[ok, 0]
    for name, own_level in (("P3", 0), ("P4", 1), ("P5", 2), ("C3", None), ("backbone", None)):
        start, stop = found.slices[name]
        off = level != own_level
        np.testing.assert_array_equal(sent.object_features[off, start:stop],
                                      detected.object_features[ok][off, start:stop], err_msg=name)


def test_model_info_describes_detection_and_object_vectors(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.num_classes == 80
    assert info.default_object_feature_dim == 64 + 128 + 256  # P3 + P4 + P5 of yolov5n
    assert info.limits.max_boxes == 4
    assert (round(info.default_detection.conf_thres, 6), info.default_detection.max_det) == (0.25, 300)


def test_detections_come_with_anchor_vectors_whose_slices_cover_the_detect_inputs(stub):
    options = pb.FeatureOptions(layers=["P3"], detection=pb.DetectionOptions(enabled=True, conf_thres=0.01,
                                                                             max_det=7))
    results = _stream(stub, options, [raw_frame(k, 48, 64) for k in range(3)])
    for result in results:
        assert result.status == pb.FRAME_STATUS_OK, result.error_message
        found = wire.objects_from_proto(result)
        assert found.source == pb.BOX_SOURCE_DETECTOR and len(found.boxes) == 7
        assert found.features.shape == (7, 448) and found.features.dtype == np.float32
        assert found.slices == {"P3": (0, 64), "P4": (64, 192), "P5": (192, 448)}
        assert np.all(np.diff(found.scores) <= 0)
        assert np.all(found.boxes[:, [0, 1]] >= 0) and np.all(found.boxes[:, 2] <= 64) and np.all(found.boxes[:, 3] <= 48)
        # The P3 columns are the P3 map at the anchor cell (P3 detections) or under the box centre.
        p3 = wire.tensor_from_proto(result.tensors[0])
        columns = p3.reshape(64, -1).T
        for vector in found.features[:, :64]:
            assert np.min(np.abs(columns - vector).max(axis=1)) < 1e-6


def test_client_boxes_get_vectors_clipped_echoed_and_centre_cells(small_server):
    image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), np.uint8)
    boxes = [[-10, 0, 20, 16], [30, 8, 90, 40]]  # the first reaches past the left edge, the second past the right
    with FeatureClient(small_server.address) as client:
        result = client.extract(image, layers="P3", encoding="raw", boxes=boxes, box_ids=[11, 2**64 - 2],
                                objects=ObjectFeatureOptions(layers="P3"))
    found = result.detections
    assert found.source == "client" and found.scores is None and found.classes is None
    assert found.box_ids.tolist() == [11, 2**64 - 2]
    assert found.boxes.tolist() == [[0, 0, 20, 16], [30, 8, 64, 40]]
    lb = result.letterbox
    p3 = result.features["P3"]
    for box, vector in zip(found.boxes, result.object_features):
        cx = ((box[0] + box[2]) / 2) * lb["resized_width"] / lb["original_width"] + lb["pad_left"]
        cy = ((box[1] + box[3]) / 2) * lb["resized_height"] / lb["original_height"] + lb["pad_top"]
        np.testing.assert_array_equal(vector, p3[:, int(cy // 8), int(cx // 8)])


def test_client_boxes_equal_to_the_detections_give_the_same_roi_vectors(small_server):
    image = np.random.default_rng(5).integers(0, 255, (48, 64, 3), np.uint8)
    objects = ObjectFeatureOptions(mode="roi", roi_size=3, normalize=True)
    with FeatureClient(small_server.address) as client:
        detected = client.extract(image, layers="P3", pooling="avg", encoding="raw", objects=objects,
                                  detect=DetectOptions(conf=0.01, max_det=4))
        sent = client.extract(image, layers="P3", pooling="avg", encoding="raw", objects=objects,
                              boxes=detected.detections.boxes)
    assert len(detected.detections) == 4
    np.testing.assert_allclose(sent.object_features, detected.object_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(sent.object_features, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, conf_thres=1.5)), "conf_thres 1.5"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, iou_thres=float("nan"))), "iou_thres nan"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, classes=[2, 80])), "unknown class id(s) [80]"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(mode=9)), "unknown object feature mode 9"),
        (pb.FeatureOptions(object_features=pb.ObjectFeatureOptions(layers=["P9"])), "unknown layer 'P9'"),
        (pb.FeatureOptions(detection=pb.DetectionOptions(enabled=True, max_det=30000),
                           object_features=pb.ObjectFeatureOptions(mode=pb.OBJECT_FEATURE_MODE_ROI, roi_size=16,
                                                                   flatten=True)),
         "over the server's message limit"),
    ],
)
def test_a_bad_object_config_ends_the_stream_invalid_argument(stub, options, words):
    with pytest.raises(grpc.RpcError) as err:
        _stream(stub, options, [raw_frame(0)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def _with_boxes(k: int, values: list[float], ids: list[int] = ()) -> pb.Frame:
    frame = raw_frame(k)
    frame.boxes[:] = values
    frame.box_ids[:] = list(ids)
    return frame


def test_bad_boxes_fail_their_frame_only_and_a_healthy_stream_alongside_never_notices(stub):
    options = pb.FeatureOptions(layers=["P3"], pooling=pb.POOLING_GLOBAL_AVG)
    good = [1, 2, 30, 40]
    frames = [
        _with_boxes(0, good),
        _with_boxes(1, good * 5),  # five boxes, over this server's --max-boxes 4
        _with_boxes(2, [1, float("nan"), 30, 40]),
        _with_boxes(3, [30, 2, 30, 40]),  # x2 <= x1
        _with_boxes(4, good, ids=[1, 2]),  # two ids for one box
        _with_boxes(5, good[:3]),  # not four values per box
        _with_boxes(6, good * 4, ids=[1, 2, 3, 4]),
    ]
    healthy: list = []
    alongside = threading.Thread(target=lambda: healthy.extend(
        _stream(stub, options, [_with_boxes(k, good) for k in range(20)])))
    alongside.start()
    results = _stream(stub, options, frames)
    alongside.join(timeout=60)
    statuses = [r.status for r in results]
    assert statuses == [pb.FRAME_STATUS_OK] + [pb.FRAME_STATUS_ERROR] * 5 + [pb.FRAME_STATUS_OK]
    assert "5 boxes on one frame; the limit is 4" in results[1].error_message
    assert "box 0 has a NaN" in results[2].error_message
    assert "box 0 is empty" in results[3].error_message
    assert "2 box ids for 1 boxes" in results[4].error_message
    assert "not 4 per box" in results[5].error_message
    assert list(results[6].box_ids) == [1, 2, 3, 4] and results[6].box_source == pb.BOX_SOURCE_CLIENT
    assert [r.status for r in healthy] == [pb.FRAME_STATUS_OK] * 20
    assert all(len(r.boxes) == 4 for r in healthy)


def test_streamed_detections_saved_by_the_cli_equal_the_unary_calls(fixture_server, tmp_path):
    """8 PNG frames through ``yolostream stream --detect --save`` read back with load_features, against Extract."""
    rng = np.random.default_rng(7)
    images = tmp_path / "images"
    images.mkdir()
    for k in range(8):
        cv2.imwrite(str(images / f"{k:02d}.png"), rng.integers(0, 255, (120 + 8 * k, 160, 3), np.uint8))
    save = tmp_path / "save"
    out = subprocess.run(cli_cmd("stream", str(images), "--server", fixture_server.address, "--layers", "P3",
                                 "--pool", "avg", "--encoding", "png", "--detect", "--conf", "0.05", "--save",
                                 str(save), "--max-in-flight", "1", "-q"),
                         capture_output=True, text=True, env=serve_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    saved = load_features(save)
    assert saved.meta["objects"]["slices"] == {"P3": [0, 64], "P4": [64, 192], "P5": [192, 448]}
    boxes = saved.objects["boxes"]
    assert len(boxes) > 0 and saved.objects["features"].shape == (len(boxes), 448)
    with FeatureClient(fixture_server.address) as client:
        for index, record in enumerate(saved.frames):
            image = cv2.imread(str(images / record["file"].split("/")[-1]))
            want = client.extract(image, layers="P3", pooling="avg", detect=DetectOptions(conf=0.05))
            start, stop = record["objects"]
            assert record["box_source"] == "detector"
            assert np.all(saved.objects["frame"][start:stop] == index)
            assert stop - start == len(want.detections), f"frame {index}"
            np.testing.assert_allclose(boxes[start:stop], want.detections.boxes, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(saved.objects["scores"][start:stop], want.detections.scores, rtol=1e-5)
            np.testing.assert_array_equal(saved.objects["classes"][start:stop], want.detections.classes)
            np.testing.assert_array_equal(saved.objects["anchor_cells"][start:stop], want.detections.anchor_cells)
            np.testing.assert_allclose(saved.objects["features"][start:stop], want.object_features, rtol=1e-4,
                                       atol=1e-5)


def test_boxes_file_is_read_per_frame_and_malformed_lines_are_named(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("# frame,x1,y1,x2,y2,id\n0,1,2,3,4,7\n0,5,6,7,8,9\n\n3,1.5,2,10,20\n")
    table = read_boxes(str(path))
    assert sorted(table) == [0, 3]
    assert table[0][0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and table[0][1].tolist() == [7, 9]
    assert table[3][1] is None
    path.write_text("0,1,2,3\n")
    with pytest.raises(ValueError, match="line 1: expected 'frame,x1,y1,x2,y2\\[,id\\]'"):
        read_boxes(str(path))
    path.write_text("0,1,2,3,4,1\n0,1,2,3,4\n")
    with pytest.raises(ValueError, match="line 2: the boxes of frame 0 must all have an id or none"):
        read_boxes(str(path))


def test_detection_flags_without_detect_are_a_one_line_error(tmp_path):
    out = subprocess.run(cli_cmd("stream", str(tmp_path), "--conf", "0.3"), capture_output=True, text=True,
                         env=serve_env(), timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "yolostream stream: error: --conf set detection options: add --detect"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_object_vectors_travel_in_the_requested_dtype(small_server, dtype):
    image = np.random.default_rng(9).integers(0, 255, (48, 64, 3), np.uint8)
    with FeatureClient(small_server.address) as client:
        want = client.extract(image, layers="P3", pooling="avg", encoding="raw", boxes=[[2, 2, 40, 30]])
        got = client.extract(image, layers="P3", pooling="avg", encoding="raw", boxes=[[2, 2, 40, 30]],
                             objects=ObjectFeatureOptions(dtype=dtype))
    assert got.object_features.dtype == (np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_allclose(got.object_features, want.object_features, rtol=1e-2, atol=1e-2)


def test_the_staged_path_gives_the_same_objects_as_the_direct_one():
    """The CUDA path computes objects in ``collect`` (overlapping the next batch); on CPU it must agree exactly."""
    from yolostream.server.common.object_request import NmsOptions, ObjectJob, ObjectOptions, ObjectRequest

    direct, staged = cpu_runner(imgsz=64), cpu_runner(imgsz=64, staged=True)
    staged.warmup(4)
    card = direct.card()
    layers = tuple((layer.name, layer.index, layer.stride, card.channels(layer.index))
                   for layer in card.default_object_layers())
    detect = ObjectRequest(NmsOptions(conf_thres=0.01, max_det=9), ObjectOptions(), layers)
    roi = ObjectRequest(None, ObjectOptions(mode="roi", roi_size=2), layers)
    images = [np.random.default_rng(k).integers(0, 255, (64, 64, 3), np.uint8) for k in range(3)]
    boxes = np.array([[1, 1, 30, 40]], np.float32)
    jobs = [ObjectJob(detect, (64, 64), None, detect.layout(None)), None,
            ObjectJob(roi, (64, 64), boxes, roi.layout(1))]
    keys = [(9, "avg", "float32")]
    a = direct.collect(direct.launch(images, keys, objects=jobs))
    b = staged.collect(staged.launch(images, keys, objects=jobs))
    assert b.objects[1] is None and len(b.objects[0].boxes) == 9 and b.objects[2].scores is None
    for x, y in zip(a.objects, b.objects):
        if x is None:
            continue
        for name in ("boxes", "scores", "classes", "anchors", "vectors"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert b.objects[0].anchors.shape == (9, 4) and b.objects[2].anchors is None


def test_a_save_keeps_anchor_cells_with_minus_one_for_client_boxes(tmp_path):
    """``objects.anchor_cells`` has a row per box of every frame: the detection's anchor, or -1 for client boxes."""
    from yolostream.client import Detections, FeatureWriter
    from yolostream.client.results import FeatureResult

    def result(frame_id: int, found: Detections) -> FeatureResult:
        return FeatureResult(frame_id=frame_id, timestamp=0.0, status="ok", error="", features={}, tensors={},
                             letterbox=None, timings_us={}, batch_size=1, latency=None, detections=found)

    detected = Detections(boxes=np.ones((2, 4), np.float32), scores=np.ones(2, np.float32),
                          classes=np.zeros(2, np.int32), names=None, box_ids=None, source="detector", slices={},
                          anchor_cells=np.array([[0, 3, 4, 1], [2, 0, 9, 2]], np.int32))
    client = Detections(boxes=np.ones((1, 4), np.float32), scores=None, classes=None, names=None,
                        box_ids=np.array([7], np.uint64), source="client", slices={})
    with FeatureWriter(tmp_path / "save") as writer:
        writer.append(result(0, detected))
        writer.append(result(1, client))
    saved = load_features(tmp_path / "save")
    assert saved.objects["anchor_cells"].dtype == np.int32
    assert saved.objects["anchor_cells"].tolist() == [[0, 3, 4, 1], [2, 0, 9, 2], [-1, -1, -1, -1]]
    assert saved.meta["objects"]["columns"]["anchor_cells"] == {"file": "objects.anchor_cells.npy", "dtype": "int32",
                                                                "shape": [4]}


def test_viz_draws_each_box_in_its_class_colour():
    from yolostream.client import Detections
    from yolostream.client.viz import box_colour, draw_boxes

    image = np.zeros((60, 80, 3), np.uint8)
    found = Detections(boxes=np.array([[10, 20, 50, 40]], np.float32), scores=np.array([0.9], np.float32),
                       classes=np.array([3], np.int32), names=["car"], box_ids=None, source="detector", slices={})
    draw_boxes(image, found)
    assert tuple(int(v) for v in image[30, 10]) == box_colour(3)  # the left edge, halfway down
    assert not image[30, 30].any()  # inside the box is untouched
