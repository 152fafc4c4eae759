"""Live sources survive their camera: a real MJPEG-over-HTTP camera (``mjpeg_server.py``, in its own process on an
ephemeral 127.0.0.1 port, read by OpenCV's FFmpeg backend) is killed, frozen and restarted under a reading source and
under a gRPC stream. The stream goes on after the restart and the gap is counted; a camera that never comes back
ends with one SourceError naming it, without its password, within the configured time.

Every wait is bounded and generous (a minute where the configured time is a few seconds); no assertion depends on how
fast this machine is or on when a sleep ends.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from yolostream.client import FeatureClient, SourceError, open_source
from yolostream.client.sources import Source

from conftest import cpu_runner, in_process_server

SERVER_SCRIPT = Path(__file__).with_name("mjpeg_server.py")
#: The most any step may take here; the timeouts under test are a few seconds.
BOUND_S = 60.0
BEFORE, AFTER = 40, 200  # grey level of the camera's frames before and after its restart


class Camera:
    """``mjpeg_server.py`` processes: start one, kill it, freeze it (SIGSTOP), start it again on the same port."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, shade: int, frames: int | None = None) -> int:
        args = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--shade", str(shade)]
        self.process = subprocess.Popen(args + (["--frames", str(frames)] if frames else []), stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), f"the camera did not start: {line!r}"
        self.port = int(line.split()[1])
        return self.port

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}/video"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=BOUND_S)

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def camera() -> Iterator[Camera]:
    cam = Camera()
    try:
        yield cam
    finally:
        cam.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def shade(frame: np.ndarray) -> int:
    return int(round(float(frame.mean())))


def read_in_background(source: Source) -> tuple[queue.Queue, threading.Thread]:
    """Iterate ``source`` in a thread: each frame's grey level goes into the queue, then its error or None."""
    out: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for frame, _ in source:
                out.put(shade(frame))
        except BaseException as err:  # handed to the test
            out.put(err)
        else:
            out.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return out, thread


def next_shade(frames: queue.Queue) -> int:
    item = frames.get(timeout=BOUND_S)
    assert isinstance(item, int), f"the source ended: {item!r}"
    return item


def test_a_killed_camera_that_restarts_resumes_the_source_and_the_gap_is_counted(camera):
    camera.start(BEFORE)
    source = open_source(camera.url(), give_up_after=BOUND_S * 2, timeout=5)
    assert source.kind == "stream" and source.live and source.frame_count is None
    frames, reader = read_in_background(source)
    try:
        assert [next_shade(frames) for _ in range(3)] == [BEFORE] * 3
        assert source.reconnects == 0 and source.gap_s == 0.0 and not source.reconnecting
        camera.kill()
        wait_until(lambda: source.reconnecting, "the source to notice its camera died")
        assert source.gap_s > 0.0
        camera.start(AFTER)
        deadline = time.monotonic() + BOUND_S
        while next_shade(frames) != AFTER:  # frames read before the kill may still be queued
            assert time.monotonic() < deadline
        assert [next_shade(frames) for _ in range(3)] == [AFTER] * 3, "frames go on after the restart"
        assert source.reconnects >= 1 and not source.reconnecting
        gap = source.gap_s
        assert gap > 0.0 and source.gap_s == gap, "the ended outage is counted once and no longer grows"
    finally:
        source.close()
        reader.join(timeout=BOUND_S)
    assert not reader.is_alive(), "closing a live source stops its iteration"


def test_a_camera_that_never_comes_back_ends_with_one_error_naming_it_without_its_password(camera):
    camera.start(BEFORE)
    url = camera.url("admin:hunter2@")
    source = open_source(url, give_up_after=2.0, timeout=1.0)
    assert "hunter2" not in source.description and "admin:***@127.0.0.1" in source.description
    frames, reader = read_in_background(source)
    next_shade(frames)
    camera.kill()
    started = time.monotonic()
    item = frames.get(timeout=BOUND_S)
    while isinstance(item, int):
        item = frames.get(timeout=BOUND_S)
    assert time.monotonic() - started < BOUND_S
    assert isinstance(item, SourceError), item
    message = str(item)
    assert "hunter2" not in message and f"stream http://admin:***@127.0.0.1:{camera.port}/video" in message
    assert "gave up after 2 s" in message and "--give-up-after" in message
    reader.join(timeout=BOUND_S)
    assert source.reconnecting and source.gap_s >= 2.0


def test_a_frozen_camera_is_noticed_by_the_read_timeout_and_given_up_on(camera):
    """SIGSTOP keeps the camera's connections and port open but sends nothing: without OpenCV's read and open
    timeouts, the read (and every reopening, which the kernel still accepts) would block for OpenCV's 30 s each."""
    camera.start(BEFORE)
    source = open_source(camera.url(), give_up_after=2.0, timeout=1.0)
    frames, reader = read_in_background(source)
    next_shade(frames)
    camera.freeze()
    item = frames.get(timeout=BOUND_S)
    while isinstance(item, int):
        item = frames.get(timeout=BOUND_S)
    assert isinstance(item, SourceError) and "gave up after 2 s" in str(item)
    reader.join(timeout=BOUND_S)


def test_a_grpc_stream_stays_open_while_its_camera_restarts(camera):
    camera.start(BEFORE)
    source = open_source(camera.url(), give_up_after=BOUND_S * 2, timeout=5)
    seen: list[int] = []
    with in_process_server(cpu_runner(64)) as server, FeatureClient(server.address) as client:
        with client.stream(source, layers="P3", pooling="avg", keep_images=True) as results:
            restarted = False
            deadline = time.monotonic() + 3 * BOUND_S
            for result in results:
                assert result.ok, result.error
                assert result.frame_id == len(seen), "every frame is answered once, in order"
                seen.append(shade(result.image))
                if len(seen) == 3 and not restarted:
                    # Restarted at once: the killed camera's connection is gone whenever the source reads next
                    # (flow control may hold the source until these answers are read), so it must reconnect.
                    camera.kill()
                    camera.start(AFTER)
                    restarted = True
                if seen[-3:] == [AFTER] * 3:
                    break
                assert time.monotonic() < deadline, f"no frames of the restarted camera: {seen}"
    assert seen[:3] == [BEFORE] * 3 and seen[-1] == AFTER
    assert source.reconnects >= 1 and source.gap_s > 0.0


def test_the_stream_command_gives_up_with_one_line_and_reports_the_gap(camera, capsys):
    """The camera dies by itself after 5 frames (the command holds the test's thread meanwhile)."""
    from yolostream.server import cli
    camera.start(BEFORE, frames=5)
    with in_process_server(cpu_runner(64)) as server:
        code = cli.main(["stream", camera.url("viewer:s3cret@"), "--server", server.address, "--layers", "P3",
                         "--pool", "avg", "--give-up-after", "2", "--source-timeout", "1", "-q"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "s3cret" not in out + err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "viewer:***@127.0.0.1" in error_lines[0]
    assert "gave up after 2 s" in error_lines[0]
    assert "answered" in out and "0 reconnect(s)" in out and "s without frames" in out


def test_source_options_are_checked_and_urls_are_shown_without_secrets():
    from yolostream.client.sources import redact_url

    with pytest.raises(ValueError, match="give_up_after"):
        open_source("http://127.0.0.1:9/none", give_up_after=-1)
    with pytest.raises(ValueError, match="timeout"):
        open_source("http://127.0.0.1:9/none", timeout=0)
    with pytest.raises(SourceError, match=r"cannot open stream http://u:\*\*\*@127\.0\.0\.1:9/none"):
        open_source("http://u:pw@127.0.0.1:9/none", timeout=1)
    assert redact_url("rtsp://cam/live?user=admin&pwd=x&res=hd") == "rtsp://cam/live?user=admin&pwd=***&res=hd"
    assert len(redact_url("rtsp://cam/" + "a" * 10_000)) == 160


def test_a_video_file_ends_without_reconnecting(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for level in (10, 20, 30):
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()
    source = open_source(str(path), give_up_after=BOUND_S)
    assert not source.live and source.give_up_after == 0
    assert len(list(source)) == 3 and source.reconnects == 0 and source.gap_s == 0.0 and not source.reconnecting


def test_the_stream_command_checks_its_source_flags(capsys):
    from yolostream.server import cli

    for flags, message in ((["--give-up-after", "-1"], "--give-up-after must be >= 0"),
                           (["--source-timeout", "0"], "--source-timeout must be a positive number")):
        assert cli.main(["stream", "0", *flags]) == 2
        assert message in capsys.readouterr().err
