"""The staged (CUDA) hot path, exercised on CPU: staging, size buckets, grouped copies, deferred collect."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.server.model.loader import load_model
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

from conftest import cpu_runner, engine_extract

KEYS = [(4, "none", "float32"), (9, "avg", "float16"), (17, "max", "bfloat16"), (9, "none", "float16")]


@pytest.fixture(scope="module")
def engines():
    loaded = load_model()
    direct = DeviceRunner(loaded, device="cpu", imgsz=64)
    staged = cpu_runner(64, staged=True)
    staged.warmup(max_batch=6)
    return direct, staged


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(n)]


def _as_float(array, key):
    return wire.bfloat16_bits_to_float32(array) if key[2] == "bfloat16" else array.astype(np.float32)


def test_buckets_pad_batches_to_warmed_up_sizes(engines):
    _, staged = engines
    assert staged.buckets == (1, 2, 4, 6)
    assert [staged.bucket(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 4, 6, 6, 7]


@pytest.mark.parametrize("n", [1, 3, 6])
def test_staged_path_equals_the_direct_path(engines, n):
    direct, staged = engines
    images = _images(n, seed=n)
    want = direct.launch(images, KEYS)
    pending = staged.launch(images, KEYS)
    assert want.ready and not pending.ready
    got = staged.collect(pending)
    assert got.ready and got.size == n and got.compute_us >= 0
    for key in KEYS:
        a, b = _as_float(got.host[key], key), _as_float(want.host[key], key)
        assert got.host[key].dtype == want.host[key].dtype and a.shape == b.shape and a.shape[0] == n
        tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}[key[2]] * np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_staging_buffers_are_reused_without_corrupting_earlier_results(engines):
    _, staged = engines
    first_images, second_images = _images(3, seed=10), _images(3, seed=11)
    first = staged.launch(first_images, KEYS[:1])
    second = staged.launch(second_images, KEYS[:1])
    a, b = staged.collect(first).host[KEYS[0]], staged.collect(second).host[KEYS[0]]
    again = staged.collect(staged.launch(first_images, KEYS[:1])).host[KEYS[0]]
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b)


def test_pipelined_server_on_the_staged_path(engines):
    direct, staged = engines
    frames = [np.random.default_rng(k).integers(0, 256, (48, 80, 3), dtype=np.uint8) for k in range(10)]
    want = engine_extract(direct, frames, ["P4"])
    with ServerThread(staged, ServerSettings(port=0, max_batch=6)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)

            def requests():
                yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["P4"]), max_in_flight=8))
                for k, f in enumerate(frames):
                    yield pb.StreamRequest(frame=pb.Frame(frame_id=k, raw=pb.RawImage(
                        data=f.tobytes(), height=48, width=80, channels=3, format=pb.PIXEL_FORMAT_BGR)))

            responses = list(stub.StreamFeatures(requests(), timeout=60))
    assert [r.result.frame_id for r in responses] == list(range(10))
    for r, w in zip(responses, want):
        got = wire.tensor_from_proto(r.result.tensors[0])
        np.testing.assert_allclose(got, w.features["P4"], rtol=0, atol=1e-4 * np.abs(w.features["P4"]).max())


def test_two_workers_sharing_staging_buffers_never_mix_frames():
    """Several streams of distinct frames through two workers on the staged path: every answer is its own frame's."""
    from concurrent.futures import ThreadPoolExecutor

    direct = cpu_runner(64)
    staged = cpu_runner(64, staged=True)
    frames = {(k, i): np.random.default_rng(100 * k + i).integers(0, 256, (48, 80, 3), dtype=np.uint8)
              for k in range(4) for i in range(15)}
    want = dict(zip(frames, engine_extract(direct, list(frames.values()), ["C4"])))
    with ServerThread(staged, ServerSettings(port=0, max_batch=4, workers=2)) as srv:
        def one_stream(k):
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.FeatureServiceStub(channel)

                def requests():
                    yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["C4"]),
                                                                  max_in_flight=8))
                    for i in range(15):
                        f = frames[(k, i)]
                        yield pb.StreamRequest(frame=pb.Frame(frame_id=i, raw=pb.RawImage(
                            data=f.tobytes(), height=48, width=80, channels=3, format=pb.PIXEL_FORMAT_BGR)))

                return list(stub.StreamFeatures(requests(), timeout=60))

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one_stream, range(4)))
    assert srv.batcher.config.workers == 2
    for k, responses in enumerate(results):
        for i, r in enumerate(responses):
            expected = want[(k, i)].features["C4"]
            got = wire.tensor_from_proto(r.result.tensors[0])
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max(), err_msg=f"{k},{i}")
