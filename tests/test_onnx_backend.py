"""The onnxruntime engine backend: features equal the torch backend's for every layer name, dtype and pooling (in
the runner, through a gRPC stream and through ``serve --backend``), truncation, threads, ``--backend auto``'s choice
and its log line, ``extract --backend``, and a one-line error without the onnx extra."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

import cv2
import grpc
import numpy as np
import pytest
import torch

from conftest import ServeProcess, cpu_runner, engine_extract, grpc_channel, serve_cmd, serve_env, torch_threads
from yolostream.server import cli
from yolostream.server.device import onnx_backend
from yolostream.server.model import onnx_io
from yolostream.server.common.errors import UserError
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'yolostream[onnx]') is not installed")

IMGSZ = 64
REL_TOL = 1e-4
ALIASES = {"backbone": 9, "C3": 4, "C4": 6, "C5": 9, "P3": 17, "P4": 20, "P5": 23}
EVERY_NAME = [str(i) for i in range(24)] + list(ALIASES)
DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
POOLINGS = {"none": pb.POOLING_NONE, "avg": pb.POOLING_GLOBAL_AVG, "max": pb.POOLING_GLOBAL_MAX}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second one mostly waits for a core."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runners():
    return cpu_runner(IMGSZ), cpu_runner(IMGSZ, backend="onnxruntime")


def image(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_float(array: np.ndarray) -> np.ndarray:
    """Features as float64 (the runner's bfloat16 host arrays are uint16 bit patterns)."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return array.astype(np.float64)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    """Within 1e-4 of the layer's max |value|; a float16/bfloat16 output also gets one unit in the last place at that
    magnitude, since two values 1e-5 apart may round to neighbouring float16 values."""
    got, want = as_float(got), as_float(want)
    scale = np.abs(want).max()
    ulp = {"float32": 0.0, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype] * 2.0 ** np.floor(np.log2(scale or 1))
    assert got.shape == want.shape, what
    assert np.abs(got - want).max() <= REL_TOL * scale + ulp, f"{what}: {np.abs(got - want).max()} vs scale {scale}"


def test_every_layer_name_dtype_and_pooling_equals_the_torch_backend(runners):
    torch_runner, ort_runner = runners
    frames = [image(k) for k in range(3)]
    prepared = [torch_runner.preprocess(f)[0] for f in frames]
    resolved = torch_runner.resolve(EVERY_NAME)
    keys = [(index, pooling, dtype) for index in sorted({r.index for r in resolved})
            for pooling in POOLINGS for dtype in DTYPES]
    want = torch_runner.collect(torch_runner.launch(prepared, keys)).host
    got = ort_runner.collect(ort_runner.launch(prepared, keys)).host
    for key in keys:
        assert_close(got[key], want[key], key[2], str(key))
    by_name = engine_extract(ort_runner, frames[:1], EVERY_NAME)[0].features
    reference = engine_extract(torch_runner, frames[:1], EVERY_NAME)[0].features
    assert list(by_name) == EVERY_NAME
    for name in EVERY_NAME:
        assert_close(by_name[name], reference[name], "float32", name)


def test_backbone_never_runs_the_neck(runners):
    """The session for ``backbone`` holds layers 0..9 only, and is built once for that set of layers."""
    import onnx

    _, ort_runner = runners
    h, w = ort_runner.input_hw()
    data = onnx_backend.graph_bytes(ort_runner.layers, (9,), torch.zeros((2, 3, h, w)))
    layers = {int(part.split(".")[1]) for node in onnx.load_from_string(data).graph.node
              for part in node.name.split("/") if part.startswith("model.") and part.split(".")[1].isdigit()}
    assert layers and max(layers) == 9, sorted(layers)
    plan = ort_runner.plan([9])
    assert plan.keys == (9,) and len(plan.output_names) == 1 and ort_runner.plan([9]) is plan


def test_cpu_sessions_get_the_workers_thread_count(runners):
    """As ``share_cpu`` gives each torch worker its threads, a session is built for the thread count in force."""
    _, ort_runner = runners
    try:
        ort_runner.set_cpu_threads(2)
        two = ort_runner.plan([4])
        ort_runner.set_cpu_threads(1)
        one = ort_runner.plan([4])
    finally:
        torch.set_num_threads(1)
    assert one is not two
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert two.session.get_session_options().intra_op_num_threads == 2


def test_providers_prefer_the_gpu_then_cpu():
    installed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_io.providers_for(torch.device("cpu"), installed) == ["CPUExecutionProvider"]
    assert onnx_io.providers_for(torch.device("cuda:1"), installed) == [
        ("TensorrtExecutionProvider", {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider"]
    assert onnx_io.providers_for(torch.device("cuda"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def stream(address: str, layers: list[str], dtype: int, pooling: int, frames: list[np.ndarray]) -> list[pb.FrameResult]:
    def requests():
        options = pb.FeatureOptions(layers=layers, dtype=dtype, pooling=pooling)
        yield pb.StreamRequest(config=pb.StreamConfig(options=options, max_in_flight=4))
        for k, frame in enumerate(frames):
            h, w, c = frame.shape
            yield pb.StreamRequest(frame=pb.Frame(frame_id=k, raw=pb.RawImage(
                data=frame.tobytes(), height=h, width=w, channels=c, format=pb.PIXEL_FORMAT_BGR)))

    with grpc.insecure_channel(address) as channel:
        replies = list(pb_grpc.FeatureServiceStub(channel).StreamFeatures(requests(), timeout=120))
    results = [r.result for r in replies]
    assert [r.status for r in results] == [pb.FRAME_STATUS_OK] * len(frames)
    return results


def streamed(runner, frames: list[np.ndarray]) -> dict[tuple[str, str], list[dict[str, np.ndarray]]]:
    """(dtype, pooling) → per frame, layer name → the array a gRPC stream delivered (raw, as on the wire)."""
    out = {}
    with ServerThread(runner, ServerSettings(port=0, max_batch=4)) as server:
        for dtype, code in DTYPES.items():
            for pooling, pool_code in POOLINGS.items():
                results = stream(server.address, ["backbone", "P3", "C4"], code, pool_code, frames)
                out[dtype, pooling] = [{t.name: wire.tensor_from_proto(t) for t in r.tensors} for r in results]
    return out


def test_a_grpc_stream_on_the_onnxruntime_backend_equals_the_torch_backend(runners):
    frames = [image(10 + k) for k in range(3)] + [image(20, 64, 64)]
    torch_runner, ort_runner = runners
    want, got = streamed(torch_runner, frames), streamed(ort_runner, frames)
    for (dtype, pooling), per_frame in want.items():
        for k, tensors in enumerate(per_frame):
            for name, array in tensors.items():
                assert_close(got[dtype, pooling][k][name], array, dtype, f"{dtype} {pooling} frame {k} {name}")


def test_auto_is_onnxruntime_on_cpu_and_serves_it_after_proving_it(caplog):
    """``auto`` (the default) resolves to onnxruntime on a CPU where it is installed, by rule, with no timing run;
    the start-up check compares it with the reference path before any frame is served."""
    runner = cpu_runner(IMGSZ, backend="auto")
    with caplog.at_level(logging.INFO, logger="yolostream.server.device.engine"):
        with ServerThread(runner, ServerSettings(port=0, max_batch=2)) as server:
            results = stream(server.address, ["P3"], pb.DTYPE_FLOAT32, pb.POOLING_NONE, [image(0)])
            with grpc_channel(server.address) as channel:
                info = pb_grpc.FeatureServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert runner.backend == info.backend == "onnxruntime"
    assert any(r.getMessage() == "--backend auto: onnxruntime on cpu" for r in caplog.records)
    check = re.fullmatch(r"onnxruntime direct float32 cpu vs reference: worst relative error (\S+) on (\S+) "
                         r"\(limit 0\.0001\)", info.startup_check)
    assert check is not None, info.startup_check
    assert float(check.group(1)) <= 1e-4
    want = engine_extract(cpu_runner(IMGSZ), [image(0)], ["P3"])[0].features["P3"]
    assert_close(wire.tensor_from_proto(results[0].tensors[0]), want, "float32", "P3")


def test_auto_without_onnxruntime_uses_torch_silently(caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    runner = cpu_runner(IMGSZ, backend="auto")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert runner.resolve_backend() == "torch"
    assert not caplog.records


def test_a_backend_that_is_wrong_stops_the_start_with_one_line(monkeypatch):
    """A served path off by 1 % (100x the float32 limit) never serves: the start fails naming path and layer."""
    real = onnx_io.OnnxPlan.by_index
    monkeypatch.setattr(onnx_io.OnnxPlan, "by_index",
                        lambda plan, x: {i: t * 1.01 for i, t in real(plan, x).items()})
    with pytest.raises(ValueError) as caught:
        ServerThread(cpu_runner(IMGSZ, backend="onnxruntime"), ServerSettings(port=0, layers=["P3"])).start()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("start-up check: the served path (onnxruntime direct float32 "
                                                        "cpu) differs from the reference path")
    error = float(re.search(r"worst relative error ([0-9.e+-]+)", message).group(1))
    assert 5e-3 < error < 2e-2 and " on layer " in message


def test_a_served_path_that_fails_stops_the_start_with_one_line(monkeypatch):
    def broken(plan, x):
        raise RuntimeError("provider exploded\nwith a second line")

    monkeypatch.setattr(onnx_io.OnnxPlan, "by_index", broken)
    with pytest.raises(ValueError) as caught:
        ServerThread(cpu_runner(IMGSZ, backend="onnxruntime"), ServerSettings(port=0)).start()
    message = str(caught.value)
    assert "\n" not in message and "failed at input" in message and "RuntimeError: provider exploded" in message


def test_the_reference_path_is_reported_as_such():
    with ServerThread(cpu_runner(IMGSZ, backend="torch"), ServerSettings(port=0)) as server:
        with grpc_channel(server.address) as channel:
            info = pb_grpc.FeatureServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.backend == "torch" and info.startup_check == "torch direct float32 cpu is the reference path"


def test_without_the_onnx_extra_the_backend_and_onnx_export_are_one_line_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    cv2.imwrite(str(tmp_path / "a.png"), image(0))
    with pytest.raises(UserError, match=r"--backend onnxruntime needs onnxruntime.*yolostream\[onnx\]"):
        cpu_runner(IMGSZ, backend="onnxruntime")
    for args in (["extract", "--backend", "onnxruntime", "--out", str(tmp_path / "o"), str(tmp_path / "a.png")],
                 ["export", "--out", str(tmp_path / "x.onnx")]):
        code = cli.main([*args, "--imgsz", "64", "--device", "cpu"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"yolostream {args[0]}: error: ") and "pip install 'yolostream[onnx]'" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_extract_backend_onnxruntime_writes_the_torch_features(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "a.png"), image(1, 90, 120))
    cv2.imwrite(str(tmp_path / "b.png"), image(2, 60, 120))
    for backend in ("torch", "onnxruntime"):
        assert cli.main(["extract", "--imgsz", "96", "--device", "cpu", "--layers", "backbone,P3", "--batch", "2",
                         "--backend", backend, "--out", str(tmp_path / backend), str(tmp_path / "a.png"),
                         str(tmp_path / "b.png")]) == 0
    capsys.readouterr()
    for stem in ("a", "b"):
        with np.load(tmp_path / "torch" / f"{stem}.npz") as want, np.load(tmp_path / "onnxruntime" / f"{stem}.npz") as got:
            assert sorted(got.files) == sorted(want.files)
            for key in want.files:
                if key in ("backbone", "P3"):
                    assert_close(got[key], want[key], "float32", f"{stem} {key}")
                else:
                    np.testing.assert_array_equal(got[key], want[key])


def test_serve_backend_onnxruntime_and_auto_as_processes(tmp_path):
    """``serve --backend onnxruntime`` and ``--backend auto`` (onnxruntime here) answer with torch's features, and
    the start-up line names the backend and what the start-up check measured."""
    frame = image(3)
    want = engine_extract(cpu_runner(IMGSZ), [frame], ["backbone", "P4"])[0].features
    servers = {backend: ServeProcess(tmp_path, "--imgsz", str(IMGSZ), "--device", "cpu", "--port", "0",
                                     "--max-batch", "2", "--backend", backend)
               for backend in ("onnxruntime", "auto")}
    try:
        for backend, server in servers.items():
            server.wait_serving()
            with grpc_channel(server.address) as channel:
                info = pb_grpc.FeatureServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
                assert info.backend in (("onnxruntime",) if backend == "onnxruntime" else ("torch", "onnxruntime"))
                assert info.backend in server.details or info.backend == "torch"
                result = pb_grpc.FeatureServiceStub(channel).Extract(pb.ExtractRequest(
                    options=pb.FeatureOptions(layers=["backbone", "P4"]),
                    frame=pb.Frame(raw=pb.RawImage(data=frame.tobytes(), height=48, width=80, channels=3,
                                                   format=pb.PIXEL_FORMAT_BGR))), timeout=60)
            assert result.status == pb.FRAME_STATUS_OK, (backend, result.error_message)
            for tensor in result.tensors:
                assert_close(wire.tensor_from_proto(tensor), want[tensor.name], "float32", f"{backend} {tensor.name}")
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=30) == 0, server.stderr()
        log = servers["auto"].stderr()
        assert "--backend auto: onnxruntime on cpu" in log, log
        assert "onnxruntime, RANDOM WEIGHTS" in servers["auto"].details
        assert "start-up check: onnxruntime direct float32 cpu vs reference: worst relative error" in \
            servers["auto"].details
    finally:
        for server in servers.values():
            server.close()


def test_sessions_and_plans_are_bounded_however_many_layer_sets_clients_ask_for(monkeypatch):
    """Clients choose layer sets: every set kept built would let them grow the server without bound, so the least
    recently used is dropped (and built again when asked for again)."""
    from yolostream.server.device import backends, onnx_backend

    built: list[tuple] = []
    real_session, real_truncated = onnx_backend.session, backends.TruncatedModel
    monkeypatch.setattr(onnx_backend, "MAX_SESSIONS", 2)
    monkeypatch.setattr(onnx_backend, "session", lambda *a, **k: built.append("ort") or real_session(*a, **k))
    monkeypatch.setattr(backends, "MAX_PLANS", 2)
    monkeypatch.setattr(backends, "TruncatedModel",
                        lambda layers, key: built.append(("torch", key)) or real_truncated(layers, key))
    ort = cpu_runner(IMGSZ, backend="onnxruntime")
    for index in (1, 2, 3, 2, 1):  # 1 is dropped when 3 comes, 2 is still there, 1 is built again
        ort.plan([index])
    assert built.count("ort") == 4
    torch_runner = cpu_runner(IMGSZ)
    for index in (1, 2, 3, 2, 1):
        torch_runner.plan([index])
    assert [b[1] for b in built if b != "ort"] == [(1,), (2,), (3,), (1,)]


WRONG_BACKEND = """
from yolostream.server.model import onnx_io

_real = onnx_io.OnnxPlan.by_index
onnx_io.OnnxPlan.by_index = lambda plan, x: {i: t * 1.01 for i, t in _real(plan, x).items()}
"""


def test_serve_refuses_to_start_on_a_wrong_backend_with_one_line_and_exit_2(tmp_path):
    """Every process of the server imports a sitecustomize that makes the onnxruntime backend 1 % wrong: the device
    process's start-up check catches it and ``serve`` exits 2 with one line naming the path and the layer."""
    (tmp_path / "sitecustomize.py").write_text(WRONG_BACKEND)
    env = serve_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    done = subprocess.run(serve_cmd("--imgsz", str(IMGSZ), "--port", "0", "--backend", "onnxruntime"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("yolostream serve: ")]
    assert len(lines) == 1, done.stderr
    assert "start-up check: the served path (onnxruntime direct float32 cpu) differs from the reference path" in \
        lines[0] and "on layer" in lines[0]
