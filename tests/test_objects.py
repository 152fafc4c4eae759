"""Per-object vectors: anchor cells equal upstream's layer outputs, roi equals RoIAlign's definition, client boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import fixture_path
from yolostream.server.model import detections as D
from yolostream.server.common import object_request as R
from yolostream.server.model import objects as O
from yolostream.server.model.loader import load_model
from yolostream.server.model.modules import fuse_model
from yolostream.server.model.plan import make_plan, run_plan
from yolostream.server.common.preprocess import prepare
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

P_LAYERS = [O.ObjectLayer("P3", 17, 0), O.ObjectLayer("P4", 20, 1), O.ObjectLayer("P5", 23, 2)]
STRIDES = (8, 16, 32)
INPUT_HW = (256, 320)


@pytest.fixture(scope="module")
def dets() -> dict[str, np.ndarray]:
    with np.load(fixture_path("yolov5n.detections.npz")) as data:
        return {k: data[k] for k in data.files if k.startswith("tensor|fused|default|")}


@pytest.fixture(scope="module")
def model(fixture_weights):
    return fuse_model(load_model(fixture_weights).model.eval())


def _maps(expected) -> list[torch.Tensor]:
    return [torch.from_numpy(expected[f"layer_{layer.index}"]) for layer in P_LAYERS]


def _fixture_boxes(dets, b: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    det, lagx = dets[f"tensor|fused|default|b{b}|det"], dets[f"tensor|fused|default|b{b}|lagx"]
    return torch.from_numpy(det[:, :4].copy()), torch.from_numpy(lagx), lagx


def test_anchor_vectors_are_the_layer_outputs_at_the_anchor_cell_and_box_centre(expected, dets):
    boxes, cells = zip(*[_fixture_boxes(dets, b)[:2] for b in range(2)])
    result = O.object_features(_maps(expected), P_LAYERS, boxes, INPUT_HW, O.ObjectOptions(), cells)
    assert result.slices == [("P3", 17, 8, 0, 64), ("P4", 20, 16, 64, 192), ("P5", 23, 32, 192, 448)]
    for b in range(2):
        vectors = result.vectors[b].numpy()
        box, _, lagx = _fixture_boxes(dets, b)
        centre = ((box[:, :2] + box[:, 2:]) / 2).numpy()
        assert vectors.shape == (len(lagx), 448)
        for (name, _, _, s, e), layer, stride in zip(result.slices, P_LAYERS, STRIDES):
            fmap = expected[f"layer_{layer.index}"][b]
            h, w = fmap.shape[1:]
            gx = np.clip(np.floor(centre[:, 0] / stride).astype(int), 0, w - 1)
            gy = np.clip(np.floor(centre[:, 1] / stride).astype(int), 0, h - 1)
            own = lagx[:, 0] == layer.level
            gy[own], gx[own] = lagx[own, 2], lagx[own, 3]
            assert own.any() and np.array_equal(vectors[:, s:e], fmap[:, gy, gx].T), name


def test_model_detections_give_upstreams_anchor_vectors(model, expected):
    x = torch.from_numpy(expected["input"])
    with torch.inference_mode():
        outputs = run_plan(model.model, x, make_plan(model.model, D.detect_input_layers(model)))
        frames = O.frame_objects(model, outputs, INPUT_HW, [INPUT_HW] * 2, nms=D.NmsOptions(),
                                 objects=O.ObjectOptions())
    grids = [(32, 40), (16, 20), (8, 10)]
    for b, frame in enumerate(frames):
        assert torch.equal(frame.cells, D.row_cells(frame.rows, grids, 3))  # the anchors the reply names
        cells = D.row_cells(frame.rows, grids, 3).numpy()
        assert frame.vectors.shape == (len(frame.rows), 448) and len(frame.rows) == 300
        for (name, _, _, s, e), layer in zip(frame.slices, P_LAYERS):
            fmap = expected[f"layer_{layer.index}"][b]
            own = cells[:, 0] == layer.level
            want = fmap[:, cells[own, 2], cells[own, 3]].T
            err = np.abs(frame.vectors[own, s:e].numpy() - want).max() / np.abs(fmap).max()
            assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def _bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """RoIAlign's bilinear sample: 0 outside [-1, H] × [-1, W], border cells beyond the centres of the edge cells."""
    h, w = fmap.shape[1:]
    if y < -1 or y > h or x < -1 or x > w:
        return np.zeros(fmap.shape[0])
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1]
            + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1])


def _roi_reference(fmap: np.ndarray, box: np.ndarray, stride: int, k: int) -> np.ndarray:
    """aligned=True RoIAlign with one sample at the centre of each of k×k bins: (C, k, k)."""
    x1, y1, x2, y2 = (np.asarray(box, np.float64) / stride) - 0.5
    out = np.zeros((fmap.shape[0], k, k))
    for i in range(k):
        for j in range(k):
            out[:, i, j] = _bilinear(fmap, y1 + (i + 0.5) * (y2 - y1) / k, x1 + (j + 0.5) * (x2 - x1) / k)
    return out


def _test_boxes(dets) -> list[torch.Tensor]:
    edge = torch.tensor([[-20.0, -9.0, 40.0, 30.0], [300.0, 240.0, 340.0, 270.0], [100.0, 100.0, 100.5, 101.0],
                         [0.0, 0.0, 320.0, 256.0], [-40.0, 10.0, -20.0, 50.0]])
    return [torch.cat((_fixture_boxes(dets, 0)[0][:12], edge)), _fixture_boxes(dets, 1)[0][:7]]


@pytest.mark.parametrize("flatten", [False, True], ids=["mean", "flatten"])
def test_roi_vectors_equal_the_roialign_definition(expected, dets, flatten):
    k = 3
    boxes = _test_boxes(dets)
    result = O.object_features(_maps(expected), P_LAYERS, boxes, INPUT_HW,
                               O.ObjectOptions(mode="roi", roi_size=k, flatten=flatten))
    assert result.slices[-1][4] == (448 * k * k if flatten else 448)
    for b in range(2):
        for n, box in enumerate(boxes[b].numpy()):
            for (name, _, _, s, e), layer, stride in zip(result.slices, P_LAYERS, STRIDES):
                fmap = expected[f"layer_{layer.index}"][b].astype(np.float64)
                ref = _roi_reference(fmap, box, stride, k)
                want = ref.reshape(-1) if flatten else ref.mean((1, 2))
                got = result.vectors[b][n, s:e].numpy()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(fmap).max(),
                                           err_msg=f"image {b} box {n} {name}")


def test_roi_gather_in_chunks_equals_one_gather(expected, dets, monkeypatch):
    boxes = _test_boxes(dets)[0]
    fmap = torch.from_numpy(expected["layer_17"])
    image = torch.zeros(len(boxes), dtype=torch.long)
    whole = O.roi_align_torch(fmap, image, boxes, 4, 1 / 8)
    monkeypatch.setattr(O, "ROI_CHUNK_ELEMENTS", 64 * 16 * 3)
    assert torch.equal(O.roi_align_torch(fmap, image, boxes, 4, 1 / 8), whole)


def test_client_boxes_equal_to_the_detectors_give_the_same_roi_vectors(model):
    with np.load(fixture_path("letterbox_cases.npz")) as data:
        frame = data["case1_frame_bgr_hwc"]
    chw, _ = prepare(frame, 320, 32, "auto")
    input_hw, orig_hw = tuple(chw.shape[1:]), frame.shape[:2]
    opts = O.ObjectOptions(mode="roi", roi_size=4, normalize=True)
    with torch.inference_mode():
        outputs = run_plan(model.model, torch.from_numpy(chw)[None].float() / 255,
                           make_plan(model.model, D.detect_input_layers(model)))
        detected = O.frame_objects(model, outputs, input_hw, [orig_hw], nms=D.NmsOptions(), objects=opts)[0]
        # A decoded box can be thinner than float32 resolves (width 0); a client may not send those back.
        ok = ((detected.boxes[:, 2] > detected.boxes[:, 0]) & (detected.boxes[:, 3] > detected.boxes[:, 1])).numpy()
        sent = R.client_boxes(detected.boxes.numpy()[ok], orig_hw)
        client = O.frame_objects(model, outputs, input_hw, [orig_hw], nms=D.NmsOptions(), objects=opts,
                                 boxes=[sent])[0]
    assert len(detected.boxes) == 300 and ok.sum() > 250 and client.scores is None and client.rows is None
    assert torch.equal(client.boxes, detected.boxes[ok])
    assert torch.equal(client.vectors, detected.vectors[ok])


#: Layers that are no Detect input, read at the centre cell for every box: C3 (layer 4, stride 8) and the SPPF.
OTHER_LAYERS = [O.ObjectLayer("C3", 4), O.ObjectLayer("backbone", 9)]


@pytest.mark.parametrize("case", [0, 2, 5, 7])
def test_a_detection_sent_back_as_a_client_box_gets_its_anchor_vectors_on_every_layer_but_its_own_level(model,
                                                                                                          case):
    """Issue 21: off its own Detect level a detection is read under the centre of the box returned (clipped to the
    frame), not of the decoded box, which reaches past the frame for objects at the edges; so the tracker flow
    (detect, then send the boxes back) keeps each object's vector."""
    with np.load(fixture_path("letterbox_cases.npz")) as data:
        frame = data[f"case{case}_frame_bgr_hwc"]
    chw, _ = prepare(frame, 320, 32, "auto")
    input_hw, orig_hw = tuple(chw.shape[1:]), frame.shape[:2]
    layers = P_LAYERS + OTHER_LAYERS
    levels = D.detect_input_layers(model)
    with torch.inference_mode():
        outputs = run_plan(model.model, torch.from_numpy(chw)[None].float() / 255,
                           make_plan(model.model, sorted({layer.index for layer in layers})))
        detected = O.frame_objects(model, outputs, input_hw, [orig_hw], nms=D.NmsOptions(), objects=O.ObjectOptions(),
                                   layers=layers)[0]
        decoded = D.detect(model.model[model.detect_index], [outputs[j] for j in levels], D.NmsOptions())[0]
        # A decoded box can be thinner than float32 resolves (width 0); a client may not send those back.
        ok = ((detected.boxes[:, 2] > detected.boxes[:, 0]) & (detected.boxes[:, 3] > detected.boxes[:, 1])).numpy()
        sent = R.client_boxes(detected.boxes.numpy()[ok], orig_hw)
        client = O.frame_objects(model, outputs, input_hw, [orig_hw], nms=D.NmsOptions(), objects=O.ObjectOptions(),
                                 layers=layers, boxes=[sent])[0]
    assert torch.equal(decoded.rows, detected.rows) and len(detected.boxes) == 300 and ok.sum() > 200
    assert client.rows is None and torch.equal(client.boxes, detected.boxes[ok])
    returned = D.unscale_boxes(detected.boxes[ok], input_hw, orig_hw)
    level = D.row_cells(detected.rows, D.level_grids([outputs[j] for j in levels]), 3)[ok, 0].numpy()
    moved = 0
    for (name, _, _, s, e), layer in zip(detected.slices, layers):
        off_level = level != layer.level
        assert torch.equal(client.vectors[off_level, s:e], detected.vectors[ok][off_level, s:e]), name
        hw = tuple(outputs[layer.index].shape[-2:])
        cells = zip(O.centre_cells(decoded.boxes[ok], hw, input_hw), O.centre_cells(returned, hw, input_hw))
        moved += int((np.any([(a != b).numpy() for a, b in cells], axis=0) & off_level).sum())
    # Objects at the frame's edges whose decoded centre lies in another cell than the returned box's centre.
    assert moved >= 10, f"only {moved} vectors of clipped boxes change cell: the frame does not test the rule"


def test_a_centre_on_a_cell_boundary_reads_the_cell_right_of_and_below_it(expected):
    """The one rule for centre cells: column ⌊cx / stride⌋, row ⌊cy / stride⌋, clamped to the map."""
    just_under = float(np.float32(32 - 2**-18))
    boxes = torch.tensor([
        [12.0, 20.0, 20.0, 28.0],  # centre (16, 24): on a P3 boundary in x and y, on a P4 boundary in x
        [24.0, 24.0, 40.0, 40.0],  # centre (32, 32): on a boundary of every map
        [just_under - 16, just_under - 16, just_under + 16, just_under + 16],  # one float32 step before (32, 32)
        [300.0, 240.0, 340.0, 272.0],  # centre (320, 256): the input's right and bottom edge
        [-20.0, -10.0, 10.0, 2.0],  # centre (-5, -4): left of and above the input
    ])
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()
    assert centres[2] == [just_under, just_under] and just_under < 32
    want = {  # (rows, columns) per map, worked out by hand
        "P3": ([3, 4, 3, 31, 0], [2, 4, 3, 39, 0]),
        "P4": ([1, 2, 1, 15, 0], [1, 2, 1, 19, 0]),
        "P5": ([0, 1, 0, 7, 0], [0, 1, 0, 9, 0]),
    }
    result = O.object_features(_maps(expected), P_LAYERS, [boxes], INPUT_HW)
    for (name, _, _, s, e), layer in zip(result.slices, P_LAYERS):
        fmap = expected[f"layer_{layer.index}"][0]
        gy, gx = O.centre_cells(boxes, fmap.shape[1:], INPUT_HW)
        assert (gy.tolist(), gx.tolist()) == want[name], name
        rows, cols = want[name]
        assert np.array_equal(result.vectors[0][:, s:e].numpy(), fmap[:, rows, cols].T), name


def test_client_boxes_in_anchor_mode_use_the_centre_cell_on_every_layer(expected):
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [300.0, 200.0, 330.0, 270.0]])
    result = O.object_features(_maps(expected), P_LAYERS, [boxes, boxes[:0]], INPUT_HW)
    for (name, _, _, s, e), layer, stride in zip(result.slices, P_LAYERS, STRIDES):
        fmap = expected[f"layer_{layer.index}"][0]
        gy = np.minimum(np.array([40, 235]) // stride, fmap.shape[1] - 1)
        gx = np.minimum(np.array([30, 315]) // stride, fmap.shape[2] - 1)
        assert np.array_equal(result.vectors[0][:, s:e].numpy(), fmap[:, gy, gx].T), name
    assert result.vectors[1].shape == (0, 448)


def test_normalize_gives_unit_rows_with_equal_layer_shares_and_dtype(expected, dets):
    boxes = _test_boxes(dets)
    result = O.object_features(_maps(expected), P_LAYERS, boxes, INPUT_HW,
                               O.ObjectOptions(mode="roi", roi_size=2, normalize=True, dtype="float16"))
    v = result.vectors[0]
    assert v.dtype == torch.float16
    assert not v[-1].any()  # the last box lies outside the input: RoIAlign reads zeros, and zero stays zero
    v = v[:-1]
    np.testing.assert_allclose(v.float().norm(dim=1).numpy(), 1.0, rtol=2e-3)
    for _, _, _, s, e in result.slices:
        np.testing.assert_allclose(v[:, s:e].float().norm(dim=1).numpy(), 1 / math.sqrt(3), rtol=2e-3)


def test_client_boxes_are_validated_and_clipped():
    got = R.client_boxes([[-5, 10, 700, 20], [1.5, 2, 3, 4]], (100, 200))
    assert got.dtype == np.float32 and got.tolist() == [[0, 10, 200, 20], [1.5, 2, 3, 4]]
    assert R.client_boxes(np.zeros((0, 4)), (10, 10)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"box 1 has a NaN or infinite coordinate"):
        R.client_boxes([[0, 0, 1, 1], [0, np.nan, 1, 1]], (10, 10))
    with pytest.raises(ValueError, match=r"box 0 is empty \(needs x2 > x1 and y2 > y1\)"):
        R.client_boxes([[5, 0, 5, 1]], (10, 10))
    with pytest.raises(ValueError, match="5 boxes on one frame; the limit is 4"):
        R.client_boxes(np.tile([0, 0, 1, 1], (5, 1)), (10, 10), max_boxes=4)
    with pytest.raises(ValueError, match=r"must be an \(N, 4\) array"):
        R.client_boxes([1, 2, 3, 4], (10, 10))


def test_the_slot_carries_each_detections_anchor_and_keeps_no_room_for_it_with_client_boxes():
    detections, client = R.ObjectLayout(5, 3, "float16", detections=True), R.ObjectLayout(5, 3, "float16", False)
    assert detections.row_bytes == client.row_bytes + 16 == 16 + 4 + 4 + 16 + 3 * 2
    buffer = np.zeros(detections.nbytes, np.uint8)
    anchors = np.array([[0, 31, 39, 2], [2, 7, 9, 0]], np.int32)
    result = R.ObjectResult(np.ones((2, 4), np.float32), np.array([0.9, 0.5], np.float32), np.array([3, 4], np.int32),
                            np.full((2, 3), 0.25, np.float16), anchors)
    detections.write(buffer, result)
    views = detections.views(buffer, 2)
    assert views["anchors"].dtype == np.int32 and views["anchors"].tolist() == anchors.tolist()
    assert views["classes"].tolist() == [3, 4] and np.all(views["vectors"] == np.float16(0.25))
    with pytest.raises(ValueError, match=r"anchors of shape None for 2 detections; the slot expects \(2, 4\)"):
        detections.write(buffer, R.ObjectResult(result.boxes, result.scores, result.classes, result.vectors))
    buffer = np.zeros(client.nbytes, np.uint8)
    client.write(buffer, R.ObjectResult(np.ones((2, 4), np.float32), None, None, np.ones((2, 3), np.float16)))
    views = client.views(buffer, 2)
    assert views["anchors"] is None and views["scores"] is None and np.all(views["vectors"] == 1)


def test_device_results_give_anchors_as_level_row_column_anchor():
    from yolostream.server.device.objects import anchor_columns

    cells = torch.tensor([[0, 2, 31, 39], [1, 0, 5, 6]])  # row_cells' (level, anchor, gy, gx)
    got = anchor_columns(cells)
    assert got.dtype == np.int32 and got.tolist() == [[0, 31, 39, 2], [1, 5, 6, 0]]
    assert R.ANCHOR_COLUMNS == ("level", "row", "col", "anchor")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (O.ObjectOptions(mode="crop"), "unknown object feature mode 'crop'; choose one of anchor, roi"),
        (O.ObjectOptions(mode="roi", roi_size=0), "roi_size must be an integer between 1 and 16"),
        (O.ObjectOptions(flatten=True), "flatten applies to roi mode only"),
        (O.ObjectOptions(dtype="int8"), "unknown dtype 'int8'"),
    ],
)
def test_bad_object_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        options.validate()


def test_default_layers_are_the_detect_inputs(model):
    assert O.default_object_layers(model) == P_LAYERS


def test_torchvision_roi_align_agrees_with_pure_torch(expected, dets):
    ops = D.torchvision_ops()
    if ops is None:
        pytest.skip("torchvision does not import with this torch build, so only the pure-torch RoIAlign exists here")
    boxes = _test_boxes(dets)[0]
    fmap = torch.from_numpy(expected["layer_20"])
    image = torch.zeros(len(boxes), dtype=torch.long)
    want = O.roi_align_torch(fmap, image, boxes, 5, 1 / 16)
    got = O.roi_align(fmap, image, boxes, 5, 1 / 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_separable_roi_mean_equals_the_mean_of_the_samples(expected, dets):
    boxes = _test_boxes(dets)
    image = torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes)])
    flat = torch.cat(boxes)
    for layer, stride in zip(P_LAYERS, STRIDES):
        fmap = torch.from_numpy(expected[f"layer_{layer.index}"])
        want = O.roi_align_torch(fmap, image, flat, 5, 1 / stride).mean((2, 3))
        torch.testing.assert_close(O.roi_mean_torch(fmap, image, flat, 5, 1 / stride), want, rtol=1e-5, atol=1e-5)


def test_p6_model_detects_and_reads_vectors_on_four_levels():
    model = load_model(cfg="yolov5n6").model.eval()
    levels = D.detect_input_layers(model)
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outputs = run_plan(model.model, x, make_plan(model.model, levels))
        frames = O.frame_objects(model, outputs, (128, 192), [(256, 384), (128, 192)],
                                 nms=D.NmsOptions(conf_thres=0.01, max_det=50), objects=O.ObjectOptions())
    layers = O.default_object_layers(model)
    assert [layer.name for layer in layers] == ["P3", "P4", "P5", "P6"] and [layer.level for layer in layers] == [0, 1, 2, 3]
    grids = D.level_grids([outputs[j] for j in levels])
    for b, frame in enumerate(frames):
        assert len(frame.boxes) == 50 and frame.vectors.shape[0] == 50
        assert [s[0] for s in frame.slices] == ["P3", "P4", "P5", "P6"]
        cells = D.row_cells(frame.rows, grids, 3)
        assert len(set(cells[:, 0].tolist())) >= 2
        for (name, _, _, s, e), layer, j in zip(frame.slices, layers, levels):
            own = cells[:, 0] == layer.level
            want = outputs[j][b][:, cells[own, 2], cells[own, 3]].T
            assert torch.equal(frame.vectors[own, s:e], want), name
    assert float(frames[0].boxes.max()) <= 384 and float(frames[0].boxes.min()) >= 0
    frame = frames[0]
    msg = wire.fill_objects(pb.FrameResult(), frame.boxes.numpy(), scores=frame.scores.numpy(),
                            classes=frame.classes.numpy(), features=frame.vectors.numpy(), slices=frame.slices)
    back = wire.objects_from_proto(pb.FrameResult.FromString(msg.SerializeToString()))
    assert np.array_equal(back.features, frame.vectors.numpy()) and np.array_equal(back.boxes, frame.boxes.numpy())
    assert back.slices["P6"] == frame.slices[-1][3:] and msg.object_feature_slices[3].stride == 64
