"""A front-end gives back what raw-frame floods made it allocate (issue 21 item 6).

Floods of raw 720p frames (2.7 MB each) that never read a reply, then go away: once they have ended, the
front-end's heap (its PSS without the shared-memory arena, as ``bench/abuse_memory.py`` counts it) comes back
near its warm value. Before the fix it stayed several times higher. The bound is generous and the wait bounded
(the trims run a second after calls end, or when the process goes quiet), so a loaded machine cannot make it flaky:
nothing here is timed.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from conftest import ServeProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import abuse_memory  # noqa: E402

MB = 1e6
#: How far above its warm heap a front-end may stay once the floods are over.
SLACK_MB = 50.0
SETTLE_S = 60.0


def _frontend_heap(pid: int) -> int:
    return abuse_memory.server_memory(pid)["front-end 0"]["heap"]


def test_front_end_heap_returns_near_warm_after_raw_frame_floods_end(tmp_path):
    server = ServeProcess(tmp_path, "--port", "0", "--device", "cpu", "--imgsz", "64", "--shm-mb", "32")
    try:
        address = server.wait_serving()
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        jpeg = abuse_memory._frames(2, jpeg=cv2.imencode(".jpg", image)[1].tobytes())
        raw = abuse_memory._frames(2, raw=np.random.default_rng(1).integers(
            0, 256, (*abuse_memory.RAW_HW, 3), dtype=np.uint8).tobytes())
        abuse_memory.legitimate(address, jpeg, raw, 1)
        warm = _frontend_heap(server.proc.pid)

        sent = abuse_memory.floods(address, raw, count=12, concurrency=4, in_flight=64, seconds=1.0)
        assert sent > 0

        deadline = time.monotonic() + SETTLE_S
        heap = _frontend_heap(server.proc.pid)
        while heap > warm + SLACK_MB * MB and time.monotonic() < deadline:
            time.sleep(1.0)
            heap = _frontend_heap(server.proc.pid)
        assert heap <= warm + SLACK_MB * MB, (
            f"front-end heap {warm / MB:.0f} MB warm, still {heap / MB:.0f} MB {SETTLE_S:.0f} s after "
            f"{sent} flood frames")
        abuse_memory.legitimate(address, jpeg, raw, 1)  # and it still serves
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.close()
