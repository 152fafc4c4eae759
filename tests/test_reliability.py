"""A bad-input matrix against one real ``yolostream serve`` process, one case per row of each kind.

Kinds: frames, configs, wire garbage, abuse, security, limits and faults. After every case the server must still
report SERVING on the standard health service and still give a healthy stream exactly the reference features it
gave at start-up, and no stream may be left open (the ``yolostream_streams_active`` metric returns to 0). Every
wait has a deadline; the server listens on 127.0.0.1 on ports it picks itself.
"""

from __future__ import annotations

import concurrent.futures
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from typing import Callable, Iterable, Iterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

from conftest import ServeProcess, raw_frame, serve_env

TOKEN = "matrix-token-5a1f"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_FRAME_BYTES = 150_000
MAX_PIXELS = 100_000
MAX_MESSAGE_BYTES = 1 << 20
MAX_IN_FLIGHT_LIMIT = 8
CALL_TIMEOUT = 30.0
REFERENCE_LAYERS = ("backbone", "P3")


class Server:
    """The server under test, with the connection, stubs and reference answers the cases share."""

    def __init__(self, process: ServeProcess) -> None:
        self.process = process
        self.address = process.address
        metrics = re.search(r"metrics on :(\d+)/metrics", process.details)
        assert metrics, process.details
        self.metrics_url = f"http://127.0.0.1:{metrics.group(1)}/metrics"
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=CALL_TIMEOUT)
        self.stub = pb_grpc.FeatureServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reference = self.healthy_features()

    def stream(self, requests: Iterable[pb.StreamRequest], timeout: float = CALL_TIMEOUT) -> list[pb.FrameResult]:
        return [r.result for r in self.stub.StreamFeatures(iter(requests), metadata=AUTH, timeout=timeout)]

    def extract(self, frame: pb.Frame, **options: object) -> pb.FrameResult:
        request = pb.ExtractRequest(options=pb.FeatureOptions(**options), frame=frame)
        return self.stub.Extract(request, metadata=AUTH, timeout=CALL_TIMEOUT)

    def healthy_features(self) -> list[list[bytes]]:
        """The tensors of two fixed frames, one at a time (batch size 1, so they are reproducible bit for bit)."""
        results = self.stream([config(max_in_flight=1), frame_request(0), frame_request(1)])
        assert [r.status for r in results] == [pb.FRAME_STATUS_OK] * 2, [r.error_message for r in results]
        assert all(r.batch_size == 1 for r in results)
        return [[t.data for t in r.tensors] for r in results]

    def streams_active(self) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        found = re.search(r"^yolostream_streams_active (\S+)$", text, re.M)
        assert found, "no yolostream_streams_active metric"
        return float(found.group(1))

    def assert_healthy(self) -> None:
        status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: self.streams_active() == 0, 15, "every stream of the case to be released")
        assert self.healthy_features() == self.reference, "a healthy stream no longer gets the reference features"
        assert self.process.proc.poll() is None


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def frame_request(k: int) -> pb.StreamRequest:
    return pb.StreamRequest(frame=raw_frame(k))


def config(max_in_flight: int = 4, realtime: bool = False, **options: object) -> pb.StreamRequest:
    options.setdefault("layers", list(REFERENCE_LAYERS))
    return pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(**options), max_in_flight=max_in_flight,
                                                   realtime=realtime))


def encoded(k: int, data: bytes) -> pb.Frame:
    return pb.Frame(frame_id=k, encoded=data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) claims ``width``x``height``."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``x``height`` (a decompression bomb's first bytes)."""
    small = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    return small[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + small[24:]


def invalid_argument(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    return err.value.details()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("reliability")
    process = ServeProcess(tmp, "--port", "0", "--metrics-port", "0", "--device", "cpu", "--imgsz", "64",
                           "--max-batch", "4", "--max-frame-bytes", str(MAX_FRAME_BYTES), "--max-pixels",
                           str(MAX_PIXELS), "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-in-flight-limit",
                           str(MAX_IN_FLIGHT_LIMIT), "--grace", "5", env=serve_env(YOLOSTREAM_TOKEN=TOKEN))
    try:
        process.wait_serving()
        running = Server(process)
        yield running
        running.channel.close()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=30) == 0, process.stderr()
    finally:
        process.close()


@pytest.fixture(autouse=True)
def still_healthy(server: Server) -> Iterator[None]:
    yield
    server.assert_healthy()


# --------------------------------------------------------------------------------------------------------
# frames: each bad frame fails alone; the frames around it in the same stream are answered as usual


BAD_FRAMES = {
    "corrupt JPEG": encoded(0, b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x30\x00\x40\x03" + b"\x00" * 500),
    "not an image": encoded(0, b"GIF89a" + b"\x00" * 100),
    "empty encoded": encoded(0, b""),
    "no data": pb.Frame(),
    "truncated PNG header": encoded(0, b"\x89PNG\r\n\x1a\n\x00\x00"),
    "raw size mismatch": pb.Frame(raw=pb.RawImage(data=b"\x00" * 10, height=48, width=64, channels=3,
                                                  format=pb.PIXEL_FORMAT_BGR)),
    "raw without format": pb.Frame(raw=pb.RawImage(data=b"\x00" * 12, height=2, width=2, channels=3)),
    "raw channel mismatch": pb.Frame(raw=pb.RawImage(data=b"\x00" * 4, height=2, width=2, channels=3,
                                                     format=pb.PIXEL_FORMAT_GRAY)),
    "raw zero size": pb.Frame(raw=pb.RawImage(data=b"", height=0, width=5, channels=3, format=pb.PIXEL_FORMAT_BGR)),
}


def test_frames_bad_ones_fail_alone_and_the_stream_goes_on(server):
    requests = [config(max_in_flight=1)]  # one frame at a time: each good frame runs alone, bit-exact
    for k, bad in enumerate(BAD_FRAMES.values()):
        requests.extend([pb.StreamRequest(frame=bad), frame_request(0)])
        requests[-2].frame.frame_id, requests[-1].frame.frame_id = 2 * k, 2 * k + 1
    results = server.stream(requests)
    assert [r.frame_id for r in results] == list(range(2 * len(BAD_FRAMES)))
    for name, bad, good in zip(BAD_FRAMES, results[0::2], results[1::2]):
        assert bad.status == pb.FRAME_STATUS_ERROR and bad.error_message, name
        assert good.status == pb.FRAME_STATUS_OK and [t.data for t in good.tensors] == server.reference[0], name


def test_frames_bad_ones_through_the_unary_call(server):
    for name, bad in BAD_FRAMES.items():
        result = server.extract(bad, layers=list(REFERENCE_LAYERS))
        assert result.status == pb.FRAME_STATUS_ERROR and result.error_message, name


# --------------------------------------------------------------------------------------------------------
# configs: an invalid config ends its stream with INVALID_ARGUMENT and a short, useful message


def test_configs_an_unknown_layer_name_of_64_kb_is_quoted_short(server):
    """The details travel in a trailer: echoed whole, they exceed gRPC's header limit (RESOURCE_EXHAUSTED)."""
    name = "L" * 65536
    details = invalid_argument(lambda: server.stream([config(layers=[name]), frame_request(0)]))
    assert "unknown layer 'LLLL" in details and "65,536 characters" in details and len(details) < 1000, details
    details = invalid_argument(lambda: server.extract(raw_frame(0), layers=[name]))
    assert "unknown layer" in details and len(details) < 1000


@pytest.mark.parametrize("requests, needle", [
    ([config(dtype=99)], "invalid dtype 99"),
    ([config(pooling=7)], "invalid pooling 7"),
    ([config(letterbox=5)], "invalid letterbox policy 5"),
    ([config(imgsz=100_000)], "imgsz 100000 is out of range"),
    ([config(layers=["24"])], "Detect head"),
    ([config(max_in_flight=MAX_IN_FLIGHT_LIMIT + 1)], f"choose 1..{MAX_IN_FLIGHT_LIMIT}"),
    ([frame_request(0)], "first message of a stream must be a StreamConfig"),
    ([config(), frame_request(0), config()], "got a second one"),
    ([config(), pb.StreamRequest()], "empty StreamRequest"),
], ids=["dtype", "pooling", "letterbox", "imgsz", "detect-layer", "max-in-flight", "frame-first", "second-config",
        "empty-request"])
def test_configs_invalid_ones_end_the_stream_with_invalid_argument(server, requests, needle):
    details = invalid_argument(lambda: server.stream(requests))
    assert needle in details, details


# --------------------------------------------------------------------------------------------------------
# wire: bytes that are not gRPC, or not our messages


def test_wire_garbage_on_the_port_is_dropped(server):
    host, port = server.address.rsplit(":", 1)
    for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
                    np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(65536):  # the server answers what it can, then closes; never hangs
                pass


#: What grpc.aio answers a request it cannot parse (it reports the DecodeError as UNKNOWN).
UNPARSABLE = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)


def test_wire_undecodable_messages_and_unknown_methods_fail_the_call(server):
    garbage = server.channel.unary_unary("/yolostream.v1.FeatureService/Extract")
    with pytest.raises(grpc.RpcError) as err:
        garbage(b"\xff\xff\xff\xff\x0f", metadata=AUTH, timeout=CALL_TIMEOUT)
    assert err.value.code() in UNPARSABLE and "pars" in err.value.details(), (err.value.code(), err.value.details())
    stream = server.channel.stream_stream("/yolostream.v1.FeatureService/StreamFeatures")
    with pytest.raises(grpc.RpcError) as err:
        list(stream(iter([b"\x0a\xff\xff\xff"]), metadata=AUTH, timeout=CALL_TIMEOUT))
    assert err.value.code() in UNPARSABLE, (err.value.code(), err.value.details())
    unknown = server.channel.unary_unary("/yolostream.v1.FeatureService/Nope")
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"", metadata=AUTH, timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------------------------------------
# abuse: many streams at once, abandoned mid-way; a realtime flood; a burst of unary calls


def test_abuse_many_streams_abandoned_mid_stream(server):
    calls = []
    for k in range(24):
        call = server.stub.StreamFeatures(iter([config(max_in_flight=2), *(frame_request(j) for j in range(4))]),
                                          metadata=AUTH, timeout=CALL_TIMEOUT)
        calls.append(call)
    for k, call in enumerate(calls):
        if k % 2:
            assert next(call).result.status == pb.FRAME_STATUS_OK  # half read one answer first
        call.cancel()


def test_abuse_a_realtime_flood_accounts_for_every_frame(server):
    frames = 120
    results = server.stream([config(max_in_flight=1, realtime=True), *(frame_request(k % 2) for k in range(frames))])
    assert [r.frame_id for r in results] == [k % 2 for k in range(frames)]
    assert {r.status for r in results} <= {pb.FRAME_STATUS_OK, pb.FRAME_STATUS_DROPPED}
    assert results[-1].status == pb.FRAME_STATUS_OK  # the newest frame is never the one dropped


def test_abuse_a_burst_of_unary_calls(server):
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda k: server.extract(raw_frame(k % 2), layers=list(REFERENCE_LAYERS)),
                                range(48)))
    assert all(r.status == pb.FRAME_STATUS_OK for r in results)
    for result in results:
        if result.batch_size == 1:  # batched frames may differ in float rounding; alone they are exact
            assert [t.data for t in result.tensors] == server.reference[result.frame_id]


# --------------------------------------------------------------------------------------------------------
# security: every call but health needs the token; a forged or oversized header changes nothing


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", "Bearer " + "x" * 6000),)],
                         ids=["none", "wrong", "not-bearer", "oversized"])
def test_security_calls_without_the_token_are_refused(server, metadata):
    for call in (lambda: server.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10),
                 lambda: list(server.stub.StreamFeatures(iter([config(), frame_request(0)]), metadata=metadata,
                                                         timeout=10))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (err.value.code(), err.value.details())


# --------------------------------------------------------------------------------------------------------
# limits: each documented limit, crossed on the stream and on the unary call, gets its documented answer


def _noise_png(side: int) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8),
                        [cv2.IMWRITE_PNG_COMPRESSION, 0])[1].tobytes()


def _raw(h: int, w: int, channels: int = 3, extra: int = 0) -> pb.Frame:
    frame = raw_frame(0, h, w, channels)
    frame.raw.data += b"\x00" * extra
    return frame


LIMIT_CASES = {
    # name: (frame, feature options, the answer's words)
    "raw data over max_frame_bytes": (_raw(4, 4, extra=MAX_FRAME_BYTES), {}, f"limit of {MAX_FRAME_BYTES} bytes"),
    "raw size over max_frame_bytes": (_raw(250, 250), {}, f"limit of {MAX_FRAME_BYTES} bytes"),
    "encoded over max_frame_bytes": (encoded(0, _noise_png(250)), {}, f"limit of {MAX_FRAME_BYTES} bytes"),
    "raw over max_pixels": (_raw(400, 300, channels=1), {}, f"limit of {MAX_PIXELS} pixels"),
    "PNG header over max_pixels": (encoded(0, png_claiming(400, 400)), {}, f"limit of {MAX_PIXELS} pixels"),
    "JPEG header over 16384 per side": (encoded(0, jpeg_claiming(20000, 1)), {}, "16384 per side"),
    "raw over 16384 per side": (_raw(1, 20000, channels=1), {}, "16384 per side"),
    "reply over max_message_bytes": (raw_frame(0), {"layers": ["0"], "imgsz": 640}, "over the server's message limit"),
}


@pytest.mark.parametrize("path", ["stream", "unary"])
@pytest.mark.parametrize("name", list(LIMIT_CASES))
def test_limits_each_crossing_fails_that_frame_with_its_reason(server, name, path):
    frame, options, words = LIMIT_CASES[name]
    options = {"layers": list(REFERENCE_LAYERS), **options}
    if path == "stream":
        results = server.stream([config(**options), pb.StreamRequest(frame=frame), frame_request(1)])
        follow = results[1]  # the stream goes on; a limit that the options cross holds for the next frame too
        if LIMIT_CASES[name][1]:
            assert follow.status == pb.FRAME_STATUS_ERROR and words in follow.error_message
        else:
            assert follow.status == pb.FRAME_STATUS_OK, follow.error_message
        result = results[0]
    else:
        result = server.extract(frame, **options)
    assert result.status == pb.FRAME_STATUS_ERROR and words in result.error_message, result.error_message


@pytest.mark.parametrize("path", ["stream", "unary"])
def test_limits_a_message_over_max_message_bytes_is_resource_exhausted(server, path):
    frame = encoded(0, b"\xff\xd8" + b"\x00" * MAX_MESSAGE_BYTES)
    with pytest.raises(grpc.RpcError) as err:
        if path == "stream":
            server.stream([config(), pb.StreamRequest(frame=frame)])
        else:
            server.extract(frame)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.value.code(), err.value.details())


def test_limits_the_server_reports_the_limits_it_enforces(server):
    limits = server.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10).limits
    assert (limits.max_pixels, limits.max_frame_bytes, limits.max_message_bytes) == \
        (MAX_PIXELS, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES)


# --------------------------------------------------------------------------------------------------------
# faults: clients that die, vanish, time out or fail mid-stream


CLIENT = textwrap.dedent("""
    import sys, grpc
    from yolostream.v1 import feature_service_pb2 as pb, feature_service_pb2_grpc as pb_grpc

    def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"])))
        k = 0
        while True:
            yield pb.StreamRequest(frame=pb.Frame(frame_id=k, raw=pb.RawImage(
                data=bytes(48 * 64 * 3), height=48, width=64, channels=3, format=pb.PIXEL_FORMAT_BGR)))
            k += 1

    channel = grpc.insecure_channel(sys.argv[1])
    metadata = (("authorization", "Bearer " + sys.argv[2]),)
    for response in pb_grpc.FeatureServiceStub(channel).StreamFeatures(requests(), metadata=metadata):
        print(response.result.status, flush=True)
""")


def test_faults_a_client_process_killed_mid_stream(server):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.address, TOKEN], stdout=subprocess.PIPE,
                              env=serve_env(), text=True)
    try:
        ready, _, _ = select.select([client.stdout], [], [], CALL_TIMEOUT)
        assert ready and client.stdout.readline().strip() == str(pb.FRAME_STATUS_OK)
        wait_until(lambda: server.streams_active() == 1, 10, "the client's stream to be counted")
    finally:
        client.kill()
        client.wait(timeout=30)
        client.stdout.close()


def test_faults_a_channel_closed_mid_stream(server):
    channel = grpc.insecure_channel(server.address)
    call = pb_grpc.FeatureServiceStub(channel).StreamFeatures(
        iter([config(max_in_flight=2), *(frame_request(k % 2) for k in range(50))]), metadata=AUTH,
        timeout=CALL_TIMEOUT)
    assert next(call).result.status == pb.FRAME_STATUS_OK
    channel.close()


def test_faults_a_deadline_that_expires_mid_stream(server):
    started = threading.Event()  # gRPC may ask for the third request before ``call`` below is assigned

    def stalled() -> Iterator[pb.StreamRequest]:
        yield config()
        yield frame_request(0)
        started.wait(CALL_TIMEOUT)
        wait_until(lambda: not call.is_active(), CALL_TIMEOUT, "the deadline to end the call")

    call = server.stub.StreamFeatures(stalled(), metadata=AUTH, timeout=1.0)
    started.set()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_faults_a_request_iterator_that_fails_mid_stream(server):
    def failing() -> Iterator[pb.StreamRequest]:
        yield config()
        yield frame_request(0)
        raise RuntimeError("the camera fell off")

    with pytest.raises(grpc.RpcError) as err:
        server.stream(failing())
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN), err.value.code()


# --------------------------------------------------------------------------------------------------------
# last: what the whole matrix left in the server's log


def test_security_the_log_never_holds_the_token_or_a_whole_hostile_name(server):
    log = server.process.stderr()
    assert TOKEN not in log
    assert "L" * 200 not in log and "x" * 200 not in log


def test_the_log_has_no_traceback_for_anything_a_client_sent(server):
    log = server.process.stderr()
    assert "Traceback" not in log, log[-3000:]
