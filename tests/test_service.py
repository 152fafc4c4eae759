"""The gRPC service end to end on a loopback server: correctness, ordering, batching, errors and flow control."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np
import pytest

from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

from conftest import cpu_runner, engine_extract, feature_stub, in_process_server

IMGSZ = 64


def make_engine() -> DeviceRunner:
    return cpu_runner(IMGSZ)


@pytest.fixture(scope="module")
def engine() -> DeviceRunner:
    return make_engine()


@pytest.fixture(scope="module")
def server(engine):
    with in_process_server(engine, max_batch=8) as running:
        yield running


@pytest.fixture()
def stub(server):
    with feature_stub(server.address) as feature_service:
        yield feature_service


def image(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def raw_frame(frame_id: int, img: np.ndarray) -> pb.Frame:
    h, w, c = img.shape
    return pb.Frame(frame_id=frame_id, capture_timestamp_us=1000 + frame_id,
                    raw=pb.RawImage(data=img.tobytes(), height=h, width=w, channels=c, format=pb.PIXEL_FORMAT_BGR))


def config(layers=("backbone",), **kw) -> pb.StreamRequest:
    options = pb.FeatureOptions(layers=list(layers), dtype=kw.pop("dtype", 0), pooling=kw.pop("pooling", 0))
    return pb.StreamRequest(config=pb.StreamConfig(options=options, **kw))


def requests(cfg: pb.StreamRequest, frames):
    yield cfg
    for frame in frames:
        yield pb.StreamRequest(frame=frame)


def test_grpc_features_equal_the_engine_bit_for_bit(stub, engine):
    img = image(0)
    want = engine_extract(engine, [img], ["backbone", "P3"])[0]
    result = stub.Extract(pb.ExtractRequest(options=pb.FeatureOptions(layers=["backbone", "P3"]), frame=raw_frame(7, img)))
    assert result.status == pb.FRAME_STATUS_OK and result.frame_id == 7 and result.capture_timestamp_us == 1007
    got = {t.name: wire.tensor_from_proto(t) for t in result.tensors}
    assert [t.name for t in result.tensors] == ["backbone", "P3"]
    assert [(t.layer_index, t.stride) for t in result.tensors] == [(9, 32), (17, 8)]
    for name in ("backbone", "P3"):
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want.features[name])
    lb = wire.letterbox_from_proto(result.letterbox)
    assert lb == want.letterbox.as_dict()
    assert result.batch_size == 1 and result.timings.compute_us > 0


def test_dtypes_and_pooling(stub, engine):
    img = image(1)
    full = engine_extract(engine, [img], ["C4"])[0].features["C4"]
    cases = [
        (pb.DTYPE_FLOAT16, pb.POOLING_NONE, full, 1e-3),
        (pb.DTYPE_BFLOAT16, pb.POOLING_NONE, full, 1e-2),
        (pb.DTYPE_FLOAT32, pb.POOLING_GLOBAL_AVG, full.mean(axis=(1, 2)), 1e-6),
        (pb.DTYPE_FLOAT32, pb.POOLING_GLOBAL_MAX, full.max(axis=(1, 2)), 0),
    ]
    for dtype, pooling, want, tol in cases:
        options = pb.FeatureOptions(layers=["C4"], dtype=dtype, pooling=pooling)
        tensor = stub.Extract(pb.ExtractRequest(options=options, frame=raw_frame(0, img))).tensors[0]
        assert tensor.dtype == dtype and tuple(tensor.shape) == want.shape
        np.testing.assert_allclose(wire.tensor_from_proto(tensor), want, rtol=tol, atol=tol * np.abs(want).max())


def test_jpeg_png_gray_and_rgb_frames(stub, engine):
    img = image(2)
    want = engine_extract(engine, [img], ["backbone"])[0].features["backbone"]
    png = cv2.imencode(".png", img)[1].tobytes()
    rgb = raw_frame(1, img[:, :, ::-1].copy())
    rgb.raw.format = pb.PIXEL_FORMAT_RGB
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    gray_msg = pb.Frame(frame_id=2, raw=pb.RawImage(data=gray.tobytes(), height=48, width=80, channels=1,
                                                     format=pb.PIXEL_FORMAT_GRAY))
    opts = pb.FeatureOptions(layers=["backbone"])
    for frame in (pb.Frame(frame_id=0, encoded=png), rgb):
        got = wire.tensor_from_proto(stub.Extract(pb.ExtractRequest(options=opts, frame=frame)).tensors[0])
        np.testing.assert_array_equal(got, want)
    gray_want = engine_extract(engine, [cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)], ["backbone"])[0].features["backbone"]
    got = wire.tensor_from_proto(stub.Extract(pb.ExtractRequest(options=opts, frame=gray_msg)).tensors[0])
    np.testing.assert_array_equal(got, gray_want)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    result = stub.Extract(pb.ExtractRequest(options=opts, frame=pb.Frame(encoded=jpeg)))
    assert result.status == pb.FRAME_STATUS_OK and tuple(result.tensors[0].shape) == want.shape


def test_model_info(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_name == "yolov5n" and info.random_weights and info.device == "cpu"
    assert info.default_imgsz == IMGSZ and info.stride == 32 and info.batching.max_batch == 8
    assert len(info.layers) == 25 and list(info.layers[9].aliases) == ["backbone", "C5"]
    assert info.layers[24].role == pb.LAYER_ROLE_DETECT and list(info.layers[16].inputs) == [15, 4]
    assert info.limits.max_message_bytes >= 6 * 1024 * 1024


def test_eight_concurrent_streams_get_every_frame_in_order_and_share_batches(server):
    n_streams, n_frames = 8, 12
    barrier = threading.Barrier(n_streams)

    def one_stream(k: int):
        frames = [raw_frame(i, image(100 * k + i)) for i in range(n_frames)]
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            barrier.wait(timeout=30)
            return list(stub.StreamFeatures(requests(config(max_in_flight=4), frames), timeout=120))

    with ThreadPoolExecutor(n_streams) as pool:
        results = list(pool.map(one_stream, range(n_streams)))
    batch_sizes = []
    for responses in results:
        assert [r.result.frame_id for r in responses] == list(range(n_frames))
        assert all(r.result.status == pb.FRAME_STATUS_OK for r in responses)
        assert all(tuple(r.result.tensors[0].shape) == (256, 2, 2) for r in responses)
        batch_sizes += [r.result.batch_size for r in responses]
    assert max(batch_sizes) > 1


@pytest.mark.parametrize(
    "frame, message",
    [
        (pb.Frame(encoded=b"not an image at all"), "not a JPEG or PNG"),
        (pb.Frame(encoded=b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage"), "JPEG"),
        (pb.Frame(raw=pb.RawImage(data=b"\0" * 10, height=4, width=4, channels=3, format=pb.PIXEL_FORMAT_BGR)),
         "needs 48"),
        (pb.Frame(raw=pb.RawImage(data=b"\0" * 48, height=4, width=4, channels=3)), "pixel format"),
        (pb.Frame(raw=pb.RawImage(data=b"", height=100000, width=100000, channels=3, format=pb.PIXEL_FORMAT_BGR)),
         "over the server limit"),
        (pb.Frame(encoded=b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\x00\x01\x00\x00\x00\x01\x00\x00\x08\x02\0\0\0"),
         "over the server limit"),
        (pb.Frame(), "carries no image"),
    ],
    ids=["garbage", "corrupt-jpeg", "raw-size", "no-format", "absurd-raw", "absurd-png", "empty"],
)
def test_a_bad_frame_fails_that_frame_and_the_stream_goes_on(server, engine, frame, message):
    good = image(5)
    want = engine_extract(engine, [good], ["backbone"])[0].features["backbone"]
    frame.frame_id = 1
    frames = [raw_frame(0, good), frame, raw_frame(2, good)]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        with ThreadPoolExecutor(1) as pool:
            healthy = pool.submit(lambda: list(stub.StreamFeatures(
                requests(config(), [raw_frame(i, good) for i in range(6)]), timeout=60)))
            responses = list(stub.StreamFeatures(requests(config(), frames), timeout=60))
            parallel = healthy.result(timeout=60)
    statuses = [r.result.status for r in responses]
    assert statuses == [pb.FRAME_STATUS_OK, pb.FRAME_STATUS_ERROR, pb.FRAME_STATUS_OK]
    assert message in responses[1].result.error_message and not responses[1].result.tensors
    # frames may share a batch with the parallel stream: equal to the batch-1 engine within float rounding
    tol = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(wire.tensor_from_proto(responses[2].result.tensors[0]), want, rtol=0, atol=tol)
    assert [r.result.status for r in parallel] == [pb.FRAME_STATUS_OK] * 6
    np.testing.assert_allclose(wire.tensor_from_proto(parallel[-1].result.tensors[0]), want, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([config(layers=["P9"])], "unknown layer 'P9'"),
        ([config(dtype=9)], "DTYPE_FLOAT32"),
        ([config(pooling=7)], "POOLING_GLOBAL_AVG"),
        ([config(max_in_flight=100000)], "max_in_flight"),
        ([pb.StreamRequest(frame=raw_frame(0, image(0)))], "first message of a stream must be a StreamConfig"),
        ([config(), config()], "exactly one StreamConfig"),
        ([config(layers=["24"])], "Detect"),
    ],
    ids=["unknown-layer", "bad-dtype", "bad-pooling", "in-flight", "frame-first", "second-config", "detect"],
)
def test_an_invalid_stream_ends_with_invalid_argument(stub, engine, messages, needle):
    good = image(6)
    want = engine_extract(engine, [good], ["backbone"])[0].features["backbone"]
    with ThreadPoolExecutor(1) as pool:
        healthy = pool.submit(lambda: list(stub.StreamFeatures(
            requests(config(), [raw_frame(i, good) for i in range(6)]), timeout=60)))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamFeatures(iter(messages), timeout=30))
        parallel = healthy.result(timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert [r.result.status for r in parallel] == [pb.FRAME_STATUS_OK] * 6
    np.testing.assert_allclose(wire.tensor_from_proto(parallel[-1].result.tensors[0]), want,
                               rtol=0, atol=1e-4 * np.abs(want).max())


def test_unary_extract_rejects_bad_options(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Extract(pb.ExtractRequest(options=pb.FeatureOptions(layers=["nope"]), frame=raw_frame(0, image(0))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "backbone" in err.value.details()
    result = stub.Extract(pb.ExtractRequest(frame=pb.Frame(encoded=b"xx")))
    assert result.status == pb.FRAME_STATUS_ERROR


class SlowEngine:
    """Wraps an engine so every batch takes at least ``delay`` seconds: a model slower than the camera."""

    def __init__(self, engine: DeviceRunner, delay: float) -> None:
        self._engine, self._delay = engine, delay
        self.max_batch_seen = 0
        self.max_queue_seen = 0
        self.batcher = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def launch(self, images, keys):
        self.max_batch_seen = max(self.max_batch_seen, len(images))
        if self.batcher is not None:
            self.max_queue_seen = max(self.max_queue_seen, self.batcher.queued)
        time.sleep(self._delay)
        return self._engine.launch(images, keys)


def test_flood_is_pushed_back_and_memory_stays_bounded(engine):
    psutil = pytest.importorskip("psutil")
    slow = SlowEngine(engine, delay=0.01)
    img = image(9, 240, 320)
    n = 400
    with ServerThread(slow, ServerSettings(port=0, max_batch=4)) as srv:
        slow.batcher = srv.batcher
        process = psutil.Process()
        rss_before = process.memory_info().rss
        sent = []

        def frames():
            for i in range(n):
                sent.append(i)
                yield raw_frame(i, img)

        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            count = 0
            for response in stub.StreamFeatures(requests(config(max_in_flight=2), frames()), timeout=120):
                assert response.result.frame_id == count and response.result.status == pb.FRAME_STATUS_OK
                # flow control: the client cannot get far ahead of what the server has answered
                assert len(sent) - count <= 64
                count += 1
        assert count == n
        assert slow.max_queue_seen <= 2 and slow.max_batch_seen <= 2
        assert process.memory_info().rss - rss_before < 150 * 2**20


def test_realtime_flood_accounts_for_every_frame(engine):
    slow = SlowEngine(engine, delay=0.02)
    n = 200
    with ServerThread(slow, ServerSettings(port=0, max_batch=4)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            frames = (raw_frame(i, image(i % 7)) for i in range(n))
            responses = list(stub.StreamFeatures(requests(config(max_in_flight=1, realtime=True), frames), timeout=120))
    ids = [r.result.frame_id for r in responses]
    statuses = [r.result.status for r in responses]
    assert ids == list(range(n))
    assert set(statuses) <= {pb.FRAME_STATUS_OK, pb.FRAME_STATUS_DROPPED}
    assert statuses.count(pb.FRAME_STATUS_DROPPED) > 0 and statuses[-1] == pb.FRAME_STATUS_OK
    assert "realtime" in next(r.result.error_message for r in responses if r.result.status == pb.FRAME_STATUS_DROPPED)


@pytest.mark.parametrize("realtime", [False, True], ids=["flow-controlled", "realtime"])
def test_a_client_that_disconnects_releases_everything(engine, realtime):
    slow = SlowEngine(engine, delay=0.02)
    with ServerThread(slow, ServerSettings(port=0, max_batch=2)) as srv:
        service = srv.server.service
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            in_flight = 1 if realtime else 8  # realtime: a newer frame is parked while one computes
            frames = (raw_frame(i, image(0)) for i in range(10**6))
            call = stub.StreamFeatures(requests(config(max_in_flight=in_flight, realtime=realtime), frames))
            next(call)
            assert service.active_streams == 1
            call.cancel()
        assert service.wait_streams(0, timeout=30)
        assert srv.batcher.queued == 0
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            result = stub.Extract(pb.ExtractRequest(frame=raw_frame(3, image(0))), timeout=30)
            assert result.status == pb.FRAME_STATUS_OK


def test_drain_answers_accepted_frames_and_ends_idle_streams(engine):
    release = threading.Event()

    def idle_after_three():
        yield config(max_in_flight=4)
        for i in range(3):
            yield pb.StreamRequest(frame=raw_frame(i, image(i)))
        release.wait(timeout=60)

    srv = ServerThread(engine, ServerSettings(port=0, grace=60)).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            call = stub.StreamFeatures(idle_after_three())
            answered = [next(call).result for _ in range(3)]
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60})
            stopper.start()
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            release.set()
            stopper.join(timeout=60)
            assert not stopper.is_alive()
    finally:
        release.set()
        srv.stop()
    assert [r.frame_id for r in answered] == [0, 1, 2]
    assert all(r.status == pb.FRAME_STATUS_OK for r in answered)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "every frame it accepted has been answered" in err.value.details()


def test_an_open_health_watch_does_not_hold_the_drain(engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = ServerThread(engine, ServerSettings(port=0, grace=120)).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 120})
            stopper.start()
            statuses = []
            with pytest.raises(grpc.RpcError) as err:
                for update in watch:
                    statuses.append(update.status)
            stopper.join(timeout=60)
            assert not stopper.is_alive(), "stop waited for the health Watch instead of cancelling it"
    finally:
        srv.stop()
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_a_reply_over_the_message_limit_fails_its_frame_not_the_stream(engine):
    # layer 0 of a 64x64 input is 16x32x32 float32 = 65,536 bytes; the limit leaves ~34 KB for tensors
    with ServerThread(engine, ServerSettings(port=0, max_message_bytes=100_000)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            responses = list(stub.StreamFeatures(requests(config(layers=["0"]), [raw_frame(i, image(i)) for i in range(3)]),
                                                 timeout=60))
            pooled = stub.Extract(pb.ExtractRequest(options=pb.FeatureOptions(layers=["0"], pooling=pb.POOLING_GLOBAL_AVG),
                                                    frame=raw_frame(9, image(9))), timeout=30)
    assert [r.result.status for r in responses] == [pb.FRAME_STATUS_ERROR] * 3
    assert "65,536 bytes, over the server's message limit" in responses[0].result.error_message
    assert pooled.status == pb.FRAME_STATUS_OK and tuple(pooled.tensors[0].shape) == (16,)


@pytest.mark.parametrize("h, w", [(1, 2000), (2000, 1)])
def test_a_frame_thinner_than_a_pixel_after_resizing_still_works(stub, h, w):
    result = stub.Extract(pb.ExtractRequest(frame=raw_frame(0, image(3, h, w))), timeout=30)
    assert result.status == pb.FRAME_STATUS_OK, result.error_message
    assert result.letterbox.resized_height >= 1 and result.letterbox.resized_width >= 1
