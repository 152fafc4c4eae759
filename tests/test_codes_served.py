"""Issue 19 end to end: 8-bit codes (DTYPE_UINT8_AFFINE) and opt-in tensor compression, served by an in-process
server and read by the client, its ``--save`` and its command line.

The servers here batch one frame at a time (``max_batch=1``), so a frame's float32 features are the same bits in
every stream, and the codes can be checked against the numpy reference quantiser run on them.
"""

from __future__ import annotations

import math
import sys

import grpc
import numpy as np
import pytest
import torch

from yolostream.client import CodedRows, FeatureClient, FeatureWriter, load_features
from yolostream.client.options import stream_compression
from yolostream.server import cli
from yolostream.server.common import affine
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from conftest import assert_affine_bound, cpu_runner, feature_stub, frame_of, in_process_server

IMGSZ = 64
LAYERS = ("backbone", "P3")


@pytest.fixture(scope="module")
def direct_server():
    """A server on the direct (CPU) path."""
    with in_process_server(cpu_runner(IMGSZ), max_batch=1) as running:
        yield running


@pytest.fixture(scope="module", params=["direct", "staged"])
def server(request, direct_server):
    """The direct server, and one on the staged (CUDA) path run on the CPU."""
    if request.param == "direct":
        yield direct_server
        return
    with in_process_server(cpu_runner(IMGSZ, staged=True), max_batch=1) as running:
        yield running


def image(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def stream(server, frames: list[np.ndarray], layers=LAYERS, dtype: int = 0, pooling: int = 0, imgsz: int = 0,
           compression: int | None = None) -> list[pb.FrameResult]:
    """The results of one StreamFeatures call; ``compression`` None leaves the field out, as an older client does."""
    config = pb.StreamConfig(options=pb.FeatureOptions(layers=list(layers), dtype=dtype, pooling=pooling, imgsz=imgsz))
    if compression is not None:
        config.compression = compression
    requests = [pb.StreamRequest(config=config)]
    requests += [pb.StreamRequest(frame=frame_of(i, f)) for i, f in enumerate(frames)]
    with feature_stub(server.address) as stub:
        return [response.result for response in stub.StreamFeatures(iter(requests), timeout=120)]


FRAMES = [image(k) for k in range(3)]
POOLINGS = {"none": pb.POOLING_NONE, "avg": pb.POOLING_GLOBAL_AVG, "max": pb.POOLING_GLOBAL_MAX}


@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_codes_equal_the_reference_quantiser_and_decode_within_the_bound(server, pooling):
    plain = stream(server, FRAMES, pooling=POOLINGS[pooling])
    coded = stream(server, FRAMES, dtype=pb.DTYPE_UINT8_AFFINE, pooling=POOLINGS[pooling])
    for want, got in zip(plain, coded, strict=True):
        assert got.status == pb.FRAME_STATUS_OK, got.error_message
        for reference, tensor in zip(want.tensors, got.tensors, strict=True):
            x = wire.tensor_from_proto(reference)
            assert tensor.dtype == pb.DTYPE_UINT8_AFFINE and tuple(tensor.shape) == x.shape
            assert (tensor.name, tensor.layer_index, tensor.stride) == (reference.name, reference.layer_index,
                                                                      reference.stride)
            channels = x.shape[0] if x.ndim == 3 else 1  # maps: per channel; a pooled vector: one channel
            assert len(tensor.affine_scales) == len(tensor.affine_offsets) == channels
            assert len(tensor.data) == math.prod(x.shape) and tensor.compression == pb.COMPRESSION_UNSPECIFIED
            codes = wire.affine_from_proto(tensor)
            expected = wire.quantize_affine(x)
            assert np.array_equal(codes.codes, expected.codes)
            assert np.array_equal(codes.scales.view(np.uint32), expected.scales.view(np.uint32))
            assert np.array_equal(codes.offsets.view(np.uint32), expected.offsets.view(np.uint32))
            assert_affine_bound(x, codes)


def test_extract_serves_codes_too(server):
    (plain,) = stream(server, FRAMES[:1], layers=["P4"])
    with feature_stub(server.address) as stub:
        result = stub.Extract(pb.ExtractRequest(options=pb.FeatureOptions(layers=["P4"], dtype=pb.DTYPE_UINT8_AFFINE),
                                                frame=frame_of(0, FRAMES[0])), timeout=60)
    assert result.status == pb.FRAME_STATUS_OK and result.tensors[0].dtype == pb.DTYPE_UINT8_AFFINE
    assert_affine_bound(wire.tensor_from_proto(plain.tensors[0]), wire.affine_from_proto(result.tensors[0]))


def test_codes_shrink_the_reply_to_about_a_quarter(server):
    plain = stream(server, FRAMES[:1], layers=["P3"])[0].ByteSize()
    coded = stream(server, FRAMES[:1], layers=["P3"], dtype=pb.DTYPE_UINT8_AFFINE)[0].ByteSize()
    assert coded < 0.3 * plain


@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_UINT8_AFFINE])
def test_a_compressed_stream_decodes_to_exactly_the_plain_one(server, dtype):
    plain = stream(server, FRAMES, dtype=dtype, imgsz=128)
    packed = stream(server, FRAMES, dtype=dtype, imgsz=128, compression=pb.COMPRESSION_SHUFFLE_ZSTD)
    compressed = 0
    for want, got in zip(plain, packed, strict=True):
        assert got.status == pb.FRAME_STATUS_OK, got.error_message
        for a, b in zip(want.tensors, got.tensors, strict=True):
            assert a.compression == pb.COMPRESSION_UNSPECIFIED and a.uncompressed_size == 0
            if b.compression == pb.COMPRESSION_SHUFFLE_ZSTD:  # sent compressed only when that makes it smaller
                compressed += 1
                assert b.uncompressed_size == len(a.data) and len(b.data) < len(a.data)
                assert bytes(wire.tensor_payload(b)) == a.data
            else:
                assert b.compression == pb.COMPRESSION_UNSPECIFIED and b.data == a.data
            assert np.array_equal(wire.decode_tensor(a), wire.decode_tensor(b))
            assert (list(a.affine_scales), list(a.affine_offsets)) == (list(b.affine_scales), list(b.affine_offsets))
    assert compressed >= len(FRAMES)  # at least P3 of every frame was worth compressing
    assert sum(r.ByteSize() for r in packed) < sum(r.ByteSize() for r in plain)


def test_a_payload_that_would_grow_is_sent_plain(server):
    # 64 codes of a pooled vector: zstd's frame and block headers alone outweigh what it could save
    results = stream(server, FRAMES, layers=["C3"], dtype=pb.DTYPE_UINT8_AFFINE, pooling=pb.POOLING_GLOBAL_AVG,
                     compression=pb.COMPRESSION_SHUFFLE_ZSTD)
    for result in results:
        (tensor,) = result.tensors
        assert tensor.compression == pb.COMPRESSION_UNSPECIFIED and tensor.uncompressed_size == 0
        assert len(tensor.data) == tensor.shape[0] == 64


def test_a_client_that_never_asked_gets_plain_float32(server):
    older = stream(server, FRAMES, compression=None)  # a StreamConfig without the new field at all
    packed = stream(server, FRAMES, compression=pb.COMPRESSION_SHUFFLE_ZSTD)
    for a, b in zip(older, packed, strict=True):
        for tensor, other in zip(a.tensors, b.tensors, strict=True):
            assert tensor.dtype == pb.DTYPE_FLOAT32 and tensor.compression == pb.COMPRESSION_UNSPECIFIED
            assert tensor.uncompressed_size == 0 and not tensor.affine_scales and not tensor.affine_offsets
            assert len(tensor.data) == 4 * math.prod(tensor.shape)
            assert np.array_equal(wire.tensor_from_proto(tensor), wire.decode_tensor(other))


def test_an_unknown_compression_ends_the_stream_with_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as err:
        stream(server, FRAMES[:1], compression=9)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression 9" in err.value.details() and "COMPRESSION_SHUFFLE_ZSTD" in err.value.details()


def test_compression_on_a_server_without_zstandard_is_refused_clearly(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now fails, as where it is missing
    with pytest.raises(grpc.RpcError) as err:
        stream(server, FRAMES[:1], compression=pb.COMPRESSION_SHUFFLE_ZSTD)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "zstandard" in err.value.details() and "StreamConfig.compression" in err.value.details()
    assert stream(server, FRAMES[:1])[0].status == pb.FRAME_STATUS_OK  # streams without compression are served


def _nan_on_black_frames(runner):
    """Make ``runner``'s forwards put NaN into every output of a frame whose input is all black (what a model that
    overflows on some input gives), leaving the other frames of the batch as they are."""
    plan_of = runner.plan

    class Poisoned:
        def __init__(self, plan):
            self.plan = plan

        def by_index(self, x):
            black = x.flatten(1).amax(dim=1) == 0
            return {k: torch.where(black.view(-1, *[1] * (v.dim() - 1)), torch.full_like(v, float("nan")), v)
                    for k, v in self.plan.by_index(x).items()}

    runner.plan = lambda indices: Poisoned(plan_of(indices))
    return runner


@pytest.mark.parametrize("staged", [False, True])
def test_a_frame_the_codes_cannot_carry_fails_alone(staged):
    frames = [image(1, 64, 64), np.zeros((64, 64, 3), np.uint8), image(2, 64, 64)]
    with in_process_server(_nan_on_black_frames(cpu_runner(IMGSZ, staged=staged)), max_batch=4) as server:
        for pooling in (pb.POOLING_NONE, pb.POOLING_GLOBAL_MAX):
            results = stream(server, frames, dtype=pb.DTYPE_UINT8_AFFINE, pooling=pooling)
            assert [r.status for r in results] == [pb.FRAME_STATUS_OK, pb.FRAME_STATUS_ERROR, pb.FRAME_STATUS_OK]
            message = results[1].error_message
            assert "layer backbone" in message and "NaN" in message and "float32" in message
            assert not results[1].tensors
            floats = stream(server, frames, pooling=pooling)  # float32 carries the NaN as it is
            assert floats[1].status == pb.FRAME_STATUS_OK
            assert np.isnan(wire.tensor_from_proto(floats[1].tensors[0])).all()


# The client: FeatureClient.stream options, results, --save and the command line.


def test_the_client_streams_codes_and_compression(direct_server):
    with FeatureClient(direct_server.address, timeout=60) as client:
        plain = list(client.stream(FRAMES, layers="P3,P4", encoding="raw"))
        coded = list(client.stream(FRAMES, layers="P3,P4", encoding="raw", dtype="uint8"))
        packed = list(client.stream(FRAMES, layers="P3,P4", encoding="raw", dtype="uint8", compression="zstd"))
        floats = list(client.stream(FRAMES, layers="P3,P4", encoding="raw", compression="zstd"))
        one = client.extract(FRAMES[0], layers="P3", dtype="uint8")
    for a, b, c, d in zip(plain, coded, packed, floats, strict=True):
        assert not a.codes and not d.codes
        for name in ("P3", "P4"):
            assert b.features[name].dtype == np.float32 and b.codes[name].codes.dtype == np.uint8
            assert np.array_equal(b.features[name], b.codes[name].dequantize())
            assert_affine_bound(a.features[name], b.codes[name])
            assert np.array_equal(c.features[name], b.features[name])
            assert np.array_equal(c.codes[name].codes, b.codes[name].codes)
            assert np.array_equal(d.features[name], a.features[name])
    assert np.array_equal(one.features["P3"], coded[0].features["P3"])
    with pytest.raises(ValueError, match="zstd"):
        stream_compression("gzip")


@pytest.mark.parametrize("pool", ["none", "avg"])
def test_codes_and_detections_share_a_frame_slot(direct_server, pool):
    with FeatureClient(direct_server.address, timeout=60) as client:
        plain = list(client.stream(FRAMES, layers="P3", encoding="raw", pooling=pool, detect=True))
        coded = list(client.stream(FRAMES, layers="P3", encoding="raw", pooling=pool, detect=True, dtype="uint8"))
    for a, b in zip(plain, coded, strict=True):
        assert b.ok and len(b.detections) == len(a.detections) > 0
        assert np.array_equal(b.detections.boxes, a.detections.boxes)
        assert np.array_equal(b.object_features, a.object_features)
        assert_affine_bound(a.features["P3"], b.codes["P3"])


def test_a_client_without_zstandard_says_which_extra_it_needs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(wire.CodecMissingError, match=r"yolostream\[compress\]"):
        stream_compression("zstd")
    assert stream_compression("none") == pb.COMPRESSION_NONE and stream_compression(None) == 0
    code = cli.main(["stream", "x.png", "--server", "127.0.0.1:1", "--compression", "zstd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compression zstd" in err[0] and "compress" in err[0]


@pytest.mark.parametrize("pool", ["none", "avg"])
def test_a_save_keeps_the_codes_and_loads_them_as_float32(direct_server, tmp_path, pool):
    with FeatureClient(direct_server.address, timeout=60) as client:
        results = list(client.stream(FRAMES, layers="backbone,P3", encoding="raw", dtype="uint8", pooling=pool,
                                     compression="zstd"))
        with FeatureWriter(tmp_path / "save") as writer:
            for r in results:
                writer.append(r)
        with FeatureWriter(tmp_path / "plain") as writer:
            for r in client.stream(FRAMES, layers="P3", encoding="raw", pooling=pool):
                writer.append(r)
    saved = load_features(tmp_path / "save")
    assert saved.meta["version"] == 2 and load_features(tmp_path / "plain").meta["version"] == 1
    for name in ("backbone", "P3"):
        rows = saved[name]
        want = np.stack([r.features[name] for r in results])
        assert isinstance(rows, CodedRows) and rows.dtype == np.float32 and rows.shape == want.shape
        assert len(rows) == 3 and rows.ndim == want.ndim
        assert np.array_equal(np.asarray(rows), want) and np.array_equal(rows[1], want[1])
        assert np.array_equal(rows[1:, 0], want[1:, 0]) and np.array_equal(rows[-1], want[-1])
        layer = saved.meta["layers"][name]
        assert layer["dtype"] == "uint8" and set(layer["affine"]) == {"scales", "offsets"}
        codes = np.load(tmp_path / "save" / layer["file"])
        assert np.array_equal(codes, np.stack([r.codes[name].codes for r in results]))
        scales = np.load(tmp_path / "save" / layer["affine"]["scales"])
        assert scales.dtype == np.float32 and scales.shape == (3, results[0].codes[name].scales.size)
        row = rows.row(2)
        assert np.array_equal(row.codes, results[2].codes[name].codes) and row.axis == results[2].codes[name].axis


def test_an_interrupted_save_of_codes_reads_its_whole_rows(direct_server, tmp_path):
    with FeatureClient(direct_server.address, timeout=60) as client, FeatureWriter(tmp_path / "save") as writer:
        results = list(client.stream(FRAMES, layers="P3", encoding="raw", dtype="uint8"))
        for r in results:
            writer.append(r)
    meta_path = tmp_path / "save" / "meta.json"
    meta = meta_path.read_text().replace('"complete": true', '"complete": false')
    meta_path.write_text(meta)
    offsets = tmp_path / "save" / "P3.offsets.npy"
    with open(offsets, "r+b") as f:  # the last row's offsets never reached the disk
        f.truncate(offsets.stat().st_size - 4)
    saved = load_features(tmp_path / "save")
    assert len(saved["P3"]) == 2 and len(saved.frames) == 2
    assert np.array_equal(np.asarray(saved["P3"]), np.stack([r.features["P3"] for r in results[:2]]))


def test_the_writer_refuses_codes_and_floats_in_one_layer(direct_server, tmp_path):
    with FeatureClient(direct_server.address, timeout=60) as client:
        (coded,) = client.stream(FRAMES[:1], layers="P3", encoding="raw", dtype="uint8")
        (plain,) = client.stream(FRAMES[:1], layers="P3", encoding="raw")
    with FeatureWriter(tmp_path / "mixed") as writer:
        writer.append(coded)
        with pytest.raises(ValueError, match="without 8-bit codes"):
            writer.append(plain)


def test_the_command_line_streams_codes_compressed_and_saves_them(direct_server, tmp_path, capsys):
    import cv2

    for k, frame in enumerate(FRAMES):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), frame)
    save = tmp_path / "features"
    code = cli.main(["stream", str(tmp_path / "*.png"), "--server", direct_server.address, "--layers", "P3", "--dtype",
                     "uint8", "--compression", "zstd", "--encoding", "png", "--save", str(save), "-q"])
    assert code == 0, capsys.readouterr().err
    saved = load_features(save)
    assert saved.meta["options"]["dtype"] == "uint8" and saved.meta["options"]["compression"] == "zstd"
    assert isinstance(saved["P3"], CodedRows) and saved["P3"].shape[0] == 3
    with FeatureClient(direct_server.address, timeout=60) as client:
        want = [r.features["P3"] for r in client.stream(FRAMES, layers="P3", encoding="png", dtype="uint8")]
    assert np.array_equal(np.asarray(saved["P3"]), np.stack(want))


def test_the_record_layout_is_the_codes_behind_their_parameters():
    shape = (3, 2, 2)
    scales, offsets = np.array([1, 2, 3], "<f4"), np.array([-1, -2, -3], "<f4")
    codes = np.arange(12, dtype=np.uint8)
    record = np.concatenate([scales.view(np.uint8), offsets.view(np.uint8), codes])
    assert affine.params(shape) == 3 and affine.params((7,)) == 1
    assert affine.record_bytes(shape) == len(record) == 36 and affine.record_bytes((7,)) == 15
    got = affine.unpack(record, shape)
    assert got[0].tolist() == [1, 2, 3] and got[1].tolist() == [-1, -2, -3]
    assert np.array_equal(got[2], codes.reshape(shape))
    assert affine.coded(got[0]) and not affine.coded(np.array([np.nan], np.float32))
