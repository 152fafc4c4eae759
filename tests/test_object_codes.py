"""Object vectors as 8-bit codes (``ObjectFeatureOptions.dtype = DTYPE_UINT8_AFFINE``), end to end.

The device codes each frame's (N, D) vectors per column (``device.quantize.object_record``) into the frame's object
slot (``common.object_request.ObjectLayout``); the front-end sends the codes with their D scales and offsets, the
client decodes them to float32 and keeps the codes in ``result.codes["object_features"]``, and ``--save`` keeps the
codes too. The servers here batch one frame at a time (``max_batch=1``), so a frame's float32 vectors are the same
bits in every stream: the codes must then equal the numpy reference quantiser's run on them, and decode within the
bound of ``conftest.assert_affine_bound`` (half a step plus float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_affine_bound, cpu_runner, feature_stub, frame_of, in_process_server
from yolostream.client import CodedRows, DetectOptions, FeatureClient, FeatureWriter, ObjectFeatureOptions, load_features
from yolostream.server.common import affine
from yolostream.server.common.object_request import ObjectLayout, ObjectOptions, ObjectResult
from yolostream.server.device import quantize
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.model.loader import load_model
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

#: The least cosine similarity a decoded vector must keep with its float32 vector.
MIN_COSINE = 0.999
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def fixture_server(fixture_weights):
    """The fixture checkpoint (trained yolov5n) on the CPU, one frame per batch, at a small input."""
    runner = DeviceRunner(load_model(fixture_weights), device="cpu", imgsz=256)
    with in_process_server(runner, workers=1, max_batch=1) as server:
        yield server


@pytest.fixture(scope="module")
def small_server():
    """The built-in yolov5n (random weights), one frame per batch."""
    with in_process_server(cpu_runner(64), max_batch=1) as server:
        yield server


def _frames() -> list[np.ndarray]:
    """Three frames of different sizes with some structure (a gradient and blocks), so the detector finds boxes."""
    frames = []
    for k, (h, w) in enumerate([(240, 320), (200, 300), (180, 180)]):
        y, x = np.mgrid[0:h, 0:w]
        image = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60 + 40 * k)], -1).astype(np.uint8)
        for _ in range(6):
            y0, x0 = RNG.integers(0, h - 40), RNG.integers(0, w - 40)
            image[y0:y0 + RNG.integers(15, 40), x0:x0 + RNG.integers(15, 40)] = RNG.integers(0, 256, 3)
        frames.append(image)
    return frames


FRAMES = _frames()


def _client_boxes(image: np.ndarray, n: int, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 20, h - 20], (n, 2))
    size = rng.uniform(8, 60, (n, 2))
    return np.concatenate([xy, xy + size], 1).astype(np.float32)


MODES = {"anchor": ObjectFeatureOptions(mode="anchor"), "roi": ObjectFeatureOptions(mode="roi"),
         "roi-flatten": ObjectFeatureOptions(mode="roi", roi_size=3, flatten=True)}


def _pair(server, mode: str, source: str, normalize: bool, **stream) -> list[tuple]:
    """Each frame's float32 result and its result with 8-bit object vectors, from two streams of the same frames."""
    base = MODES[mode]
    if source == "client":
        items = [(f, None, _client_boxes(f, 9 + k, k)) for k, f in enumerate(FRAMES)]
        detect = None
    else:
        items, detect = FRAMES, DetectOptions(conf=0.001, max_det=40)
    out = {}
    with FeatureClient(server.address, timeout=120) as client:
        for dtype in ("float32", "uint8"):
            objects = ObjectFeatureOptions(mode=base.mode, roi_size=base.roi_size, flatten=base.flatten,
                                           normalize=normalize, dtype=dtype)
            out[dtype] = list(client.stream(items, layers="P3", pooling="avg", encoding="raw", detect=detect,
                                            objects=objects, **stream))
    return list(zip(out["float32"], out["uint8"]))


def _check_pair(plain, coded) -> tuple[float, float]:
    """The coded result against the float32 one; returns (worst cosine, worst |error| / scale) of the frame."""
    assert plain.ok and coded.ok, (plain.error, coded.error)
    assert np.array_equal(plain.detections.boxes, coded.detections.boxes)
    x = plain.object_features
    got = coded.object_features
    codes = coded.codes["object_features"]
    assert x.dtype == np.float32 and got.dtype == np.float32 and got.shape == x.shape
    assert codes.codes.dtype == np.uint8 and codes.codes.shape == x.shape and codes.axis == 1
    assert codes.scales.shape == codes.offsets.shape == (x.shape[1],)
    assert coded.detections.slices == plain.detections.slices
    assert_affine_bound(x, codes)
    want_codes, want_scales, want_offsets, ok = wire.quantize_reference(x, (0,))
    assert ok.all() and np.array_equal(codes.codes, want_codes)
    assert np.array_equal(codes.scales.view(np.uint32), want_scales.view(np.uint32))
    assert np.array_equal(codes.offsets.view(np.uint32), want_offsets.view(np.uint32))
    assert np.array_equal(got, codes.dequantize())
    if not len(x):
        return 1.0, 0.0
    step = np.where(codes.scales > 0, codes.scales, np.inf).astype(np.float64)
    ratio = float((np.abs(x.astype(np.float64) - got) / step).max())
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(got, axis=1)
    live = norms > 0
    cosine = (np.sum(x.astype(np.float64) * got, axis=1)[live] / norms[live]).min(initial=1.0)
    return float(cosine), ratio


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("source", ["detector", "client"])
@pytest.mark.parametrize("mode", list(MODES))
def test_coded_object_vectors_decode_within_half_a_step_of_float32(fixture_server, mode, source, normalize):
    worst_cosine, worst_ratio, rows = 1.0, 0.0, 0
    for plain, coded in _pair(fixture_server, mode, source, normalize):
        cosine, ratio = _check_pair(plain, coded)
        worst_cosine, worst_ratio = min(worst_cosine, cosine), max(worst_ratio, ratio)
        rows += len(plain.object_features)
        if normalize:
            np.testing.assert_allclose(np.linalg.norm(coded.object_features, axis=1), 1.0, atol=2e-2)
    assert rows >= 6, "too few boxes to test the per-column codes"
    print(f"{mode} {source} normalize={normalize}: {rows} vectors, worst cosine {worst_cosine:.8f}, "
          f"worst |error|/scale {worst_ratio:.8f}")
    assert worst_cosine >= MIN_COSINE


def test_frames_without_boxes_send_d_zero_scales_and_no_codes(small_server):
    """N = 0: the (0, D) tensor has D channels without elements, each scale 0 and offset 0 (the proto's rule)."""
    image = FRAMES[0][:64, :80]
    options = pb.FeatureOptions(layers=["P3"], detection=pb.DetectionOptions(enabled=True, conf_thres=1.0),
                                object_features=pb.ObjectFeatureOptions(dtype=pb.DTYPE_UINT8_AFFINE))
    requests = [pb.StreamRequest(config=pb.StreamConfig(options=options)), pb.StreamRequest(frame=frame_of(0, image))]
    with feature_stub(small_server.address) as stub:
        (response,) = list(stub.StreamFeatures(iter(requests), timeout=60))
    result = response.result
    assert result.status == pb.FRAME_STATUS_OK, result.error_message
    tensor = result.object_features
    assert not result.boxes and tensor.dtype == pb.DTYPE_UINT8_AFFINE and tuple(tensor.shape) == (0, 448)
    assert list(tensor.affine_scales) == [0.0] * 448 and list(tensor.affine_offsets) == [0.0] * 448
    assert tensor.data == b""
    with FeatureClient(small_server.address, timeout=60) as client:
        got = client.extract(image, layers="P3", detect=DetectOptions(conf=1.0), objects=ObjectFeatureOptions(
            dtype="uint8"))
    assert got.object_features.shape == (0, 448) and got.object_features.dtype == np.float32
    assert got.codes["object_features"].codes.shape == (0, 448)


def test_coded_vectors_follow_the_stream_options(small_server):
    """Compression leaves object vectors in the message as they were (it applies to the feature tensors); tracking
    reads the decoded vectors; the unary call codes them too."""
    items = [(f[:64, :80], None, _client_boxes(f[:64, :80], 4, k)) for k, f in enumerate(FRAMES)]
    objects = ObjectFeatureOptions(dtype="uint8", normalize=True)
    with FeatureClient(small_server.address, timeout=60) as client:
        plain = list(client.stream(items, layers="P3", encoding="raw", objects=objects))
        packed = list(client.stream(items, layers="P3", encoding="raw", objects=objects, compression="zstd"))
        tracked = list(client.stream(items, layers="P3", encoding="raw", objects=objects, track=True))
        one = client.extract(items[0][0], layers="P3", encoding="raw", boxes=items[0][2], objects=objects)
    for a, b, c in zip(plain, packed, tracked):
        assert a.ok and b.ok and c.ok, (a.error, b.error, c.error)
        assert np.array_equal(a.object_features, b.object_features)
        assert np.array_equal(a.object_features, c.object_features) and c.detections.track_ids is not None
        assert a.codes["object_features"].codes.shape == (4, 448)
    assert np.array_equal(one.object_features, plain[0].object_features)


def test_a_save_keeps_object_codes_and_loads_them_as_float32(small_server, tmp_path):
    """Frames with 3 boxes, none (no box work, no parameter row) and 5 boxes: each box decodes with its frame's
    scales and offsets."""
    small = [f[:64, :80] for f in FRAMES]
    items = [(small[0], None, _client_boxes(small[0], 3, 0)), small[1], (small[2], None, _client_boxes(small[2], 5, 2))]
    with FeatureClient(small_server.address, timeout=60) as client:
        results = list(client.stream(items, layers="P3", pooling="avg", encoding="raw",
                                     objects=ObjectFeatureOptions(dtype="uint8")))
    assert [len(r.detections) if r.detections is not None else None for r in results] == [3, None, 5]
    with FeatureWriter(tmp_path / "save") as writer:
        for r in results:
            writer.append(r)
    saved = load_features(tmp_path / "save")
    assert saved.meta["version"] == 2
    column = saved.meta["objects"]["columns"]["features"]
    assert column["dtype"] == "uint8" and column["affine"] == {"scales": "objects.features.scales.npy",
                                                               "offsets": "objects.features.offsets.npy"}
    rows = saved.objects["features"]
    want = np.concatenate([results[0].object_features, results[2].object_features])
    assert isinstance(rows, CodedRows) and rows.dtype == np.float32 and rows.shape == want.shape == (8, 448)
    assert np.array_equal(np.asarray(rows), want) and np.array_equal(rows[4], want[4])
    assert np.array_equal(rows[2:6], want[2:6]) and np.array_equal(rows[[7, 0]], want[[7, 0]])
    codes = np.load(tmp_path / "save" / "objects.features.npy")
    assert codes.dtype == np.uint8 and np.array_equal(codes, np.concatenate(
        [results[0].codes["object_features"].codes, results[2].codes["object_features"].codes]))
    scales = np.load(tmp_path / "save" / "objects.features.scales.npy")
    assert scales.shape == (2, 448) and np.array_equal(scales[1], results[2].codes["object_features"].scales)
    assert np.array_equal(rows.row(3).codes, results[2].codes["object_features"].codes[0])
    assert np.array_equal(rows.row(3).dequantize(), want[3])

    # cut short: the last frame's parameter row never reached the disk, so its boxes are not read
    meta_path = tmp_path / "save" / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"complete": true', '"complete": false'))
    offsets = tmp_path / "save" / "objects.features.offsets.npy"
    with open(offsets, "r+b") as f:
        f.truncate(offsets.stat().st_size - 4)
    cut = load_features(tmp_path / "save")
    assert len(cut.frames) == 2 and np.array_equal(np.asarray(cut.objects["features"]), want[:3])


def test_the_command_line_saves_object_codes(small_server, tmp_path, capsys):
    import cv2

    from yolostream.server import cli

    small = [f[:64, :80] for f in FRAMES[:2]]
    boxes = [_client_boxes(image, 2 + k, k) for k, image in enumerate(small)]
    for k, image in enumerate(small):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), image)
    lines = [f"{k},{','.join(str(float(v)) for v in box)}" for k, frame in enumerate(boxes) for box in frame]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    save = tmp_path / "features"
    code = cli.main(["stream", str(tmp_path / "*.png"), "--server", small_server.address, "--layers", "P3", "--pool",
                     "avg", "--encoding", "png", "--boxes", str(tmp_path / "boxes.csv"), "--object-dtype", "uint8",
                     "--save", str(save), "-q"])
    assert code == 0, capsys.readouterr().err
    saved = load_features(save)
    assert saved.meta["options"]["object_dtype"] == "uint8" and isinstance(saved.objects["features"], CodedRows)
    with FeatureClient(small_server.address, timeout=60) as client:
        want = [r.object_features for r in client.stream([(f, None, b) for f, b in zip(small, boxes)], layers="P3",
                                                         pooling="avg", encoding="png",
                                                         objects=ObjectFeatureOptions(dtype="uint8"))]
    assert np.array_equal(np.asarray(saved.objects["features"]), np.concatenate(want))


def test_the_writer_refuses_coded_and_float_object_vectors_in_one_save(small_server, tmp_path):
    item = (FRAMES[0][:64, :80], None, _client_boxes(FRAMES[0][:64, :80], 2, 0))
    with FeatureClient(small_server.address, timeout=60) as client:
        (coded,) = client.stream([item], layers="P3", pooling="avg", objects=ObjectFeatureOptions(dtype="uint8"))
        (plain,) = client.stream([item], layers="P3", pooling="avg")
    with FeatureWriter(tmp_path / "mixed") as writer:
        writer.append(coded)
        with pytest.raises(ValueError, match="without 8-bit codes"):
            writer.append(plain)


# The slot: the device's record of the vectors, in the room the layout reserves.


@pytest.mark.parametrize("detections", [True, False])
def test_the_object_slot_holds_the_record_of_the_rows_answered(detections):
    layout = ObjectLayout(rows=6, dim=5, dtype="uint8", detections=detections)
    others = 6 * (16 + 4 + 4 + (16 if detections else 0))
    assert layout.nbytes == others + affine.record_bytes((6, 5)) == others + 6 * 5 + 2 * 5 * 4
    vectors = (RNG.standard_normal((4, 5)) * RNG.uniform(0.1, 10, 5)).astype(np.float32)
    record = quantize.object_record(torch.from_numpy(vectors)).numpy()
    assert record.shape == (affine.record_bytes((4, 5)),)
    result = ObjectResult(boxes=np.ones((4, 4), np.float32), scores=np.ones(4, np.float32) if detections else None,
                          classes=np.zeros(4, np.int32) if detections else None, vectors=record,
                          anchors=np.zeros((4, 4), np.int32) if detections else None)
    buffer = np.zeros(layout.nbytes, np.uint8)
    layout.write(buffer, result)
    views = layout.views(buffer, 4)
    scales, offsets, codes = affine.unpack(views["vectors"], (4, 5))
    want_codes, want_scales, want_offsets, _ = wire.quantize_reference(vectors, (0,))
    assert np.array_equal(codes, want_codes) and np.array_equal(scales, want_scales)
    assert np.array_equal(offsets, want_offsets) and np.shares_memory(codes, buffer)
    with pytest.raises(ValueError, match="slot expects"):
        layout.write(buffer, ObjectResult(result.boxes, result.scores, result.classes, vectors, result.anchors))


def test_an_empty_record_is_the_zero_parameters_alone_and_uncodable_vectors_are_marked():
    record = quantize.object_record(torch.zeros(0, 7)).numpy()
    scales, offsets, codes = affine.unpack(record, (0, 7))
    assert record.size == 2 * 7 * 4 and codes.shape == (0, 7) and affine.coded(scales)
    assert not scales.any() and not offsets.any()
    layout = ObjectLayout(rows=3, dim=7, dtype="uint8", detections=False)
    buffer = np.zeros(layout.nbytes, np.uint8)
    layout.write(buffer, ObjectResult(np.zeros((0, 4), np.float32), None, None, record))
    assert layout.views(buffer, 0)["vectors"].size == record.size
    bad = torch.ones(2, 7)
    bad[1, 3] = float("inf")
    assert not affine.coded(affine.unpack(quantize.object_record(bad).numpy(), (2, 7))[0])


def test_object_options_take_every_wire_dtype():
    assert ObjectOptions(dtype="uint8").validate().dtype == "uint8"
    with pytest.raises(ValueError, match="unknown dtype"):
        ObjectOptions(dtype="int8").validate()
