"""Shared test fixtures: the upstream reference data lives in ../shared/fixtures beside the repo."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a shared fixture, skipping the test with a clear reason when the folder is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent (tests read ../shared/fixtures beside the repo)")
    return path


@pytest.fixture(scope="session")
def layers_json() -> dict:
    return json.loads(fixture_path("yolov5n.layers.json").read_text())


@pytest.fixture(scope="session")
def fixture_weights() -> Path:
    return fixture_path("yolov5n.pt")


# A real ``yolostream serve`` process, and the small messages tests send it.

START_TIMEOUT = 60.0
SERVING = re.compile(r"^yolostream serving (\S+) on (\S+):(\d+) \((.*)\)$")


def serve_env() -> dict[str, str]:
    paths = [str(REPO / d) for d in ("protos", "server", "client")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("YOLOSTREAM_TOKEN", None)
    return env


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "yolostream.server.cli", "serve", *args]


class ServeProcess:
    """A ``yolostream serve`` subprocess: stdout read line by line on a thread, stderr to a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.stderr_path = tmp_path / f"serve-{os.getpid()}-{id(self)}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(serve_cmd(*args), stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=serve_env(), cwd=tmp_path)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.model = self.address = self.details = ""

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_serving(self) -> str:
        """Block until the start-up line; returns ``host:port``."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no 'serving' line within {START_TIMEOUT} s; stderr:\n{self.stderr()}")
            if line is None:
                raise AssertionError(f"server exited with {self.proc.wait()} before serving; stderr:\n{self.stderr()}")
            match = SERVING.match(line)
            if match:
                self.model, host, port, self.details = match.groups()
                self.address = f"{host}:{port}"
                return self.address

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._stderr.close()


def raw_frame(k: int, h: int = 48, w: int = 64) -> pb.Frame:
    data = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()
    return pb.Frame(frame_id=k, capture_timestamp_us=1000 + k,
                    raw=pb.RawImage(data=data, height=h, width=w, channels=3, format=pb.PIXEL_FORMAT_BGR))


def stream_config(max_in_flight: int = 4) -> pb.StreamRequest:
    return pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"]),
                                                   max_in_flight=max_in_flight))


def grpc_channel(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel
