"""Shared test fixtures: the upstream reference data lives in ../shared/fixtures beside the repo; ``ServeProcess``
(from bench/server_proc.py, which the scale-out benchmark uses too) runs a real ``yolostream serve``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
sys.path.insert(0, str(REPO / "bench"))

from server_proc import ServeProcess, serve_cmd, serve_env  # noqa: E402,F401  (shared with the benchmarks)


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


# The small messages tests send a server.

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
