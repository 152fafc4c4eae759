"""A network camera for tests: MJPEG over HTTP (``multipart/x-mixed-replace``), as IP cameras and ``motion`` serve it.

Run as a script in its own process, so a test can kill it (the camera dies), SIGSTOP it (the camera freezes with its
connections open) and start it again on the same port (the camera comes back)::

    python tests/mjpeg_server.py --port 0 --shade 40 --fps 20 [--frames N]

It prints ``PORT <n>`` on stdout once it listens; with ``--frames N`` the whole process exits once it has sent N
frames (a camera that dies by itself, for tests that cannot reach it while they wait). Every frame is a 64x48 JPEG
of one flat grey ``--shade``, so a reader can tell which run of the server a frame came from. Only the
standard library, numpy and OpenCV are used.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = "yolostreamframe"


def jpeg(shade: int) -> bytes:
    """One 64x48 frame of a flat grey, JPEG-encoded."""
    ok, data = cv2.imencode(".jpg", np.full((48, 64, 3), shade, np.uint8))
    assert ok
    return data.tobytes()


def serve(port: int, shade: int, fps: float, frames: int | None = None) -> None:
    """Serve the MJPEG stream on 127.0.0.1:``port`` (0: an ephemeral port) until killed, or until ``frames`` frames
    have been sent in all."""
    frame = jpeg(shade)
    period = 1.0 / fps
    sent = itertools.count(1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                     f"Content-Length: {len(frame)}\r\n\r\n".encode() + frame + b"\r\n")
                    self.wfile.flush()
                    if frames is not None and next(sent) >= frames:
                        os._exit(0)  # the camera dies: connections drop, the port stops answering
                    time.sleep(period)
            except (BrokenPipeError, ConnectionResetError):
                return

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
            return

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shade", type=int, default=128, help="grey level of every frame (0..255)")
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--frames", type=int, help="exit after sending this many frames")
    args = parser.parse_args(argv)
    serve(args.port, args.shade, args.fps, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
