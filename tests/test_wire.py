"""numpy <-> Tensor/LetterboxInfo wire helpers: round trips, byte order, zero copy, bfloat16 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

SHAPES = [(), (0,), (3, 0, 5), (7,), (2, 3), (16, 5, 4)]
RNG = np.random.default_rng(7)


def _values(shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 10).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
def test_round_trip_exact(shape, np_dtype):
    arr = _values(shape, np_dtype)
    msg = wire.tensor_to_proto("P3", 17, 8, arr)
    assert msg.dtype == wire.dtype_from_numpy(np_dtype)
    assert list(msg.shape) == list(shape)
    assert (msg.name, msg.layer_index, msg.stride) == ("P3", 17, 8)
    assert len(msg.data) == arr.size * arr.itemsize
    out = wire.tensor_from_proto(msg)
    assert out.shape == arr.shape
    assert out.dtype == np.dtype(np_dtype)
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_through_serialisation(shape):
    arr = _values(shape)
    wire_bytes = wire.tensor_to_proto("9", 9, 32, arr, pb.DTYPE_FLOAT32).SerializeToString()
    out = wire.tensor_from_proto(pb.Tensor.FromString(wire_bytes))
    assert np.array_equal(out, arr)


def test_zero_d_scalar():
    msg = wire.tensor_to_proto("s", 0, 0, np.float32(2.5))
    assert list(msg.shape) == []
    out = wire.tensor_from_proto(msg)
    assert out.shape == () and out == 2.5


def test_conversion_to_requested_dtype():
    arr = _values((4, 5), np.float64)
    msg = wire.tensor_to_proto("x", 1, 2, arr, pb.DTYPE_FLOAT16)
    assert msg.dtype == pb.DTYPE_FLOAT16 and len(msg.data) == 40
    assert np.array_equal(wire.tensor_from_proto(msg), arr.astype(np.float16))


def test_data_is_little_endian_c_order():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = wire.tensor_to_proto("x", 0, 1, arr.T)  # a non-contiguous (Fortran-ordered) view
    assert list(msg.shape) == [3, 2]
    assert msg.data == np.ascontiguousarray(arr.T).astype("<f4").tobytes()
    assert msg.data[:8] == bytes.fromhex("00000000" "00004040")  # 0.0, 3.0 (0x40400000) little-endian


@pytest.mark.parametrize("np_dtype", [">f4", ">f2"])
def test_big_endian_input_is_converted(np_dtype):
    native = _values((3, 4), np.dtype(np_dtype).newbyteorder("="))
    big = native.astype(np_dtype)
    assert big.dtype.byteorder == ">"
    msg = wire.tensor_to_proto("x", 0, 1, big)
    assert msg.data == native.astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()
    assert np.array_equal(wire.tensor_from_proto(msg), native)


def test_decode_is_a_read_only_view_of_the_message_bytes():
    msg = wire.tensor_to_proto("x", 0, 1, _values((8, 8)))
    out = wire.tensor_from_proto(msg)
    assert out.flags.writeable is False
    base = out
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes)
    assert len(base) == len(msg.data)


def test_bfloat16_rounding_hand_computed():
    # float32 bit patterns and their bfloat16 (upper half, rounded to nearest, ties to even):
    cases = {
        0x3F800000: 0x3F80,  # 1.0 exact
        0x3F808000: 0x3F80,  # 1 + 2^-8: tie, lower half is even -> down
        0x3F818000: 0x3F82,  # 1 + 3*2^-8: tie, upper is even -> up
        0x3F80C000: 0x3F81,  # above the tie -> up
        0x3F807FFF: 0x3F80,  # below the tie -> down
        0xBF808001: 0xBF81,  # negative, above the tie -> away from zero
        0x7F7FFFFF: 0x7F80,  # float32 max rounds to +inf
        0x7F800000: 0x7F80,  # +inf stays
        0xFF800000: 0xFF80,  # -inf stays
        0x80000000: 0x8000,  # -0.0 keeps its sign
        0x00000001: 0x0000,  # smallest subnormal rounds to zero
    }
    f32 = np.array(list(cases), dtype=np.uint32).view(np.float32)
    bits = wire.float32_to_bfloat16_bits(f32)
    assert bits.dtype == np.dtype("<u2")
    assert [hex(b) for b in bits] == [hex(v) for v in cases.values()]


def test_bfloat16_nan_stays_nan():
    f32 = np.array([0x7FC00000, 0xFFFFFFFF, 0x7F800001], dtype=np.uint32).view(np.float32)
    assert list(wire.float32_to_bfloat16_bits(f32)) == [0x7FC0] * 3
    msg = wire.tensor_to_proto("x", 0, 1, f32, pb.DTYPE_BFLOAT16)
    assert np.isnan(wire.tensor_from_proto(msg)).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bfloat16_round_trip(shape):
    arr = _values(shape)
    msg = wire.tensor_to_proto("P5", 23, 32, arr, pb.DTYPE_BFLOAT16)
    assert msg.dtype == pb.DTYPE_BFLOAT16
    assert len(msg.data) == 2 * arr.size
    out = wire.tensor_from_proto(msg)
    assert out.dtype == np.float32 and out.shape == arr.shape
    # bfloat16 keeps 8 significant bits (7 stored): round-to-nearest errs by at most 2^-8 relative.
    assert np.all(np.abs(out - arr) <= np.abs(arr) * 2.0**-8)
    assert np.any(out != arr) or arr.size == 0
    # Decoding is exact, so re-encoding the decoded values gives the same bits.
    assert wire.tensor_to_proto("P5", 23, 32, out, pb.DTYPE_BFLOAT16).data == msg.data


def test_bfloat16_accepts_ready_bit_patterns():
    bits = np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16)
    for view in (bits, bits.view(np.int16)):
        msg = wire.tensor_to_proto("x", 0, 1, view, pb.DTYPE_BFLOAT16)
        assert list(wire.tensor_from_proto(msg)) == [1.0, -2.0, np.inf]


def test_bfloat16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([_values(1000), np.array([0x3F808000, 0x3F818000], np.uint32).view(np.float32)])
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(wire.float32_to_bfloat16_bits(x), ref)


def test_dtype_maps():
    assert wire.dtype_to_numpy(pb.DTYPE_FLOAT32) == np.float32
    assert wire.dtype_to_numpy(pb.DTYPE_FLOAT16) == np.float16
    assert wire.dtype_to_numpy(pb.DTYPE_BFLOAT16) == np.float32
    assert wire.dtype_from_numpy(np.float16) == pb.DTYPE_FLOAT16
    assert wire.dtype_from_numpy(">f4") == pb.DTYPE_FLOAT32
    for name in ("float32", "float16", "bfloat16"):
        assert wire.dtype_name(wire.dtype_from_name(name)) == name
    with pytest.raises(ValueError, match="float64"):
        wire.dtype_from_numpy(np.float64)
    with pytest.raises(ValueError, match="choose one of"):
        wire.dtype_from_name("int8")
    with pytest.raises(ValueError, match="DTYPE_UNSPECIFIED"):
        wire.dtype_to_numpy(pb.DTYPE_UNSPECIFIED)


def test_every_wire_dtype_is_mapped():
    values = [v for v in pb.Dtype.values() if v != pb.DTYPE_UNSPECIFIED]
    assert sorted(values) == sorted(wire.ITEMSIZE) == sorted(wire.DTYPE_NAMES.values())


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="float64"):
        wire.tensor_to_proto("x", 0, 1, np.zeros(3, np.float64))  # dtype cannot be inferred
    with pytest.raises(ValueError, match="complex"):
        wire.tensor_to_proto("x", 0, 1, np.zeros(3, np.complex64), pb.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="unsupported"):
        wire.tensor_to_proto("x", 0, 1, np.zeros(3, np.float32), 99)


def test_decode_rejects_inconsistent_messages():
    good = wire.tensor_to_proto("x", 0, 1, np.zeros((2, 3), np.float32))
    short = pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=good.data[:-1])
    with pytest.raises(ValueError, match="23 data bytes"):
        wire.tensor_from_proto(short)
    with pytest.raises(ValueError, match="negative"):
        wire.tensor_from_proto(pb.Tensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[-1, 3], data=good.data))
    with pytest.raises(ValueError, match="DTYPE_UNSPECIFIED"):
        wire.tensor_from_proto(pb.Tensor(name="x", shape=[2, 3], data=good.data))


def _letterbox_dict():
    return {
        "original_height": 720, "original_width": 1280, "input_height": 384, "input_width": 640,
        "resized_height": 360, "resized_width": 640, "ratio_w": 0.5, "ratio_h": 0.5,
        "pad_left": 0, "pad_top": 12, "pad_right": 0, "pad_bottom": 12,
    }


def test_letterbox_round_trip():
    d = _letterbox_dict()
    msg = wire.letterbox_to_proto(d)
    assert msg.pad_top == 12 and msg.input_height == 384
    assert wire.letterbox_from_proto(pb.LetterboxInfo.FromString(msg.SerializeToString())) == d


def test_letterbox_ratio_keeps_double_precision():
    d = _letterbox_dict() | {"ratio_w": 320 / 251, "ratio_h": 320 / 251}
    assert wire.letterbox_from_proto(wire.letterbox_to_proto(d))["ratio_w"] == 320 / 251


def test_letterbox_dict_must_match_fields():
    d = _letterbox_dict()
    del d["pad_top"]
    with pytest.raises(ValueError, match="pad_top"):
        wire.letterbox_to_proto(d)
    with pytest.raises(ValueError, match="ratio"):
        wire.letterbox_to_proto(_letterbox_dict() | {"ratio": 0.5})


def test_client_boxes_and_ids_round_trip_through_a_frame():
    boxes = RNG.uniform(0, 500, (7, 4)).astype(np.float32)
    frame = wire.set_frame_boxes(pb.Frame(frame_id=3), boxes, ids=range(100, 107))
    back, ids = wire.frame_boxes(pb.Frame.FromString(frame.SerializeToString()))
    assert back.dtype == np.float32 and np.array_equal(back, boxes)
    assert ids.dtype == np.uint64 and ids.tolist() == list(range(100, 107))
    plain, none = wire.frame_boxes(wire.set_frame_boxes(pb.Frame(), boxes[:2]))
    assert none is None and np.array_equal(plain, boxes[:2])
    empty, _ = wire.frame_boxes(pb.Frame())
    assert empty.shape == (0, 4)


@pytest.mark.parametrize(
    ("boxes", "ids", "message"),
    [
        (np.zeros((2, 3)), None, r"boxes must be an \(N, 4\) array"),
        (np.zeros((2, 4)), [1], "1 box ids for 2 boxes"),
    ],
)
def test_bad_client_boxes_are_refused(boxes, ids, message):
    with pytest.raises(ValueError, match=message):
        wire.set_frame_boxes(pb.Frame(), boxes, ids)


def test_frame_with_a_partial_box_is_refused():
    frame = pb.Frame(boxes=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="holds 5 values, not 4 per box"):
        wire.frame_boxes(frame)
    with pytest.raises(ValueError, match="2 box ids for 1 boxes"):
        wire.frame_boxes(pb.Frame(boxes=[1, 2, 3, 4], box_ids=[1, 2]))


def test_detections_and_object_features_round_trip_through_a_result():
    n = 5
    boxes = RNG.uniform(0, 300, (n, 4)).astype(np.float32)
    scores = RNG.uniform(0.25, 1, n).astype(np.float32)
    classes = np.array([0, 2, 2, 79, 5])
    feats = _values((n, 448))
    slices = [("P3", 17, 8, 0, 64), ("P4", 20, 16, 64, 192), ("P5", 23, 32, 192, 448)]
    msg = wire.fill_objects(pb.FrameResult(), boxes, scores=scores, classes=classes, features=feats, slices=slices,
                            dtype=pb.DTYPE_FLOAT16)
    got = wire.objects_from_proto(pb.FrameResult.FromString(msg.SerializeToString()))
    assert got.source == pb.BOX_SOURCE_DETECTOR and got.box_ids is None
    assert np.array_equal(got.boxes, boxes) and np.array_equal(got.scores, scores)
    assert got.classes.dtype == np.int32 and got.classes.tolist() == classes.tolist()
    assert got.features.dtype == np.float16 and np.array_equal(got.features, feats.astype(np.float16))
    assert got.slices == {"P3": (0, 64), "P4": (64, 192), "P5": (192, 448)}
    assert np.array_equal(got.layer("P4"), feats[:, 64:192].astype(np.float16))
    assert msg.object_features.name == wire.OBJECT_FEATURES_NAME and msg.object_features.layer_index == -1


def _anchor_result(anchors=None) -> pb.FrameResult:
    boxes = np.array([[1, 2, 30, 40], [0, 0, 5, 5], [7, 8, 9, 10]], np.float32)
    return wire.fill_objects(pb.FrameResult(), boxes, scores=[0.9, 0.8, 0.7], classes=[1, 2, 3], anchors=anchors,
                             features=np.ones((3, 2), np.float32), slices=[("P3", 17, 8, 0, 2)])


def test_detection_anchors_round_trip_as_four_columns():
    anchors = np.array([[0, 31, 39, 2], [1, 0, 0, 0], [2, 511, 7, 1]])
    msg = _anchor_result(anchors)
    assert list(msg.anchor_levels) == [0, 1, 2] and list(msg.anchor_rows) == [31, 0, 511]
    assert list(msg.anchor_cols) == [39, 0, 7] and list(msg.anchor_indices) == [2, 0, 1]
    got = wire.objects_from_proto(pb.FrameResult.FromString(msg.SerializeToString()))
    assert got.anchors.dtype == np.int32 and got.anchors.tolist() == anchors.tolist()
    empty = wire.fill_objects(pb.FrameResult(), np.zeros((0, 4), np.float32), scores=[], classes=[], anchors=[])
    assert wire.objects_from_proto(empty).anchors.shape == (0, 4)


def test_results_without_anchors_read_as_none():
    """Client boxes have no anchor, and a server older than the anchor fields sends none: both read as None."""
    assert wire.objects_from_proto(_anchor_result()).anchors is None
    client = wire.fill_objects(pb.FrameResult(), np.ones((1, 4), np.float32), source=pb.BOX_SOURCE_CLIENT)
    assert wire.objects_from_proto(client).anchors is None


def test_a_client_built_before_the_anchor_fields_reads_a_new_reply_as_before():
    """The old FrameResult (this proto without fields 16-19) parses a reply with anchors into exactly the message
    a server without them would have sent: the fields are additive."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    result = next(m for m in file.message_type if m.name == "FrameResult")
    assert sorted(f.number for f in result.field if f.name in wire.ANCHOR_FIELDS) == [16, 17, 18, 19]
    kept = [f for f in result.field if f.name not in wire.ANCHOR_FIELDS]
    del result.field[:]
    result.field.extend(kept)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    old_result = message_factory.GetMessageClass(pool.FindMessageTypeByName("yolostream.v1.FrameResult"))
    new_bytes = _anchor_result(np.array([[0, 1, 2, 0], [1, 3, 4, 1], [2, 5, 6, 2]])).SerializeToString()
    old = old_result.FromString(new_bytes)
    old.DiscardUnknownFields()
    assert old.SerializeToString(deterministic=True) == _anchor_result().SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        (np.zeros((2, 4), int), r"anchors of shape \(2, 4\) for 3 boxes; want \(3, 4\)"),
        (np.zeros((3, 3), int), r"anchors of shape \(3, 3\) for 3 boxes"),
        (np.array([[0, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 0]]), "never negative"),
    ],
)
def test_bad_anchors_are_refused(anchors, message):
    with pytest.raises(ValueError, match=message):
        _anchor_result(anchors)


def test_a_result_with_anchor_fields_of_different_lengths_is_refused():
    msg = _anchor_result(np.zeros((3, 4), int))
    del msg.anchor_cols[2:]
    with pytest.raises(ValueError, match="3 anchor_levels, 3 anchor_rows, 2 anchor_cols, 3 anchor_indices for 3 boxes"):
        wire.objects_from_proto(msg)


def test_client_box_results_carry_ids_and_no_scores():
    boxes = np.array([[1, 2, 30, 40]], np.float32)
    msg = wire.fill_objects(pb.FrameResult(), boxes, source=pb.BOX_SOURCE_CLIENT, box_ids=[9],
                            features=np.ones((1, 3), np.float32), slices=[("P3", 17, 8, 0, 3)])
    got = wire.objects_from_proto(msg)
    assert got.source == pb.BOX_SOURCE_CLIENT and got.scores is None and got.classes is None
    assert got.box_ids.tolist() == [9] and got.features.shape == (1, 3)
    none = wire.objects_from_proto(pb.FrameResult())
    assert none.boxes.shape == (0, 4) and none.features is None and none.source == pb.BOX_SOURCE_UNSPECIFIED
    with pytest.raises(KeyError, match="no object features"):
        none.layer("P3")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [0.5]}, "1 scores for 2 boxes"),
        ({"classes": [1, 2, 3]}, "3 classes for 2 boxes"),
        ({"features": np.zeros((3, 4), np.float32)}, r"object features must be \(N, D\) with N = 2 boxes"),
        ({"features": np.zeros((2, 4), np.float32), "slices": [("P3", 17, 8, 0, 5)]},
         r"slice 'P3' \[0, 5\) is outside the 4 feature columns"),
    ],
)
def test_inconsistent_result_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wire.fill_objects(pb.FrameResult(), np.zeros((2, 4), np.float32), **kwargs)


def test_a_result_with_detections_but_no_scores_is_refused():
    with pytest.raises(ValueError, match="0 scores for 1 detections"):
        wire.objects_from_proto(pb.FrameResult(box_source=pb.BOX_SOURCE_DETECTOR, boxes=[0, 0, 1, 1]))


@pytest.mark.parametrize("in_stream_response", [False, True])
def test_a_pre_serialised_result_parses_as_the_filled_message(in_stream_response):
    """Tensor bytes spliced in after serialisation decode exactly like a message whose data fields were set."""
    arrays = [np.arange(2 * 3 * 200, dtype=np.float32).reshape(2, 3, 200), np.ones(70, np.float16)]
    head = pb.FrameResult(frame_id=7, status=pb.FRAME_STATUS_OK, batch_size=3)
    head.timings.compute_us = 1234
    filled = pb.FrameResult()
    filled.CopyFrom(head)
    for k, array in enumerate(arrays):
        for message in (head, filled):
            tensor = message.tensors.add(name=f"L{k}", layer_index=k, stride=8, dtype=wire.dtype_from_numpy(array.dtype))
            tensor.shape[:] = array.shape
        filled.tensors[k].data = array.tobytes()
    data = wire.serialize_result(head, arrays, in_stream_response)
    parsed = pb.StreamResponse.FromString(data).result if in_stream_response else pb.FrameResult.FromString(data)
    assert parsed == filled
    np.testing.assert_array_equal(wire.tensor_from_proto(parsed.tensors[0]), arrays[0])
    with pytest.raises(ValueError, match="2 tensors but 1 payloads"):
        wire.serialize_result(head, arrays[:1])


@pytest.mark.parametrize("ids", [[-1, 2], [2**64, 1], [1.5, 2], ["a", "b"], [True, False]])
def test_box_ids_must_be_integers_that_fit_uint64(ids):
    with pytest.raises(ValueError, match=r"box ids must be integers in \[0, 2\*\*64\)"):
        wire.set_frame_boxes(pb.Frame(), [[0, 0, 1, 1], [0, 0, 2, 2]], ids)
    frame = wire.set_frame_boxes(pb.Frame(), [[0, 0, 1, 1], [0, 0, 2, 2]], [2**64 - 1, 0])
    assert list(frame.box_ids) == [2**64 - 1, 0]
