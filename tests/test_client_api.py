"""The client API against real loopback servers: streaming, saving, flow control, errors and servers that die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolostream.client import (
    FeatureClient,
    FeatureServerError,
    FeatureWriter,
    FrameError,
    SourceError,
    load_features,
    open_source,
)
from yolostream.client.viz import map_to_frame
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread

from conftest import cpu_runner, engine_extract, in_process_server

IMGSZ = 64
MAX_PIXELS = 100_000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine() -> DeviceRunner:
    return cpu_runner(IMGSZ)


@pytest.fixture(scope="module")
def server(engine):
    with in_process_server(engine, max_batch=8, max_pixels=MAX_PIXELS) as running:
        yield running


@pytest.fixture()
def client(server):
    with FeatureClient(server.address, timeout=60) as c:
        yield c


def image(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_video(path: Path, n: int, w: int = 96, h: int = 72, fps: float = 10.0) -> Path:
    """A clip of a square moving across a gradient, written with cv2.VideoWriter (MJPG in AVI)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        frame = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60)], axis=-1).astype(np.uint8)
        cv2.rectangle(frame, (4 + 6 * i, 20), (24 + 6 * i, 40), (255, 255, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def sender_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "yolostream-sender"]


class SlowEngine:
    """An engine whose every batch takes at least ``delay`` seconds: a model slower than the camera."""

    def __init__(self, engine: DeviceRunner, delay: float) -> None:
        self._engine, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def launch(self, images, keys):
        time.sleep(self._delay)
        return self._engine.launch(images, keys)


def test_a_video_file_is_streamed_every_frame_answered_with_catalogue_shapes(client, tmp_path):
    video = write_video(tmp_path / "clip.avi", n=12)
    info = client.model_info()
    layers = ["backbone", "P3", "4"]
    with open_source(str(video)) as source:
        assert (source.kind, source.frame_count, source.fps) == ("video", 12, 10.0)
        results = list(client.stream(source, layers=layers, letterbox="square"))
    assert [r.frame_id for r in results] == list(range(12))
    assert all(r.ok and r.error == "" for r in results)
    assert [r.timestamp for r in results] == pytest.approx([i / 10 for i in range(12)])
    for r in results:
        assert list(r.features) == layers
        for name in layers:
            row = info.layer(name)
            assert r.features[name].shape == row.output_shape and r.features[name].dtype == np.float32
            assert (r.tensors[name].layer_index, r.tensors[name].stride) == (row.index, row.stride)
        assert r.latency is not None and r.latency > 0 and r.batch_size >= 1
        assert r.letterbox["original_width"] == 96 and r.letterbox["input_width"] == IMGSZ
    # minimal letterbox: same channels, one cell per stride of the (non-square) model input
    auto = next(iter(client.stream(open_source(str(video), max_frames=1), layers=layers)))
    for name in layers:
        c, _, _ = info.layer(name).output_shape
        stride = info.layer(name).stride
        assert auto.features[name].shape == (c, auto.letterbox["input_height"] // stride,
                                             auto.letterbox["input_width"] // stride)


def test_stream_features_equal_extract_and_the_engine(client, engine):
    img = image(3)
    want = engine_extract(engine, [img], ["P3"])[0].features["P3"]
    single = client.extract(img, layers="P3")
    np.testing.assert_array_equal(single.features["P3"], want)
    for encoding in ("png", "raw"):
        (result,) = list(client.stream([(img, 12.5)], layers=["P3"], encoding=encoding, max_in_flight=1))
        assert result.timestamp == 12.5 and result.batch_size == 1
        np.testing.assert_array_equal(result.features["P3"], want)
    (lossy,) = list(client.stream([img], layers="P3", encoding="jpeg", quality=95))
    assert lossy.ok and lossy.features["P3"].shape == want.shape


def test_dtypes_pooling_and_grey_frames(client, engine):
    img = image(4)
    want = engine_extract(engine, [img], ["C4"])[0].features["C4"]
    half = client.extract(img, layers="C4", dtype="float16").features["C4"]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    pooled = client.extract(img, layers="C4", pooling="avg").features["C4"]
    np.testing.assert_allclose(pooled, want.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    grey_want = engine_extract(engine, [cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)], ["C4"])[0].features["C4"]
    for encoding in ("raw", "png"):
        (r,) = list(client.stream([grey], layers="C4", encoding=encoding))
        np.testing.assert_array_equal(r.features["C4"], grey_want)


def test_load_features_returns_exactly_what_the_api_yielded(client, tmp_path):
    frames = [(image(10 + i), 100.0 + i / 30) for i in range(9)]
    big = np.zeros((400, 400, 3), np.uint8)  # over the server's pixel limit: a per-frame error, not a row
    frames.insert(4, (big, 99.0))
    results = []
    with FeatureWriter(tmp_path / "save", info={"note": "test"}) as writer:
        for r in client.stream(frames, layers="backbone,P3", dtype="float16", encoding="raw"):
            writer.append(r)
            results.append(r)
    assert [r.status for r in results].count("error") == 1 and "limit" in results[4].error
    saved = load_features(tmp_path / "save")
    assert saved.meta["complete"] and saved.meta["note"] == "test" and saved.meta["rows"] == 9
    ok = [r for r in results if r.ok]
    assert list(saved.frame_ids) == [r.frame_id for r in ok]
    for name in ("backbone", "P3"):
        arr = saved[name]
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (9, *ok[0].features[name].shape)
        np.testing.assert_array_equal(arr, np.stack([r.features[name] for r in ok]))
        assert np.load(tmp_path / "save" / saved.meta["layers"][name]["file"], mmap_mode="r").shape == arr.shape
    assert [f["frame_id"] for f in saved.frames] == [r.frame_id for r in results]
    for f, r in zip(saved.frames, results, strict=True):
        assert (f["timestamp"], f["status"], f["error"], f["letterbox"], f["batch_size"], f["timings_us"]) == \
               (r.timestamp, r.status, r.error, r.letterbox, r.batch_size, r.timings_us)
    assert saved.frames[4]["row"] is None and saved.frames[5]["row"] == 4


def _save_marked_incomplete(client, directory: Path, seed: int) -> tuple[np.ndarray, dict]:
    """Save 5 frames of P3, then mark the save incomplete as a crash would; returns the full rows and the meta."""
    with FeatureWriter(directory) as writer:
        for r in client.stream([image(seed + i) for i in range(5)], layers="P3", encoding="raw"):
            writer.append(r)
    full = load_features(directory)["P3"].copy()
    meta = json.loads((directory / "meta.json").read_text())
    meta["complete"] = False
    (directory / "meta.json").write_text(json.dumps(meta))
    return full, meta


def test_an_interrupted_save_is_read_up_to_its_last_whole_row(client, tmp_path):
    # what a crash leaves: meta says incomplete, the header still counts 0 rows, the last row is cut short
    full, meta = _save_marked_incomplete(client, tmp_path / "save", 20)
    layer_file = tmp_path / "save" / meta["layers"]["P3"]["file"]
    with open(layer_file, "r+b") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (0, *full.shape[1:])})
    with open(layer_file, "r+b") as f:
        f.truncate(layer_file.stat().st_size - 10)
    saved = load_features(tmp_path / "save")
    assert saved["P3"].shape == (4, *full.shape[1:]) and len(saved.frames) == 4
    np.testing.assert_array_equal(saved["P3"], full[:4])


def test_a_save_whose_rows_outran_its_frame_records_reads_back_consistently(client, tmp_path):
    # what a crash can leave: the layer header already counts 5 rows, but only 3 frame records reached the disk
    full, _ = _save_marked_incomplete(client, tmp_path / "save", 40)
    records = tmp_path / "save" / "frames.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[:3]))
    saved = load_features(tmp_path / "save")
    assert saved["P3"].shape == (3, *full.shape[1:]) and len(saved.frames) == 3
    assert list(saved.frame_ids) == [0, 1, 2]
    np.testing.assert_array_equal(saved["P3"], full[:3])


def test_the_writer_refuses_a_used_folder_and_mixed_shapes(client, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        FeatureWriter(tmp_path / "used")
    results = list(client.stream([image(1), image(2, 80, 40)], layers="P3"))
    with FeatureWriter(tmp_path / "mixed") as writer:
        writer.append(results[0])
        with pytest.raises(ValueError, match="letterbox square"):
            writer.append(results[1])


def test_server_errors_carry_the_grpc_status_and_message(client):
    with pytest.raises(FeatureServerError) as err:
        list(client.stream([image(0)] * 3, layers="P9"))
    assert err.value.code.name == "INVALID_ARGUMENT" and "unknown layer 'P9'" in err.value.details
    assert "P9" in str(err.value) and client.address in str(err.value)
    with pytest.raises(FeatureServerError) as err:
        client.extract(image(0), layers="nope")
    assert err.value.code.name == "INVALID_ARGUMENT" and "backbone" in err.value.details
    with pytest.raises(FrameError, match="over the server limit"):
        client.extract(np.zeros((400, 400, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        client.extract(np.zeros((8, 8, 3), np.float32))
    assert not sender_threads()


def test_a_client_without_a_server_fails_fast(tmp_path):
    with FeatureClient("127.0.0.1:1", timeout=10) as c:
        with pytest.raises(FeatureServerError) as err:
            c.model_info()
        assert err.value.code.name == "UNAVAILABLE"
        with pytest.raises(FeatureServerError) as err:
            list(c.stream([image(0)]))
        assert err.value.code.name == "UNAVAILABLE"
    assert not sender_threads()


def test_the_window_bounds_frames_read_ahead_of_the_answers(engine):
    reads = []

    def camera():
        for i in range(60):
            reads.append(i)
            yield image(i % 5)

    with ServerThread(SlowEngine(engine, 0.005), ServerSettings(port=0, max_batch=4)) as srv:
        with FeatureClient(srv.address) as c:
            answered = 0
            for r in c.stream(camera(), layers="P3", max_in_flight=2, encoding="raw"):
                assert r.frame_id == answered and r.ok
                answered += 1
                # window = 2 x max_in_flight frames between the source and the answers
                assert len(reads) - answered <= 4
    assert answered == 60


def test_realtime_accounts_for_every_frame(engine):
    n = 80
    with ServerThread(SlowEngine(engine, 0.02), ServerSettings(port=0, max_batch=4)) as srv:
        with FeatureClient(srv.address) as c:
            results = list(c.stream((image(i % 7) for i in range(n)), layers="P3", realtime=True, max_in_flight=1,
                                    encoding="raw"))
    assert [r.frame_id for r in results] == list(range(n))
    statuses = [r.status for r in results]
    assert set(statuses) == {"ok", "dropped"} and statuses[-1] == "ok"
    dropped = [r for r in results if r.status == "dropped"]
    assert all(not r.features and "realtime" in r.error and r.letterbox is None for r in dropped)
    assert all(r.latency is not None for r in results)


def test_stopping_early_ends_the_sender_thread(client):
    endless = (image(0) for _ in iter(int, 1))
    stream = client.stream(endless, layers="P3")
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert not sender_threads() and stream.frames_read >= 3
    with client.stream((image(0) for _ in iter(int, 1)), layers="P3") as stream:
        next(stream)
    assert not sender_threads()
    stream = client.stream((image(0) for _ in iter(int, 1)), layers="P3")
    next(stream)
    del stream  # dropped without close(): the finaliser closes it
    assert not sender_threads()


def test_a_source_that_fails_mid_stream_raises_after_its_answered_frames(client):
    def camera():
        for i in range(3):
            yield image(i)
        raise SourceError("camera 0 stopped delivering frames after 3 frame(s)")

    got = []
    with pytest.raises(SourceError, match="stopped delivering"):
        for r in client.stream(camera(), layers="P3"):
            got.append(r.frame_id)
    assert got == [0, 1, 2] and not sender_threads()


def test_a_server_stopped_mid_stream_gives_unavailable(engine):
    srv = ServerThread(SlowEngine(engine, 0.01), ServerSettings(port=0, max_batch=2)).start()
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 5.0})
    try:
        with FeatureClient(srv.address) as c:
            start = time.monotonic()
            with pytest.raises(FeatureServerError) as err:
                for r in c.stream((image(0) for _ in iter(int, 1)), layers="P3", max_in_flight=2):
                    if r.frame_id == 3:
                        stopper.start()
            assert err.value.code.name == "UNAVAILABLE" and "shutting down" in err.value.details
            assert time.monotonic() - start < 30
    finally:
        if stopper.ident is None:
            srv.stop(grace=0)
        else:
            stopper.join()
    assert not sender_threads()


_SERVER_PROCESS = """
import sys
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.server.model.loader import load_model
server = ServerThread(DeviceRunner(load_model(), device="cpu", imgsz=64), ServerSettings(port=0)).start()
print(server.port, flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def server_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("protos", "server", "client"))}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), "the server process did not start"
        yield proc, f"127.0.0.1:{int(line)}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_frozen_or_killed_server_process_gives_unavailable_not_a_hang(server_process):
    proc, address = server_process
    # frozen (SIGSTOP): the kernel keeps the connection open, only keepalive pings can tell
    with FeatureClient(address, keepalive_s=0.5, keepalive_timeout_s=0.5) as c:
        start = time.monotonic()
        with pytest.raises(FeatureServerError) as err:
            for r in c.stream((image(0) for _ in iter(int, 1)), layers="P3"):
                if r.frame_id == 3:
                    os.kill(proc.pid, signal.SIGSTOP)
        assert err.value.code.name == "UNAVAILABLE" and time.monotonic() - start < 20
    os.kill(proc.pid, signal.SIGCONT)
    # killed (SIGKILL): the connection closes at once
    with FeatureClient(address) as c:
        start = time.monotonic()
        with pytest.raises(FeatureServerError) as err:
            for r in c.stream((image(0) for _ in iter(int, 1)), layers="P3"):
                if r.frame_id == 3:
                    proc.kill()
        assert err.value.code.name == "UNAVAILABLE" and time.monotonic() - start < 20
    assert not sender_threads()


def test_the_bearer_token_is_sent(engine):
    with ServerThread(engine, ServerSettings(port=0, token="s3cret")) as srv:
        with FeatureClient(srv.address) as anonymous:
            with pytest.raises(FeatureServerError) as err:
                anonymous.model_info()
            assert err.value.code.name == "UNAUTHENTICATED"
            with pytest.raises(FeatureServerError) as err:
                list(anonymous.stream([image(0)]))
            assert err.value.code.name == "UNAUTHENTICATED"
        with FeatureClient(srv.address, token="s3cret") as c:
            assert c.model_info().model_name == "yolov5n"
            assert [r.status for r in c.stream([image(0)] * 3, layers="P3")] == ["ok"] * 3


def test_tls_with_a_private_ca(engine, tmp_path):
    openssl = "/usr/bin/openssl"
    if not os.path.exists(openssl):
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    settings = ServerSettings(port=0, tls_cert=str(cert), tls_key=str(key))
    with ServerThread(engine, settings) as srv:
        with FeatureClient(srv.address, tls_ca=cert, tls_server_name="localhost") as c:
            assert c.model_info().model_name == "yolov5n"
            assert [r.status for r in c.stream([image(0)] * 2, layers="P3")] == ["ok"] * 2


def test_sources_images_folders_globs_and_errors(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), image(i))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = open_source(str(tmp_path))
    assert (folder.kind, folder.frame_count, folder.fps) == ("images", 3, None)
    frames = list(folder)
    assert len(frames) == 3 and folder.label(1).endswith("f1.png")
    np.testing.assert_array_equal(frames[2][0], image(2))
    assert open_source(str(tmp_path / "f*.png"), max_frames=2).frame_count == 2
    assert len(list(open_source(str(tmp_path / "f*.png"), max_frames=2))) == 2
    assert open_source(str(tmp_path / "f0.png")).frame_count == 1
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="no images match"):
        open_source(str(tmp_path / "*.jpg"))
    (tmp_path / "broken.avi").write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(str(tmp_path / "broken.avi"))
    with pytest.raises(SourceError, match="cannot open camera 97"):
        open_source("97")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        open_source(str(tmp_path / "empty"))


def test_a_live_source_that_stops_is_an_error_and_a_file_just_ends(tmp_path):
    video = write_video(tmp_path / "clip.avi", n=4)
    with open_source(str(video), max_frames=3) as source:
        assert source.frame_count == 3 and len(list(source)) == 3
    assert len(list(open_source(str(video)))) == 4
    live = open_source(str(video))
    live.live = True  # a camera unplugged after 4 frames looks like this
    with pytest.raises(SourceError, match="stopped delivering frames after 4"):
        list(live)


def test_the_heatmap_lines_up_with_the_frame_through_the_letterbox():
    # an 80x48 frame letterboxed into 64x64: ratio 0.8, 13 rows of padding on top; P3 is 8x8 cells of 8 pixels
    letterbox = {"original_height": 48, "original_width": 80, "input_height": 64, "input_width": 64,
                 "resized_height": 38, "resized_width": 64, "ratio_w": 0.8, "ratio_h": 0.8,
                 "pad_left": 0, "pad_top": 13, "pad_right": 0, "pad_bottom": 13}
    fmap = np.zeros((8, 8), np.float32)
    fmap[4, 2] = 1.0  # model-input pixels x 16..23, y 32..39 -> frame x 20..30, y 24..33
    heat = map_to_frame(fmap, letterbox)
    assert heat.shape == (48, 80)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 27 <= y <= 29 and 24 <= x <= 25
    # the padding rows never reach the frame: the top of the frame is model-input row 13
    top = np.zeros((8, 8), np.float32)
    top[0, :] = 1.0  # model-input rows 0..7 are all padding
    assert map_to_frame(top, letterbox).max() < 1e-6


def test_the_send_window_follows_the_servers_in_flight_default(engine):
    """With no max_in_flight, the client's window is twice what the server holds per stream by default."""
    with ServerThread(SlowEngine(engine, 0.005), ServerSettings(port=0, max_in_flight=3)) as srv:
        read = []

        def frames():
            for i in range(40):
                read.append(i)
                yield image(i)

        with FeatureClient(srv.address, timeout=60) as client:
            for result in client.stream(frames(), layers="P3"):
                assert len(read) - result.frame_id <= 2 * 3 + 1
        assert len(read) == 40


def test_closing_a_source_never_releases_a_capture_under_a_hanging_read():
    """A camera stuck in read(): close() from another thread leaves the capture alone (releasing under a read can
    crash OpenCV); the reading thread releases it once read() returns."""
    from yolostream.client.sources import Source

    class HangingCapture:
        def __init__(self) -> None:
            self.entered, self.go, self.released = threading.Event(), threading.Event(), False

        def read(self):
            self.entered.set()
            assert self.go.wait(timeout=30)
            return True, np.zeros((4, 4, 3), np.uint8)

        def release(self) -> None:
            self.released = True

    capture = HangingCapture()
    source = Source("fake camera", "camera", None, None, live=True, _capture=capture)
    frames = iter(source)
    reader = threading.Thread(target=lambda: (next(frames), frames.close()))
    reader.start()
    assert capture.entered.wait(timeout=30)
    source.close()
    assert not capture.released
    capture.go.set()
    reader.join(timeout=30)
    assert not reader.is_alive() and capture.released
