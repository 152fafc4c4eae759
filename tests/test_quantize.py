"""DTYPE_UINT8_AFFINE: the numpy reference, the device quantiser (torch) bit for bit against it, and the wire form.

The per-element bound tested everywhere is ``conftest.assert_affine_bound``'s (its docstring says where each term
comes from).
"""

from __future__ import annotations

import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from conftest import AFFINE_ULPS as ULPS
from conftest import assert_affine_bound as _assert_bound

torch = pytest.importorskip("torch", reason="the device quantiser needs torch (the server extra)")
from yolostream.server.device import quantize  # noqa: E402

RNG = np.random.default_rng(19)


def _bits(a) -> np.ndarray:
    """float32 bit patterns, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def _maps(n=3, c=5, h=7, w=9, scale=10.0) -> np.ndarray:
    per_channel = RNG.uniform(1e-3, scale, (n, c, 1, 1))
    return (RNG.standard_normal((n, c, h, w)) * per_channel + RNG.normal(0, scale, (n, c, 1, 1))).astype(np.float32)


# The reference and the wire form.


def test_offset_is_min_and_scale_is_range_over_255():
    x = np.array([[-1.0, 0.5, 3.0], [2.0, 2.0, 2.0]], dtype=np.float32).reshape(2, 3, 1)
    codes = wire.quantize_affine(x)
    assert codes.axis == 0
    assert _bits(codes.offsets).tolist() == _bits([-1.0, 2.0]).tolist()
    assert _bits(codes.scales).tolist() == _bits([np.float32(4.0) / np.float32(255), 0.0]).tolist()
    assert codes.codes[0].ravel().tolist() == [0, round(1.5 / (4 / 255)), 255]
    assert codes.codes[1].ravel().tolist() == [0, 0, 0]


def test_rounding_is_half_to_even():
    # max - min = 255 gives scale exactly 1, so (x - min) / scale is x itself: halves land on even codes.
    x = np.array([0.0, 0.5, 1.5, 2.5, 3.5, 254.5, 255.0], dtype=np.float32)
    codes = wire.quantize_affine(x)
    assert codes.scales.tolist() == [1.0]
    assert codes.codes.tolist() == [0, 0, 2, 2, 4, 254, 255]
    torch_codes = quantize.quantize_pooled(torch.from_numpy(x)[None])
    assert torch_codes.codes[0].tolist() == [0, 0, 2, 2, 4, 254, 255]


@pytest.mark.parametrize("shape, axis, channels", [
    ((4, 6, 5), 0, 4),       # (C, H, W) feature map: axis 0
    ((1, 3, 2, 2), 0, 1),    # rank 4 follows rank 3
    ((7, 12), 1, 12),        # (N, D) object features: one channel per column
    ((33,), None, 1),        # (C,) pooled vector: one channel
    ((), None, 1),           # scalar
    ((0, 12), 1, 12),        # no boxes: 12 empty channels
    ((0, 4, 4), 0, 0),       # no channels at all
])
def test_channel_axis_by_rank(shape, axis, channels):
    x = (RNG.standard_normal(shape) * 4).astype(np.float32)
    codes = wire.quantize_affine(x)
    assert codes.axis == axis == wire.affine_channel_axis(len(shape))
    assert codes.codes.shape == shape and codes.codes.dtype == np.uint8
    assert codes.scales.shape == codes.offsets.shape == (channels,)
    _assert_bound(x, codes)


def test_empty_channels_have_zero_parameters():
    codes = wire.quantize_affine(np.zeros((0, 3), np.float32))
    assert codes.scales.tolist() == [0, 0, 0] and codes.offsets.tolist() == [0, 0, 0]
    assert codes.dequantize().shape == (0, 3)


@pytest.mark.parametrize("shape", [(16, 20, 24), (64,), (9, 40), (0, 40), ()], ids=str)
@pytest.mark.parametrize("source", [np.float32, np.float16])
def test_round_trip_through_the_wire(shape, source):
    x = (RNG.standard_normal(shape) * 7 + 1).astype(source)
    codes = wire.quantize_affine(x)
    msg = wire.fill_tensor_affine(pb.Tensor(), "P3", 17, 8, codes.codes, codes.scales, codes.offsets)
    parsed = pb.Tensor.FromString(msg.SerializeToString())
    assert parsed.dtype == pb.DTYPE_UINT8_AFFINE and list(parsed.shape) == list(shape)
    assert len(parsed.data) == int(np.prod(shape))
    raw = wire.affine_from_proto(parsed)
    assert np.array_equal(raw.codes, codes.codes) and raw.axis == codes.axis
    assert _bits(raw.scales).tolist() == _bits(codes.scales).tolist()
    assert _bits(raw.offsets).tolist() == _bits(codes.offsets).tolist()
    for decoded in (wire.tensor_from_proto(parsed), wire.decode_tensor(parsed)):
        assert decoded.dtype == np.float32 and decoded.shape == shape
        assert _bits(decoded).tolist() == _bits(codes.dequantize()).tolist()
    _assert_bound(x.astype(np.float32), codes)


def test_decode_is_offset_plus_scale_times_code_in_double_rounded_once():
    codes = np.array([0, 1, 128, 255], np.uint8)
    scale, offset = np.float32(0.1), np.float32(-3.3)
    expected = [np.float32(float(offset) + float(scale) * q) for q in codes.tolist()]
    out = wire.dequantize_affine(codes, [scale], [offset], None)
    assert _bits(out).tolist() == _bits(expected).tolist()


@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])
@pytest.mark.parametrize("shape", [(16, 20, 24), (64,), (9, 40)], ids=str)
def test_other_element_types_still_round_trip(dtype, shape):
    x = (RNG.standard_normal(shape) * 7).astype(np.float32)
    parsed = pb.Tensor.FromString(wire.tensor_to_proto("P4", 20, 16, x, dtype).SerializeToString())
    assert not parsed.affine_scales and not parsed.affine_offsets and parsed.compression == 0
    expected = wire.tensor_from_proto(parsed)
    assert _bits(wire.decode_tensor(parsed)).tolist() == _bits(expected).tolist()
    if dtype == pb.DTYPE_FLOAT32:
        assert _bits(expected).tolist() == _bits(x).tolist()  # no quantisation asked: bit for bit


def test_constant_channels_decode_exactly():
    x = np.stack([np.full((6, 7), v, np.float32) for v in (0.0, -0.0, 3.25, -1e-40, 7e37, 1e-45)])
    codes = wire.quantize_affine(x)
    assert codes.scales.tolist() == [0.0] * 6
    assert not codes.codes.any()
    # Equal values (a constant -0.0 channel decodes to +0.0: offset + 0.0 is +0.0 in IEEE arithmetic).
    assert np.array_equal(codes.dequantize(), x)
    assert _bits(codes.offsets).tolist() == _bits(x[:, 0, 0]).tolist()


def test_extreme_but_codable_values_keep_the_bound():
    limit = np.float32(wire.AFFINE_LIMIT)
    channels = [
        np.linspace(-limit, limit, 50, dtype=np.float32),        # the widest range that is coded
        np.linspace(0, limit, 50, dtype=np.float32),
        np.linspace(-limit, -1e37, 50, dtype=np.float32),
        np.linspace(-1e-38, 1e-38, 50, dtype=np.float32),      # around the normal/subnormal edge
        np.array(RNG.integers(0, 2000, 50), dtype=np.uint32).view(np.float32),  # subnormals only
        np.concatenate([np.full(49, 1e-45, np.float32), [2e-45]]).astype(np.float32),
    ]
    x = np.stack(channels).reshape(6, 5, 10)
    codes = wire.quantize_affine(x)
    _assert_bound(x, codes)
    assert np.isfinite(codes.dequantize()).all()


@pytest.mark.parametrize("kind", ["normal", "uniform", "bit patterns", "few levels"])
def test_the_bound_holds_across_magnitudes(kind):
    """2000 channels of 64 values each, magnitudes from subnormal to 2**126, centred on zero or far from it."""
    rng = np.random.default_rng(["normal", "uniform", "bit patterns", "few levels"].index(kind))
    mag = 10.0 ** rng.uniform(-46, 37.9, (2000, 1))
    centre = rng.choice([0, 1, -1], (2000, 1)) * mag * 10.0 ** rng.uniform(0, 8, (2000, 1))
    with np.errstate(all="ignore"):
        if kind == "normal":
            x = centre + mag * rng.standard_normal((2000, 64))
        elif kind == "uniform":
            x = centre + mag * rng.uniform(0, 1, (2000, 64))
        elif kind == "bit patterns":
            x = np.array(rng.integers(0, 2**31, (2000, 64)), np.uint32).view(np.float32) * rng.choice([1, -1], (2000, 64))
        else:
            x = mag * rng.integers(-3, 4, (2000, 64))
        limit = np.float32(wire.AFFINE_LIMIT)
        x = np.clip(np.nan_to_num(np.asarray(x, np.float64)).astype(np.float32), -limit, limit)
    codes, scales, offsets, ok = wire.quantize_reference(x, (1,))
    assert ok.all()
    _assert_bound(x, wire.AffineCodes(codes, scales, offsets, 0))


def test_one_huge_outlier_keeps_the_bound():
    x = (RNG.standard_normal((4, 30, 30))).astype(np.float32)
    x[2, 17, 3] = 1e30
    codes = wire.quantize_affine(x)
    _assert_bound(x, codes)
    decoded = codes.dequantize()
    assert abs(float(decoded[2, 17, 3]) - 1e30) <= codes.scales[2] / 2 + ULPS * 1e30
    # The other channels keep their own fine steps.
    assert codes.scales[[0, 1, 3]].max() < 0.1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38, -3e38, 2 * wire.AFFINE_LIMIT], ids=str)
def test_values_the_codes_cannot_carry_are_refused(bad):
    x = RNG.standard_normal((3, 4, 4)).astype(np.float32)
    x[1, 2, 2] = bad
    with pytest.raises(wire.NotQuantizableError, match="float32|2\\*\\*126"):
        wire.quantize_affine(x)
    codes, scales, offsets, ok = wire.quantize_reference(x, (1, 2))
    assert ok.tolist() == [True, False, True]
    assert scales[1] == 0 and offsets[1] == 0


def test_the_limit_itself_is_codable():
    x = np.array([-wire.AFFINE_LIMIT, 0.0, wire.AFFINE_LIMIT], np.float32)
    codes = wire.quantize_affine(x)
    _assert_bound(x, codes)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.affine_scales.append(1.0), "affine_scales"),
    (lambda t: t.affine_offsets.pop(), "affine_offsets"),
    (lambda t: setattr(t, "data", t.data[:-1]), "data bytes"),
    (lambda t: t.affine_scales.__setitem__(0, -1.0), "negative"),
    (lambda t: t.affine_offsets.__setitem__(0, float("nan")), "non-finite"),
])
def test_malformed_affine_tensors_are_refused(mutate, message):
    codes = wire.quantize_affine(RNG.standard_normal((3, 4, 4)).astype(np.float32))
    msg = wire.fill_tensor_affine(pb.Tensor(), "P5", 23, 32, codes.codes, codes.scales, codes.offsets)
    mutate(msg)
    with pytest.raises(ValueError, match=message):
        wire.decode_tensor(msg)


def test_fill_tensor_affine_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        wire.fill_tensor_affine(pb.Tensor(), "P3", 17, 8, np.zeros((2, 2, 2), np.int16), [0, 0], [0, 0])
    with pytest.raises(ValueError, match="2 channel"):
        wire.fill_tensor_affine(pb.Tensor(), "P3", 17, 8, np.zeros((2, 2, 2), np.uint8), [0], [0])


def test_fill_tensor_quantises_on_the_cpu_and_falls_back_to_float32():
    x = _maps(1, 6, 5, 5)[0]
    msg = wire.tensor_to_proto("P3", 17, 8, x, pb.DTYPE_UINT8_AFFINE)
    assert msg.dtype == pb.DTYPE_UINT8_AFFINE and len(msg.affine_scales) == 6
    assert _bits(wire.tensor_from_proto(msg)).tolist() == _bits(wire.quantize_affine(x).dequantize()).tolist()
    x[3, 1, 1] = np.nan
    fallback = wire.tensor_to_proto("P3", 17, 8, x, pb.DTYPE_UINT8_AFFINE)
    assert fallback.dtype == pb.DTYPE_FLOAT32 and not fallback.affine_scales
    assert _bits(wire.tensor_from_proto(fallback)).tolist() == _bits(x).tolist()
    with pytest.raises(ValueError, match="fill_tensor_affine"):
        wire.tensor_to_proto("P3", 17, 8, np.zeros((2, 2, 2), np.uint8), pb.DTYPE_UINT8_AFFINE)


def test_object_vectors_are_coded_per_column():
    features = (RNG.standard_normal((5, 12)) * RNG.uniform(0.1, 100, 12)).astype(np.float32)
    result = wire.fill_objects(pb.FrameResult(), np.tile([[0, 0, 4, 4]], (5, 1)), source=pb.BOX_SOURCE_CLIENT,
                               features=features, slices=[("P3", 17, 8, 0, 12)], dtype=pb.DTYPE_UINT8_AFFINE)
    assert result.object_features.dtype == pb.DTYPE_UINT8_AFFINE
    assert len(result.object_features.affine_scales) == 12
    objects = wire.objects_from_proto(pb.FrameResult.FromString(result.SerializeToString()))
    _assert_bound(features, wire.quantize_affine(features))
    assert _bits(objects.features).tolist() == _bits(wire.quantize_affine(features).dequantize()).tolist()


def test_the_dtype_tables_know_the_codes():
    assert wire.dtype_name(pb.DTYPE_UINT8_AFFINE) == "uint8"
    assert wire.dtype_from_name("uint8") == pb.DTYPE_UINT8_AFFINE
    assert wire.ITEMSIZE[pb.DTYPE_UINT8_AFFINE] == 1
    assert wire.storage_dtype(pb.DTYPE_UINT8_AFFINE) == np.uint8
    assert wire.dtype_to_numpy(pb.DTYPE_UINT8_AFFINE) == np.float32


def test_header_and_payload_assemble_through_serialize_result():
    x = _maps(1, 8, 6, 10)[0]
    codes = wire.quantize_affine(x)
    result = pb.FrameResult(frame_id=5, status=pb.FRAME_STATUS_OK)
    wire.affine_header(result.tensors.add(), "P3", 17, 8, x.shape, codes.scales, codes.offsets)
    parsed = pb.FrameResult.FromString(wire.serialize_result(result, [codes.codes]))
    assert _bits(wire.tensor_from_proto(parsed.tensors[0])).tolist() == _bits(codes.dequantize()).tolist()


# The device quantiser against the reference, bit for bit.


def _assert_same(q: quantize.Quantized, reference: tuple) -> None:
    codes, scales, offsets, ok = reference
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == q.offsets.dtype == torch.float32
    assert np.array_equal(q.codes.cpu().numpy(), codes)
    assert _bits(q.scales.cpu().numpy()).tolist() == _bits(scales).tolist()
    assert _bits(q.offsets.cpu().numpy()).tolist() == _bits(offsets).tolist()


def _hard_maps() -> np.ndarray:
    """A batch with every awkward channel: constant, ±0, extremes, subnormals, an outlier, NaN, ±inf, beyond 2**126."""
    x = _maps(4, 12, 9, 11)
    limit = np.float32(wire.AFFINE_LIMIT)
    x[0, 0] = 4.5
    x[0, 1] = -0.0
    x[0, 2] = np.linspace(-limit, limit, 99, dtype=np.float32).reshape(9, 11)
    x[0, 3] = np.array(RNG.integers(0, 5000, 99), np.uint32).view(np.float32).reshape(9, 11)
    x[0, 4, 4, 4] = 1e30
    x[1, 5, 0, 0] = 3e38
    x[2, 6, 3, 3] = np.nan
    x[2, 7, 1, 1] = -np.inf
    x[3, 8] = np.float32(1.0) + np.arange(99, dtype=np.float32).reshape(9, 11) * np.float32(2**-23)
    return x


@pytest.mark.parametrize("case", ["random", "hard", "wide", "float16"])
def test_device_maps_equal_the_reference(case):
    if case == "random":
        x = _maps(5, 16, 13, 17)
    elif case == "hard":
        x = _hard_maps()
    elif case == "wide":
        x = (RNG.standard_normal((2, 8, 20, 20)) * 10.0 ** RNG.uniform(-30, 30, (2, 8, 1, 1))).astype(np.float32)
    else:
        x = _maps(3, 8, 10, 10).astype(np.float16)
    q = quantize.quantize_maps(torch.from_numpy(x))
    reference = wire.quantize_reference(x, (2, 3))
    _assert_same(q, reference)
    assert q.ok.tolist() == reference[3].all(axis=1).tolist()
    if case == "hard":
        assert q.ok.tolist() == [True, False, False, True]
    for n in np.flatnonzero(reference[3].all(axis=1)):
        codes = wire.AffineCodes(reference[0][n], reference[1][n], reference[2][n], 0)
        _assert_bound(x[n].astype(np.float32), codes)
        single = wire.quantize_affine(x[n])  # per-frame reference = batch reference, frame by frame
        assert np.array_equal(single.codes, reference[0][n])


def test_device_maps_accept_channels_last():
    x = _maps(2, 8, 6, 7)
    t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    _assert_same(quantize.quantize_maps(t), wire.quantize_reference(x, (2, 3)))


def test_device_bfloat16_maps_equal_the_reference_of_their_values():
    t = torch.from_numpy(_maps(2, 4, 5, 5)).to(torch.bfloat16)
    x = t.to(torch.float32).numpy()
    _assert_same(quantize.quantize_maps(t), wire.quantize_reference(x, (2, 3)))


def test_device_pooled_vectors_equal_the_reference():
    x = (RNG.standard_normal((6, 256)) * RNG.uniform(0.01, 50, (6, 1))).astype(np.float32)
    x[1] = 2.0
    x[2, 5] = np.inf
    q = quantize.quantize_pooled(torch.from_numpy(x))
    reference = wire.quantize_reference(x, (1,))
    _assert_same(q, reference)
    assert q.scales.shape == (6,) and q.ok.tolist() == [True, True, False, True, True, True]
    single = wire.quantize_affine(x[3])
    assert np.array_equal(single.codes, reference[0][3]) and single.scales.tolist() == [reference[1][3]]


@pytest.mark.parametrize("k", [0, 1, 2, 40])
def test_device_object_vectors_equal_the_reference(k):
    x = (RNG.standard_normal((k, 448)) * RNG.uniform(0.01, 50, (1, 448))).astype(np.float32)
    q = quantize.quantize_objects(torch.from_numpy(x))
    reference = wire.quantize_reference(x, (0,))
    _assert_same(q, reference)
    assert q.scales.shape == (448,) and bool(q.ok)
    single = wire.quantize_affine(x)
    assert np.array_equal(single.codes, reference[0]) and _bits(single.scales).tolist() == _bits(reference[1]).tolist()


def test_device_object_vectors_refuse_nan():
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    x[1, 2] = np.nan
    assert not bool(quantize.quantize_objects(torch.from_numpy(x)).ok)


def test_device_shapes_are_checked():
    with pytest.raises(ValueError, match="N, C, H, W"):
        quantize.quantize_maps(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="N, C"):
        quantize.quantize_pooled(torch.zeros(3))
    with pytest.raises(ValueError, match="K, D"):
        quantize.quantize_objects(torch.zeros(3, 4, 5))


# The per-frame records the device hands the front-end (common/affine.py).


@pytest.mark.parametrize("layout", ["maps", "channels_last", "pooled"])
def test_records_unpack_to_the_reference_codes_and_mark_uncodable_frames(layout):
    from yolostream.server.common import affine

    x = _hard_maps() if layout != "pooled" else (RNG.standard_normal((4, 33)) * 7).astype(np.float32)
    if layout == "pooled":
        x[2, 3] = np.nan
    t = torch.from_numpy(x)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    records = quantize.affine_records(t).numpy()
    frame = x.shape[1:]
    assert records.dtype == np.uint8 and records.shape == (len(x), affine.record_bytes(frame))
    assert affine.params(frame) == (x.shape[1] if layout != "pooled" else 1)
    codes, scales, offsets, ok = wire.quantize_reference(x, tuple(range(1, x.ndim)) if layout == "pooled" else (2, 3))
    for n in range(len(x)):
        got_scales, got_offsets, got_codes = affine.unpack(records[n], frame)
        assert got_codes.shape == frame and np.shares_memory(got_codes, records)
        assert affine.coded(got_scales) == bool(ok[n].all())
        if ok[n].all():
            assert np.array_equal(got_codes, codes[n])
            assert _bits(got_scales).tolist() == _bits(scales[n].reshape(-1)).tolist()
            assert _bits(got_offsets).tolist() == _bits(offsets[n].reshape(-1)).tolist()
        else:
            assert np.isnan(got_scales).all()
    with pytest.raises(ValueError, match="record"):
        affine.unpack(records[0, :-1], frame)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check runs where there is one")
def test_cuda_equals_the_reference():
    x = _hard_maps()
    q = quantize.quantize_maps(torch.from_numpy(x).cuda())
    _assert_same(q, wire.quantize_reference(x, (2, 3)))
    half = _maps(3, 8, 10, 10).astype(np.float16)
    _assert_same(quantize.quantize_maps(torch.from_numpy(half).cuda().contiguous(memory_format=torch.channels_last)),
                 wire.quantize_reference(half, (2, 3)))
    vectors = (RNG.standard_normal((5, 64)) * 3).astype(np.float32)
    _assert_same(quantize.quantize_pooled(torch.from_numpy(vectors).cuda()), wire.quantize_reference(vectors, (1,)))
    _assert_same(quantize.quantize_objects(torch.from_numpy(vectors).cuda()), wire.quantize_reference(vectors, (0,)))
    assert np.array_equal(quantize.affine_records(torch.from_numpy(x).cuda()).cpu().numpy(),
                          quantize.affine_records(torch.from_numpy(x)).numpy())
