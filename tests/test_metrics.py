"""Prometheus metrics account for every frame (ok, error, dropped) and are served only when asked."""

from __future__ import annotations

import os
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

from conftest import cpu_runner


@pytest.fixture(scope="module")
def engine() -> DeviceRunner:
    return cpu_runner(64)


def _frame(i: int) -> pb.Frame:
    img = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return pb.Frame(frame_id=i, raw=pb.RawImage(data=img.tobytes(), height=48, width=64, channels=3,
                                                format=pb.PIXEL_FORMAT_BGR))


def _stream(stub, frames, **config):
    def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["P3"]), **config))
        for frame in frames:
            yield pb.StreamRequest(frame=frame)

    return list(stub.StreamFeatures(requests(), timeout=60))


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                key += f"[le={s.labels['le']}]"
            samples[key] = s.value
    return samples


def test_every_answered_frame_is_counted(engine):
    with ServerThread(engine, ServerSettings(port=0, metrics_port=0)) as srv:
        port = srv.server.metrics_port
        assert port
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            plain = _stream(stub, [_frame(0), pb.Frame(frame_id=1, encoded=b"junk"), _frame(2), _frame(3)])
            realtime = _stream(stub, [_frame(i) for i in range(40)], realtime=True, max_in_flight=1)
            stub.Extract(pb.ExtractRequest(frame=_frame(9)), timeout=30)
        answered = plain + realtime
        statuses = [r.result.status for r in answered] + [pb.FRAME_STATUS_OK]
        m = _scrape(port)
    assert m["yolostream_frames_total[status=ok]"] == statuses.count(pb.FRAME_STATUS_OK)
    assert m["yolostream_frames_total[status=error]"] == 1
    assert m["yolostream_frames_total[status=dropped]"] == statuses.count(pb.FRAME_STATUS_DROPPED)
    assert m["yolostream_batch_size_count"] == statuses.count(pb.FRAME_STATUS_OK)
    assert m["yolostream_frame_stage_seconds_count[stage=compute]"] == statuses.count(pb.FRAME_STATUS_OK)
    assert m["yolostream_streams_active"] == 0 and m["yolostream_queue_frames"] == 0
    assert m["yolostream_model_info[device=cpu][dtype=float32][model=yolov5n][random_weights=true]"
             "[source=" + engine.loaded.source + "]"] == 1


def test_metrics_are_not_served_unless_asked(engine):
    with ServerThread(engine, ServerSettings(port=0)) as srv:
        assert srv.server.metrics_port is None


def test_metrics_of_several_front_ends_are_summed_and_their_directory_removed(tmp_path):
    """``serve --frontends 2``: /metrics (front-end 0) counts the frames every front-end answered; the shared
    metrics directory goes with the server."""
    import re
    import signal
    import tempfile
    from pathlib import Path

    from conftest import ServeProcess

    server = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--frontends", "2", "--metrics-port", "0")
    try:
        server.wait_serving()
        port = int(re.search(r"metrics on :(\d+)/metrics", server.details).group(1))
        calls = 12  # each on its own connection: the kernel spreads connections over both front-ends
        for i in range(calls):
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                pb_grpc.FeatureServiceStub(channel).Extract(pb.ExtractRequest(frame=_frame(i)), timeout=30)
        m = _scrape(port)
        assert m["yolostream_frames_total[status=ok]"] == calls
        assert m["yolostream_batch_size_count"] == calls
        assert m["yolostream_streams_active"] == 0 and m["yolostream_queue_frames"] == 0
        assert any(key.startswith("yolostream_model_info[") for key in m)
        shared = list(Path(tempfile.gettempdir()).glob(f"yolostream-metrics-{server.proc.pid}-*"))
        assert len(shared) == 1 and any(shared[0].iterdir())
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.stderr()
        assert not shared[0].exists()
    finally:
        server.close()


def test_a_killed_servers_metrics_directory_is_swept_at_the_next_start(tmp_path, monkeypatch):
    """SIGKILL leaves no cleanup to run: the next server removes directories whose server pid is gone."""
    import subprocess
    import sys
    import tempfile

    from yolostream.server.serve.supervisor import METRICS_DIR_PREFIX, sweep_stale_metrics

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{METRICS_DIR_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-def"
    for directory in (dead, live):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    sweep_stale_metrics()
    assert not dead.exists() and live.exists()


def _wait_for_gauge(port: int, want: float, timeout: float = 30.0) -> float:
    """Scrape until ``yolostream_queue_frames`` reads ``want`` (bounded); returns the last value read."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = _scrape(port)["yolostream_queue_frames"]
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_the_queue_gauge_is_the_true_depth_and_returns_to_zero_when_streams_are_abandoned(tmp_path):
    """Two front-ends, so the gauge is summed from the shared metrics directory. Batches of 4 wait (600 s) for a
    full batch, so frames short of one stay at the device until their stream goes: the gauge must show them while
    they are there and drop to 0 once their stream is cancelled, with no later frame answered to update it. A stream
    whose answers are not read holds its max_in_flight at the device, and no more."""
    import re

    from conftest import ServeProcess

    server = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--frontends", "2", "--metrics-port", "0",
                          "--max-batch", "4", "--max-delay-ms", "600000")
    try:
        server.wait_serving()
        port = int(re.search(r"metrics on :(\d+)/metrics", server.details).group(1))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)

            def requests(count: int, in_flight: int):
                yield pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["P3"]),
                                                              max_in_flight=in_flight))
                for i in range(count):
                    yield pb.StreamRequest(frame=_frame(i))

            call = stub.StreamFeatures(requests(5, 8), timeout=120)
            answered = [next(call) for _ in range(4)]  # one full batch; the fifth frame waits for three more
            assert all(r.result.status == pb.FRAME_STATUS_OK for r in answered)
            assert _wait_for_gauge(port, 1) == 1
            call.cancel()
            assert _wait_for_gauge(port, 0) == 0

            unread = stub.StreamFeatures(requests(40, 3), timeout=120)  # never read: the server reads 3 frames
            assert _wait_for_gauge(port, 3) == 3
            assert _scrape(port)["yolostream_queue_frames"] == 3
            unread.cancel()
            assert _wait_for_gauge(port, 0) == 0
    finally:
        server.close()
