"""Bearer-token auth and TLS on an in-process server (``ServerThread``) with the built-in model at 64 px."""

from __future__ import annotations

from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import feature_stub, in_process_server, self_signed_cert
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

from conftest import cpu_runner

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def engine() -> DeviceRunner:
    return cpu_runner(64)


def _stream_requests(frames: int = 2) -> Iterator[pb.StreamRequest]:
    yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"])))
    for k in range(frames):
        data = np.full((32, 48, 3), 10 * k, np.uint8).tobytes()
        yield pb.StreamRequest(frame=pb.Frame(frame_id=k, raw=pb.RawImage(
            data=data, height=32, width=48, channels=3, format=pb.PIXEL_FORMAT_BGR)))


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.fixture(scope="module")
def token_server(engine) -> Iterator[ServerThread]:
    with in_process_server(engine, token=TOKEN) as server:
        yield server


@pytest.fixture()
def stub(token_server) -> Iterator[pb_grpc.FeatureServiceStub]:
    with feature_stub(token_server.address) as feature_service:
        yield feature_service


@pytest.mark.parametrize("metadata", [None, _auth("wrong"), (("authorization", TOKEN),)],
                         ids=["no-token", "wrong-token", "not-bearer"])
def test_calls_without_the_right_token_are_unauthenticated(stub, metadata):
    info = lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)  # noqa: E731
    stream = lambda: list(stub.StreamFeatures(_stream_requests(), metadata=metadata, timeout=10))  # noqa: E731
    assert _code(info) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(stream) == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_open_without_the_token(token_server):
    """Orchestrators' gRPC probes cannot send headers; health status reveals nothing."""
    with grpc.insecure_channel(token_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        info = pb_grpc.FeatureServiceStub(channel).GetModelInfo
        assert _code(lambda: info(pb.GetModelInfoRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_works_for_unary_and_stream(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_auth(TOKEN), timeout=10)
    assert info.model_name == "yolov5n" and info.default_imgsz == 64
    responses = list(stub.StreamFeatures(_stream_requests(3), metadata=_auth(TOKEN), timeout=30))
    assert [r.result.frame_id for r in responses] == [0, 1, 2]
    assert all(r.result.status == pb.FRAME_STATUS_OK and r.result.tensors for r in responses)


@pytest.fixture(scope="module")
def tls_server(engine, tmp_path_factory) -> Iterator[tuple[ServerThread, bytes, bytes]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_cert(tmp, "server", "DNS:localhost,IP:127.0.0.1")
    other_cert, _ = self_signed_cert(tmp, "other", "DNS:localhost,IP:127.0.0.1")
    settings = ServerSettings(port=0, tls_cert=str(cert), tls_key=str(key), token=TOKEN)
    with ServerThread(engine, settings) as server:
        yield server, cert.read_bytes(), other_cert.read_bytes()


def test_tls_with_the_server_certificate_works(tls_server):
    server, cert, _ = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    for target in (f"localhost:{server.port}", server.address):
        with grpc.secure_channel(target, credentials) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_auth(TOKEN), timeout=10)
            assert info.model_name == "yolov5n"
            assert _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED


def test_tls_port_refuses_plaintext_and_untrusted_certificates(tls_server):
    server, _, other_cert = tls_server
    untrusted = grpc.ssl_channel_credentials(root_certificates=other_cert)
    for channel in (grpc.insecure_channel(server.address), grpc.secure_channel(server.address, untrusted)):
        with channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            call = lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_auth(TOKEN), timeout=10)  # noqa: E731
            assert _code(call) == grpc.StatusCode.UNAVAILABLE
