"""Scale-out: one client over several replicas, health-checked balancing, and streams that survive a replica.

Two kinds of replica. Small in-process gRPC servers (``FakeReplica``: a health service and a FeatureService that
counts its calls) show what gRPC's balancing does, quickly and exactly. Three real ``yolostream serve`` processes,
with TLS and a bearer token, carry the streams whose replica is SIGKILLed or SIGTERMed. Everything listens on
127.0.0.1; every wait is bounded; every process and server started here is stopped.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conftest import ServeProcess, self_signed_cert
from yolostream.client import FeatureClient, FeatureServerError, ResumePolicy
from yolostream.client.resume import HEALTH_SERVICE, channel_target
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

TOKEN = "scale-out-token"
WAIT_S = 15.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S, step: Callable[[], None] = None
               ) -> None:
    """Poll ``condition`` (after running ``step``, which makes progress, e.g. one call) until true or time is up."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        if step is not None:
            step()
        else:
            threading.Event().wait(0.02)


class _CountingService(pb_grpc.FeatureServiceServicer):
    """Counts calls and streams; answers every frame OK with no tensors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = self.streams = self.active = 0

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        with self.lock:
            self.calls += 1
        return pb.ModelInfo(model_name="fake", batching=pb.BatchingInfo(max_in_flight=2))

    def StreamFeatures(self, requests: Iterator[pb.StreamRequest], context: grpc.ServicerContext
                       ) -> Iterator[pb.StreamResponse]:
        next(requests)
        with self.lock:
            self.streams += 1
            self.active += 1
        try:
            for request in requests:
                yield pb.StreamResponse(result=pb.FrameResult(frame_id=request.frame.frame_id,
                                                              status=pb.FRAME_STATUS_OK, batch_size=1))
        finally:
            with self.lock:
                self.active -= 1


class FakeReplica:
    """An in-process gRPC server on 127.0.0.1 with a health service and a counting FeatureService."""

    def __init__(self) -> None:
        self.service = _CountingService()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_FeatureServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()
        self.set_health(SERVING)

    def set_health(self, status: int) -> None:
        for name in ("", HEALTH_SERVICE):
            self.health.set(name, status)


@pytest.fixture()
def fakes() -> Iterator[list[FakeReplica]]:
    replicas = [FakeReplica() for _ in range(3)]
    try:
        yield replicas
    finally:
        for r in replicas:
            r.server.stop(None)


def _calls(replicas: list[FakeReplica]) -> list[int]:
    return [r.service.calls for r in replicas]


def test_the_replica_list_becomes_one_grpc_target():
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///yolostream.cams.svc:50051") == "dns:///yolostream.cams.svc:50051"
    assert channel_target("localhost:50051") == "localhost:50051"
    with pytest.raises(ValueError, match="dns:///"):
        channel_target("cam-a:1,cam-b:2")
    with pytest.raises(ValueError, match="mix"):
        channel_target("127.0.0.1:1,[::1]:2")
    with pytest.raises(ValueError, match="tls_server_name"):
        FeatureClient("127.0.0.1:1,127.0.0.1:2", tls=True)


def test_grpcio_honours_health_check_config(fakes):
    """The proof: with healthCheckConfig a NOT_SERVING replica gets no calls and no streams, and gets them again
    once SERVING; the same round_robin channel without it keeps sending calls to that replica (the control)."""
    a, b, c = fakes
    b.set_health(NOT_SERVING)
    target = channel_target([r.address for r in fakes])
    plain = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    with grpc.insecure_channel(target, options=[("grpc.service_config", plain)]) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        for _ in range(30):
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert b.service.calls > 0, "control: plain round_robin ignores health, so b should have had calls"

    before = _calls(fakes)
    with FeatureClient([r.address for r in fakes], timeout=5) as client:
        for _ in range(30):
            client.model_info()
        calls = [n - m for n, m in zip(_calls(fakes), before)]
        assert calls[1] == 0 and calls[0] >= 10 and calls[2] >= 10, calls
        streams = [client.stream([np.zeros((8, 8, 3), np.uint8)] * 2, max_in_flight=1) for _ in range(6)]
        assert all([r.status for r in s] == ["ok", "ok"] for s in streams)
        assert [r.service.streams for r in fakes] == [3, 0, 3]

        b.set_health(SERVING)  # back: new calls reach it again
        wait_until(lambda: b.service.calls > before[1], "b serves again", step=client.model_info)
        c.set_health(NOT_SERVING)  # a replica that turns unhealthy while the channel is up gets no new streams
        wait_until(lambda: _unvisited(client, c), "c left out after turning NOT_SERVING")
        streams_before = c.service.streams
        for _ in range(8):
            assert [r.status for r in client.stream([np.zeros((8, 8, 3), np.uint8)], max_in_flight=1)] == ["ok"]
        assert c.service.streams == streams_before


def _unvisited(client: FeatureClient, replica: FakeReplica) -> bool:
    """True when six calls in a row pass ``replica`` by (the health update has reached the balancer)."""
    start = replica.service.calls
    for _ in range(6):
        client.model_info()
    return replica.service.calls == start


def test_every_replica_down_ends_the_stream_with_unavailable_within_the_bound(fakes):
    bound = 2.0
    endless = (np.zeros((8, 8, 3), np.uint8) for _ in iter(int, 1))
    with FeatureClient([r.address for r in fakes], resume=ResumePolicy(timeout_s=bound)) as client:
        with pytest.raises(FeatureServerError) as err:
            for result in client.stream(endless, max_in_flight=2):
                if result.frame_id == 20:
                    for r in fakes:
                        r.server.stop(None).wait(5)
                    down_at = time.monotonic()
        elapsed = time.monotonic() - down_at
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "not resumed" in err.value.details, err.value
    assert elapsed < bound + 1.5, f"gave up {elapsed:.1f} s after every replica went down (bound {bound} s)"


@pytest.mark.parametrize("realtime", [False, True], ids=["ordered", "realtime"])
def test_a_stream_moves_off_a_stopped_replica_unless_resuming_is_off(fakes, realtime):
    frames = [np.full((8, 8, 3), k, np.uint8) for k in range(60)]
    with FeatureClient([r.address for r in fakes]) as client:
        stream = client.stream(frames, max_in_flight=2, realtime=realtime)
        got = []
        for result in stream:
            got.append(result)
            if result.frame_id == 20:
                (carrier,) = [r for r in fakes if r.service.active]
                carrier.server.stop(None).wait(5)
        assert [r.frame_id for r in got] == list(range(60)) and all(r.ok for r in got)
        assert stream.resumes >= 1
        survivors = [r for r in fakes if r is not carrier]
        endless = (np.zeros((8, 8, 3), np.uint8) for _ in iter(int, 1))
        with pytest.raises(FeatureServerError) as err:
            for result in client.stream(endless, max_in_flight=2, realtime=realtime, resume=False):
                if result.frame_id == 20:
                    (carrier,) = [r for r in survivors if r.service.active]
                    carrier.server.stop(None).wait(5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "not resumed" not in err.value.details


# ---- real `yolostream serve` replicas, TLS and bearer token ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replicas:
    """Three ``yolostream serve`` processes on 127.0.0.1 (TLS, token, metrics); a dead one restarts on its port."""

    def __init__(self, tmp: Path, count: int = 3) -> None:
        self.tmp = tmp
        self.cert, self.key = self_signed_cert(tmp, "replica", "DNS:localhost,IP:127.0.0.1")
        self.procs: list[ServeProcess] = []
        self.ports: list[int] = []
        self.metrics: list[int] = []
        #: Health statuses the first replica answered before it printed its start-up line (warm-up included).
        self.startup_health: list[int] = []
        first_port = _free_port()
        started = [self._spawn(str(first_port))] + [self._spawn("0") for _ in range(count - 1)]
        self._watch_startup(started[0], first_port)
        for proc in started:
            self._register(proc, len(self.procs))

    def _watch_startup(self, proc: ServeProcess, port: int) -> None:
        """Poll the health of a starting replica until its start-up line (or exit), recording what it answers."""
        credentials = grpc.ssl_channel_credentials(self.cert.read_bytes())
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            deadline = time.monotonic() + 60
            while proc.lines.empty() and proc.proc.poll() is None and time.monotonic() < deadline:
                try:
                    self.startup_health.append(check(health_pb2.HealthCheckRequest(), timeout=0.5).status)
                except grpc.RpcError:
                    threading.Event().wait(0.05)

    def _spawn(self, port: str) -> ServeProcess:
        return ServeProcess(self.tmp, "--port", port, "--imgsz", "64", "--device", "cpu", "--metrics-port", "0",
                            "--max-batch", "2", "--tls-cert", str(self.cert), "--tls-key", str(self.key), "--token", TOKEN,
                            "--grace", "5", "--drain-delay", "0")  # SIGTERM cuts a stream at once: it must resume

    def _register(self, proc: ServeProcess, index: int) -> None:
        proc.wait_serving()
        metrics = int(re.search(r"metrics on :(\d+)/metrics", proc.details).group(1))
        port = int(proc.address.rsplit(":", 1)[1])
        if index == len(self.procs):
            self.procs.append(proc)
            self.ports.append(port)
            self.metrics.append(metrics)
        else:
            self.procs[index], self.metrics[index] = proc, metrics

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def client(self, addresses: list[str] | None = None, **kwargs: object) -> FeatureClient:
        return FeatureClient(addresses or self.addresses, token=TOKEN, tls_ca=self.cert,
                             tls_server_name="localhost", timeout=30, **kwargs)

    def alive(self, index: int) -> bool:
        return self.procs[index].proc.poll() is None

    def revive(self) -> None:
        """Restart every replica that is down, each on its old port (a pod coming back at the same address)."""
        dead = [i for i in range(len(self.procs)) if not self.alive(i)]
        for i in dead:
            self.procs[i].close()
        spawned = {i: self._spawn(str(self.ports[i])) for i in dead}
        for i, proc in spawned.items():
            self._register(proc, i)

    def streams(self) -> list[int]:
        """Streams open on each replica, from its Prometheus metrics (-1 for a replica that is down)."""
        counts = []
        for i, port in enumerate(self.metrics):
            if not self.alive(i):
                counts.append(-1)
                continue
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            counts.append(int(float(re.search(r"^yolostream_streams_active (\S+)$", text, re.M).group(1))))
        return counts

    def carrying(self) -> int:
        """The index of the one replica with an open stream (waiting for the counts to settle)."""
        wait_until(lambda: sorted(max(n, 0) for n in self.streams()) == [0] * (len(self.procs) - 1) + [1],
                   "exactly one replica carrying the stream")
        return self.streams().index(1)

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Replicas]:
    group = Replicas(tmp_path_factory.mktemp("replicas"))
    try:
        yield group
    finally:
        group.close()


def _image(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_a_stream_survives_a_killed_and_a_drained_replica_every_frame_once_in_order_bit_equal(replicas):
    count = 300
    frames = [_image(k) for k in range(count)]
    with replicas.client(replicas.addresses[:1]) as single:
        reference = [r.features["backbone"].copy()
                     for r in single.stream(frames, layers="backbone", max_in_flight=1, encoding="raw")]
    assert len(reference) == count
    got, killed, drained = [], None, None
    with replicas.client() as client:
        stream = client.stream(frames, layers="backbone", max_in_flight=1, encoding="raw")
        for result in stream:
            got.append(result)
            if result.frame_id == 100:
                killed = replicas.carrying()
                replicas.procs[killed].proc.kill()
            elif result.frame_id == 200:
                drained = replicas.carrying()
                replicas.procs[drained].proc.send_signal(signal.SIGTERM)
        resumes = stream.resumes
    assert killed is not None and drained is not None and killed != drained
    assert replicas.procs[drained].proc.wait(timeout=30) == 0, replicas.procs[drained].stderr()
    assert [r.frame_id for r in got] == list(range(count))
    assert all(r.ok for r in got), [(r.frame_id, r.error) for r in got if not r.ok]
    assert all(r.batch_size == 1 for r in got)
    for ref, result in zip(reference, got):
        assert np.array_equal(ref, result.features["backbone"]), result.frame_id
    assert resumes >= 2, resumes
    assert max(r.retries for r in got) <= resumes


def test_replicas_that_come_back_are_used_again_and_twelve_streams_spread(replicas):
    """Runs after the failover test: two replicas are down. A client made then uses them once they are back."""
    dead = [i for i in range(len(replicas.procs)) if not replicas.alive(i)]
    assert dead, "the failover test should have left replicas down"
    release = threading.Event()

    def held() -> Iterator[np.ndarray]:
        yield _image(0)
        release.wait(WAIT_S)

    with replicas.client() as client:
        held_streams = []

        def open_held() -> None:
            stream = client.stream(held(), layers="backbone", max_in_flight=1, encoding="raw")
            assert next(stream).ok
            held_streams.append(stream)

        try:
            open_held()
            replicas.revive()
            wait_until(lambda: all(replicas.streams()[i] > 0 for i in dead),
                       "every restarted replica gets new streams from the same client", step=open_held)
        finally:
            release.set()
            for stream in held_streams:
                assert [r.frame_id for r in stream] == []
        wait_until(lambda: sum(replicas.streams()) == 0, "the held streams closed")

    release.clear()
    with replicas.client() as client:  # a new client opening twelve streams at once: they spread from the start
        held_streams = [client.stream(held(), layers="backbone", max_in_flight=1, encoding="raw") for _ in range(12)]
        try:
            assert all(next(stream).ok for stream in held_streams)
            wait_until(lambda: sum(replicas.streams()) == 12, "twelve streams open")
            spread = replicas.streams()
            assert min(spread) > 0 and max(spread) <= 6, spread
        finally:
            release.set()
            for stream in held_streams:
                stream.close()


def test_token_and_tls_are_required_through_the_replica_list(replicas):
    with FeatureClient(replicas.addresses, tls_ca=replicas.cert, tls_server_name="localhost", timeout=10) as anonymous:
        with pytest.raises(FeatureServerError) as err:
            list(anonymous.stream([_image(0)], max_in_flight=1))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with FeatureClient(replicas.addresses, token=TOKEN, timeout=10) as plaintext:
        with pytest.raises(FeatureServerError) as err:
            plaintext.model_info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with replicas.client() as client:
        assert [r.ok for r in client.stream([_image(0)] * 6, max_in_flight=1)] == [True] * 6


def test_the_command_line_streams_through_the_replica_list(replicas, tmp_path, capsys):
    import cv2

    from yolostream.server import cli

    for k in range(5):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), _image(k))
    secure = ["--tls-ca", str(replicas.cert), "--tls-server-name", "localhost", "--token", TOKEN]
    assert cli.main(["stream", str(tmp_path), "--server", ",".join(replicas.addresses), *secure, "-q",
                     "--resume-timeout", "5"]) == 0
    assert "5 answered" in capsys.readouterr().out
    assert cli.main(["info", "--server", "cam-a:1,cam-b:2"]) == 2
    assert "dns:///" in capsys.readouterr().err
    assert cli.main(["info", "--server", replicas.addresses[0], "--resume-timeout", "0"]) == 2
    assert "--resume-timeout" in capsys.readouterr().err


# ---- server side of issue 10: specified here, implemented in server/ by the front-end/device split -----------------


def test_a_drain_reports_not_serving_and_keeps_taking_frames_for_the_drain_delay(tmp_path):
    server = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--device", "cpu", "--drain-delay", "3",
                          "--grace", "5")
    release = threading.Event()
    try:
        address = server.wait_serving()
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == SERVING
            with FeatureClient(address, resume=False) as client:
                sent = threading.Event()

                def frames() -> Iterator[np.ndarray]:
                    yield _image(0)
                    sent.wait(WAIT_S)
                    yield _image(1)
                    release.wait(WAIT_S)

                stream = client.stream(frames(), layers="backbone", max_in_flight=1, encoding="raw")
                assert next(stream).ok
                server.proc.send_signal(signal.SIGTERM)
                assert next(watch).status == NOT_SERVING
                sent.set()  # sent after NOT_SERVING, within the drain delay: still taken and answered
                second = next(stream)
                assert second.frame_id == 1 and second.ok, second.error
                with pytest.raises(FeatureServerError) as err:  # the stream stays open: the drain then ends it
                    list(stream)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                release.set()
            watch.cancel()
        assert server.proc.wait(timeout=30) == 0
    finally:
        release.set()
        server.close()


def test_max_connection_age_moves_a_long_stream_to_a_new_connection_without_losing_a_frame(tmp_path):
    server = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--device", "cpu", "--max-connection-age", "1",
                          "--max-connection-age-grace", "1")
    try:
        address = server.wait_serving()
        deadline = time.monotonic() + 4.0
        frames = (_image(k % 7) for k in iter(lambda: time.monotonic() < deadline, False))
        with FeatureClient(address) as client:
            stream = client.stream(frames, layers="backbone", max_in_flight=2, encoding="raw")
            results = list(stream)
            assert stream.resumes >= 1, "the connection outlived --max-connection-age plus its grace"
        assert [r.frame_id for r in results] == list(range(len(results))) and all(r.ok for r in results)
    finally:
        server.close()


def test_health_is_not_serving_until_warm_up_is_done(replicas):
    """The replicas' ports were polled with health checks from their start until their start-up line."""
    assert NOT_SERVING in replicas.startup_health, \
        f"the port should answer health checks (NOT_SERVING) while the model loads and warms up: {replicas.startup_health}"
    assert SERVING not in replicas.startup_health[:1]
