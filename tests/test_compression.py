"""Tensor.data compression: the byte shuffle, COMPRESSION_SHUFFLE_ZSTD round trips, the server's never-grow rule,
and clear errors when the codec package is missing or a payload is corrupt."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab, wire

from yolostream.server.frontend import compression  # noqa: E402

needs_zstd = pytest.mark.skipif(
    importlib.util.find_spec("zstandard") is None,
    reason="zstandard is not installed (the compress extra: pip install 'yolostream[compress]')",
)
ZSTD = pb.COMPRESSION_SHUFFLE_ZSTD
RNG = np.random.default_rng(21)


def _features(shape) -> np.ndarray:
    """Feature-like values: a SiLU of smooth noise, so that they compress a little, as real replies do."""
    x = RNG.standard_normal(shape).astype(np.float32)
    x = np.cumsum(x, axis=-1) / np.sqrt(shape[-1])
    return (x / (1 + np.exp(-x))).astype(np.float32)


def _compressed(array: np.ndarray, dtype: int | None = None) -> tuple[pb.Tensor, pb.Tensor]:
    """(plain, compressed) Tensors of ``array`` (DTYPE_UINT8_AFFINE when ``dtype`` says so)."""
    if dtype == pb.DTYPE_UINT8_AFFINE:
        codes = wire.quantize_affine(array)
        plain = wire.fill_tensor_affine(pb.Tensor(), "P3", 17, 8, codes.codes, codes.scales, codes.offsets)
    else:
        plain = wire.tensor_to_proto("P3", 17, 8, array, dtype)
    packed = pb.Tensor()
    packed.CopyFrom(plain)
    packed.data = compression.compress_tensor(packed, plain.data, ZSTD)
    return plain, pb.Tensor.FromString(packed.SerializeToString())


def test_shuffle_groups_bytes_by_significance():
    data = bytes(range(12))  # three 4-byte elements: 0 1 2 3 | 4 5 6 7 | 8 9 10 11
    shuffled = wire.shuffle_bytes(data, 4)
    assert bytes(shuffled) == bytes([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
    assert bytes(wire.unshuffle_bytes(shuffled, 4)) == data
    assert bytes(wire.shuffle_bytes(data, 2)) == bytes([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])
    assert wire.shuffle_bytes(data, 1) is data and wire.unshuffle_bytes(data, 1) is data
    with pytest.raises(ValueError, match="whole 4-byte"):
        wire.shuffle_bytes(data[:-1], 4)
    with pytest.raises(ValueError, match="whole 4-byte"):
        wire.unshuffle_bytes(data[:-1], 4)


@pytest.mark.parametrize("itemsize", [2, 4])
def test_unshuffle_inverts_shuffle(itemsize):
    data = RNG.integers(0, 256, 4096 * itemsize, dtype=np.uint8).tobytes()
    assert bytes(wire.unshuffle_bytes(wire.shuffle_bytes(data, itemsize), itemsize)) == data


@needs_zstd
@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_UINT8_AFFINE])
@pytest.mark.parametrize("shape", [(64, 60, 80), (256,), (12, 448)], ids=str)
def test_compressed_tensors_decode_to_the_same_values(dtype, shape):
    x = _features(shape)
    plain, packed = _compressed(x, dtype)
    if packed.compression == pb.COMPRESSION_UNSPECIFIED:  # fell back: compressing did not pay
        assert x.size < 1000 and packed.data == plain.data and packed.uncompressed_size == 0
    else:
        assert packed.compression == ZSTD
        assert packed.uncompressed_size == len(plain.data)
        assert len(packed.data) < len(plain.data)
    assert bytes(wire.tensor_payload(packed)) == plain.data
    expected = wire.decode_tensor(plain)
    for decoded in (wire.decode_tensor(packed), wire.tensor_from_proto(packed)):
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        assert decoded.tobytes() == expected.tobytes()
    if dtype == pb.DTYPE_FLOAT32:
        assert wire.decode_tensor(packed).tobytes() == x.tobytes()  # lossless: the float32 bits themselves
    if dtype == pb.DTYPE_UINT8_AFFINE:
        assert np.array_equal(wire.affine_from_proto(packed).codes, wire.affine_from_proto(plain).codes)


@needs_zstd
def test_compressed_payloads_go_through_serialize_result():
    x = _features((64, 30, 40))
    codes = wire.quantize_affine(x)
    result = pb.FrameResult(frame_id=9, status=pb.FRAME_STATUS_OK)
    payloads = []
    for name, array in (("P4", x), ("P4q", None)):
        tensor = result.tensors.add()
        if array is None:
            wire.affine_header(tensor, name, 20, 16, x.shape, codes.scales, codes.offsets)
            payloads.append(compression.compress_tensor(tensor, codes.codes, ZSTD))
        else:
            wire.fill_tensor(tensor, name, 20, 16, array)
            plain = tensor.data
            tensor.data = b""
            payloads.append(compression.compress_tensor(tensor, plain, ZSTD))
    parsed = pb.StreamResponse.FromString(wire.serialize_result(result, payloads, in_stream_response=True)).result
    assert [t.compression for t in parsed.tensors] == [ZSTD, ZSTD]
    assert wire.tensor_from_proto(parsed.tensors[0]).tobytes() == x.tobytes()
    assert wire.tensor_from_proto(parsed.tensors[1]).tobytes() == codes.dequantize().tobytes()


@needs_zstd
@pytest.mark.parametrize("payload", [
    RNG.integers(0, 256, 100_000, dtype=np.uint8),  # incompressible: zstd adds its frame header
    np.array([7], np.uint8),                         # tiny: the two extra fields alone outweigh any gain
    RNG.standard_normal(64).astype(np.float32),
], ids=["random", "one byte", "pooled float32"])
def test_a_payload_that_would_grow_is_sent_plain(payload):
    out = compression.compress_payload(payload, payload.itemsize, ZSTD)
    assert out.compression == pb.COMPRESSION_UNSPECIFIED and out.uncompressed_size == 0
    assert out.data is payload
    dtype = pb.DTYPE_UINT8_AFFINE if payload.dtype == np.uint8 else pb.DTYPE_FLOAT32
    tensor = pb.Tensor(dtype=dtype, shape=[payload.size])
    data = compression.compress_tensor(tensor, payload, ZSTD)
    assert data is payload and tensor.compression == 0 and tensor.uncompressed_size == 0


@needs_zstd
@pytest.mark.parametrize("size", [10, 200, 5000, 100_000])
def test_a_compressed_tensor_message_is_always_smaller_than_the_plain_one(size):
    for payload in (RNG.integers(0, 256, size, dtype=np.uint8), np.zeros(size, np.uint8),
                    RNG.integers(0, 4, size, dtype=np.uint8)):
        plain = pb.Tensor(name="P3", dtype=pb.DTYPE_UINT8_AFFINE, shape=[size], data=payload.tobytes())
        packed = pb.Tensor(name="P3", dtype=pb.DTYPE_UINT8_AFFINE, shape=[size])
        packed.data = bytes(compression.compress_tensor(packed, payload, ZSTD))
        assert packed.ByteSize() <= plain.ByteSize()
        assert bytes(wire.tensor_payload(packed)) == payload.tobytes()


@pytest.mark.parametrize("codec", [pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE])
def test_a_stream_that_did_not_ask_gets_plain_bytes(codec):
    payload = np.zeros(100_000, np.float32)  # as compressible as it gets
    out = compression.compress_payload(payload, 4, codec)
    assert out.data is payload and out.compression == pb.COMPRESSION_UNSPECIFIED
    assert not compression.wants_compression(codec)
    assert pb.StreamConfig().compression == pb.COMPRESSION_UNSPECIFIED


def test_unknown_codecs_are_refused():
    with pytest.raises(ValueError, match="unsupported compression 99"):
        compression.check_codec(99)
    assert not compression.codec_available(99)
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0\0\0\0", compression=99, uncompressed_size=4)
    with pytest.raises(ValueError, match="unsupported tensor compression 99"):
        wire.decode_tensor(tensor)


def test_a_missing_codec_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes ``import zstandard`` fail
    with pytest.raises(wire.CodecMissingError, match=r"pip install 'yolostream\[compress\]'"):
        compression.check_codec(ZSTD)
    assert not compression.codec_available(ZSTD)
    assert compression.codec_available(pb.COMPRESSION_NONE)
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"xx", compression=ZSTD, uncompressed_size=8)
    with pytest.raises(wire.CodecMissingError, match=r"yolostream\[compress\]"):
        wire.tensor_from_proto(tensor)
    plain = wire.tensor_to_proto("P3", 17, 8, np.ones(2, np.float32))
    assert wire.tensor_from_proto(plain).tolist() == [1.0, 1.0]  # plain tensors never need the codec


@needs_zstd
def test_corrupt_payloads_are_refused():
    x = _features((16, 20, 20))
    plain, packed = _compressed(x)
    wrong_size = pb.Tensor()
    wrong_size.CopyFrom(packed)
    wrong_size.uncompressed_size += 4
    with pytest.raises(ValueError, match="uncompressed_size"):
        wire.decode_tensor(wrong_size)

    import zstandard

    bigger = pb.Tensor()
    bigger.CopyFrom(packed)
    bigger.shape[0] = 8  # the frame announces 16 channels' bytes; the shape says 8
    bigger.uncompressed_size = len(plain.data) // 2
    with pytest.raises(ValueError, match="announces"):
        wire.decode_tensor(bigger)
    unannounced = pb.Tensor()
    unannounced.CopyFrom(bigger)
    unannounced.data = zstandard.ZstdCompressor(write_content_size=False).compress(plain.data)
    with pytest.raises(ValueError, match="holds|corrupt"):
        wire.decode_tensor(unannounced)
    garbage = pb.Tensor()
    garbage.CopyFrom(packed)
    garbage.data = b"\x28\xb5\x2f\xfd" + bytes(40)
    with pytest.raises(ValueError, match="corrupt|announces|holds"):
        wire.decode_tensor(garbage)


def test_the_vocabulary_names_the_codecs():
    assert vocab.COMPRESSIONS == {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_SHUFFLE_ZSTD}
    assert compression.SUPPORTED == {pb.COMPRESSION_SHUFFLE_ZSTD}
    assert wire.element_size(pb.DTYPE_UINT8_AFFINE) == 1 and wire.element_size(pb.DTYPE_FLOAT16) == 2
