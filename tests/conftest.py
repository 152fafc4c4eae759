"""Shared test fixtures: the upstream reference data lives in ../shared/fixtures beside the repo; ``ServeProcess``
runs a real ``yolostream serve`` (test_serve_process, test_scaleout)."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


START_TIMEOUT = 60.0
SERVING = re.compile(r"^yolostream serving (\S+) on (\S+):(\d+) \((.*)\)$")


def serve_env() -> dict[str, str]:
    """The environment of a server subprocess: the checkout importable, no token inherited from the caller."""
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


def self_signed_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A throw-away EC certificate and key for ``san`` (e.g. ``DNS:localhost,IP:127.0.0.1``), made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("TLS test needs the openssl command to make a self-signed certificate (not on PATH)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", f"subjectAltName={san}"], check=True, capture_output=True, timeout=60)
    return cert, key
