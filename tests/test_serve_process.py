"""``yolostream serve`` as a real process: start-up line, config file, start-up errors, reflection, SIGTERM drain."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

from conftest import ServeProcess, assert_one_line_error, run_commands
from conftest import grpc_channel as _channel, raw_frame as _frame, serve_env as _env, stream_config as _config


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> Iterator[ServeProcess]:
    """One server started from a YAML file (dashes and underscores), with one flag overriding the file."""
    tmp = tmp_path_factory.mktemp("configured")
    (tmp / "server.yaml").write_text("port: 50051\nimgsz: 64\nmax_batch: 3\nmax-delay-ms: 1.5\ndevice: cpu\n"
                                     "layers: [P3, backbone]\nmetrics-port: 0\n")
    server = ServeProcess(tmp, "--config", "server.yaml", "--port", "0")
    try:
        server.wait_serving()
        yield server
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.stderr()
    finally:
        server.close()


def test_config_file_applies_and_flags_override_it(configured):
    assert configured.address.startswith("127.0.0.1:") and configured.address != "127.0.0.1:50051"
    with _channel(configured.address) as channel:
        info = pb_grpc.FeatureServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.default_imgsz == 64 and info.batching.max_batch == 3
        assert info.batching.max_delay_ms == pytest.approx(1.5) and info.device == "cpu"
        request = pb.ExtractRequest(frame=_frame(0))  # no layers named: the --layers default from the file
        result = pb_grpc.FeatureServiceStub(channel).Extract(request, timeout=30)
    assert result.status == pb.FRAME_STATUS_OK
    assert [t.name for t in result.tensors] == ["P3", "backbone"]


def test_metrics_port_from_the_config_serves_prometheus_text(configured):
    port = re.search(r"metrics on :(\d+)/metrics", configured.details)
    assert port, configured.details
    with _channel(configured.address) as channel:
        pb_grpc.FeatureServiceStub(channel).Extract(pb.ExtractRequest(frame=_frame(1)), timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    ok = re.search(r'^yolostream_frames_total\{status="ok"\} (\S+)$', text, re.M)
    assert ok and float(ok.group(1)) >= 1
    assert 'yolostream_model_info{' in text and 'model="yolov5n"' in text


def test_random_weights_are_announced_loudly(configured):
    assert configured.model == "yolov5n" and "RANDOM WEIGHTS" in configured.details
    banner = [line for line in configured.stderr().splitlines() if line.startswith("##")]
    assert len(banner) >= 3 and any("RANDOM WEIGHTS" in line for line in banner)
    with _channel(configured.address) as channel:
        info = pb_grpc.FeatureServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.random_weights is True and "random" in info.source


def test_reflection_lists_and_describes_the_service(configured):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with _channel(configured.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"yolostream.v1.FeatureService", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(database).FindServiceByName("yolostream.v1.FeatureService")
        methods = {m.name: m for m in service.methods}
    assert set(methods) == {"StreamFeatures", "Extract", "GetModelInfo"}
    stream = methods["StreamFeatures"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.full_name == "yolostream.v1.StreamRequest"
    assert methods["GetModelInfo"].output_type.full_name == "yolostream.v1.ModelInfo"


def test_settings_come_from_defaults_then_file_then_env_then_flags(tmp_path):
    from yolostream.server.serve import command as app
    from yolostream.server import cli

    (tmp_path / "server.yaml").write_text("imgsz: 96\nmax-batch: 5\ntoken: from-file\nhalf: true\nlayers: P3,4\n")

    def settings(*flags: str, environ: dict[str, str] | None = None) -> dict:
        args = cli.build_parser().parse_args(["serve", "--config", str(tmp_path / "server.yaml"), *flags])
        return app.resolve_settings(args, environ=environ or {})

    values = settings()
    assert (values["imgsz"], values["max_batch"], values["token"], values["half"]) == (96, 5, "from-file", True)
    assert values["layers"] == ("P3", "4") and values["port"] == 50051 and values["max_delay_ms"] is None
    assert settings(environ={app.TOKEN_ENV: "from-env"})["token"] == "from-env"
    values = settings("--imgsz", "128", "--token", "from-flag", "--layers", "C4", environ={app.TOKEN_ENV: "from-env"})
    assert (values["imgsz"], values["token"], values["layers"], values["max_batch"]) == (128, "from-flag", ("C4",), 5)
    (tmp_path / "server.yaml").write_text("imgsz: big\n")
    with pytest.raises(ValueError, match="imgsz: expected an integer"):
        settings()
    (tmp_path / "server.yaml").write_text("max_in_flight: 100\n")
    with pytest.raises(ValueError, match="max-in-flight-limit"):
        settings()


def test_the_serve_module_imports_without_torch_or_grpc():
    """``cli`` imports it to build its parser, so ``yolostream --help`` must not pay for torch."""
    code = "import sys, yolostream.server.serve.command; heavy = {'torch', 'grpc'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=60)


def test_startup_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("port: [1\nimgsz: 64\n")
    (tmp_path / "unknown.yaml").write_text("imgsz: 64\nmax_btach: 3\n")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    cases = {
        "missing weights": (["--weights", str(tmp_path / "missing.pt")], ["missing.pt", "not found"]),
        "bad yaml": (["--config", "bad.yaml"], ["bad.yaml", "not valid YAML", "line 2"]),
        "unknown key": (["--config", "unknown.yaml"], ["max_btach", "max_batch", "valid keys"]),
        "port in use": (["--port", str(taken)], [f"127.0.0.1:{taken}", "address in use"]),
        "metrics port in use": (["--port", "0", "--metrics-port", str(taken)], [f"127.0.0.1:{taken}", "address in use"]),
        "metrics port out of range": (["--port", "0", "--metrics-port", "70000"], ["--metrics-port", "70000", "0..65535"]),
        "bad tls": (["--tls-cert", "cert.pem", "--tls-key", "cert.pem", "--port", "0"], ["cert.pem", "PEM"]),
    }
    try:
        outcomes = run_commands({name: ["serve", "--imgsz", "64", "--device", "cpu", *args]
                                 for name, (args, _) in cases.items()}, tmp_path, timeout=60, parallel=len(cases))
    finally:
        holder.close()
    for name, (_, expected) in cases.items():
        assert_one_line_error(name, outcomes[name], "serve", expected)
        assert "serving" not in outcomes[name][0], name


def test_sigterm_drains_accepted_frames_and_exits_zero(tmp_path):
    """Frames the server has read are answered OK, in order, after SIGTERM; the open stream then ends UNAVAILABLE.

    The client sends a burst of frames and then keeps its stream open without sending more, so the drain must
    neither wait for the client nor run into the grace period.
    """
    grace = 10
    server = ServeProcess(tmp_path, "--port", "0", "--imgsz", "320", "--device", "cpu", "--max-batch", "1",
                          "--grace", str(grace))
    burst = 4
    release = threading.Event()

    def requests() -> Iterator[pb.StreamRequest]:
        yield _config(max_in_flight=burst)
        for k in range(burst):
            yield pb.StreamRequest(frame=_frame(k, 240, 320))
        release.wait(60)

    try:
        with _channel(server.wait_serving()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = pb_grpc.FeatureServiceStub(channel).StreamFeatures(requests(), timeout=60)
            results = [next(call).result]  # the server has read the whole burst by now: it fits max_in_flight
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would hold the drain until the grace period ends
            with pytest.raises(grpc.RpcError) as ended:
                results.extend(response.result for response in call)
            drain_s = time.monotonic() - signalled
            release.set()
        assert server.proc.wait(timeout=30) == 0, server.stderr()
    finally:
        release.set()
        server.close()
    assert [r.frame_id for r in results] == list(range(burst))
    assert all(r.status == pb.FRAME_STATUS_OK and len(r.tensors) == 1 for r in results), \
        [r.error_message for r in results]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details(), \
        (ended.value.code(), ended.value.details())
    assert drain_s < grace - 2, f"the drain took {drain_s:.1f} s of its {grace} s grace: it waited on an idle client"
    assert "SIGTERM" in server.stderr()
