"""Shared test fixtures: the upstream reference data lives in ../shared/fixtures beside the repo; ``ServeProcess`` runs
a real ``yolostream serve`` (the tests, and bench/scaleout_bench.py, which imports it from here)."""

from __future__ import annotations

import contextlib
import dataclasses
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


def cpu_runner(imgsz: int = 64, **options):
    """The built-in yolov5n (seeded random weights) on the CPU: the device runner most server tests serve."""
    from yolostream.server.model.loader import load_model
    from yolostream.server.device.engine import DeviceRunner

    return DeviceRunner(load_model(), device="cpu", imgsz=imgsz, **options)


@contextlib.contextmanager
def in_process_server(engine=None, **settings):
    """The server as ``serve`` prepares it, on threads in this process (``ServerThread``), on 127.0.0.1 and an
    ephemeral port; stopped (drained) on exit. ``engine``: default ``cpu_runner()``; ``settings``:
    ``ServerSettings`` fields."""
    from yolostream.server.common.settings import ServerSettings
    from yolostream.server.serve.in_process import ServerThread

    with ServerThread(engine if engine is not None else cpu_runner(), ServerSettings(port=0, **settings)) as server:
        yield server


@contextlib.contextmanager
def feature_stub(address: str):
    """A ``FeatureService`` stub on a fresh plaintext channel to ``address``, closed on exit."""
    from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.FeatureServiceStub(channel)


@dataclasses.dataclass
class EngineFeatures:
    """One frame's features as the served path computes them, and its letterbox."""

    features: dict[str, np.ndarray]
    letterbox: object


def engine_extract(engine, frames, layers, imgsz=None, policy=None) -> list[EngineFeatures]:
    """Features of ``frames`` through the engine's own launch/collect path (what a server sends, bit for bit): the
    reference server tests compare replies with. One batch per letterboxed shape, float32, unpooled."""
    resolved = engine.resolve(layers)
    prepared = [engine.preprocess(frame, imgsz, policy) for frame in frames]
    groups: dict[tuple, list[int]] = {}
    for k, (image, _) in enumerate(prepared):
        groups.setdefault(image.shape, []).append(k)
    keys = [(index, "none", "float32") for index in sorted({r.index for r in resolved})]
    results: dict[int, EngineFeatures] = {}
    for members in groups.values():
        done = engine.collect(engine.launch([prepared[k][0] for k in members], keys))
        for row, k in enumerate(members):
            features = {r.name: np.array(done.host[(r.index, "none", "float32")][row]) for r in resolved}
            results[k] = EngineFeatures(features, prepared[k][1])
    return [results[k] for k in range(len(frames))]


#: The float32 slack of the 8-bit codes' bound, per channel: units in the last place of its largest magnitude...
AFFINE_ULPS = 6 * 2.0**-24
#: ...and the rounding of a subnormal scale (see ``assert_affine_bound``).
AFFINE_TINY = 2.0**-142


def assert_affine_bound(x: np.ndarray, codes) -> None:
    """8-bit codes (``wire.AffineCodes``) decode to float32 values of ``x``'s shape within the per-element bound
    |x - decoded| <= scale/2 + 6 * 2**-24 * max(|min|, |max|) + 2**-142 per channel.

    That is half a step, plus the float32 rounding of the quantiser's subtraction, division and scale and of the
    decode (a few units in the last place of the channel's largest magnitude), plus, for a channel whose range is under
    255 * 2**-126 (about 3e-36), the rounding of a subnormal scale to the subnormal spacing 2**-149, which the top code
    can multiply by 255 (255 * 2**-150 < 2**-142).
    """
    decoded = codes.dequantize()
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    axis = codes.axis
    reduce = tuple(a for a in range(x.ndim) if a != axis)
    shape = (() if axis is None else tuple(-1 if a == axis else 1 for a in range(x.ndim)))
    s = codes.scales.astype(np.float64).reshape(shape)
    lo = np.min(x, axis=reduce, keepdims=True).astype(np.float64) if x.size else 0.0
    hi = np.max(x, axis=reduce, keepdims=True).astype(np.float64) if x.size else 0.0
    bound = s / 2 + AFFINE_ULPS * np.maximum(np.abs(lo), np.abs(hi)) + AFFINE_TINY
    err = np.abs(x.astype(np.float64) - decoded.astype(np.float64))
    assert (err <= bound).all(), f"worst excess {(err - bound).max()}"


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch intra-op threads (the count moves results by ulps), then restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """Upstream's fixture input and every layer's expected fp32 output (``yolov5n.expected.npz``)."""
    with np.load(fixture_path("yolov5n.expected.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def layers_json() -> dict:
    return json.loads(fixture_path("yolov5n.layers.json").read_text())


@pytest.fixture(scope="session")
def fixture_weights() -> Path:
    return fixture_path("yolov5n.pt")


# A real ``yolostream serve`` process, and the small messages tests send it.

START_TIMEOUT = 60.0
SERVING = re.compile(r"^yolostream serving (\S+) on (\S+):(\d+) \((.*)\)$")


def serve_env(**extra: str) -> dict[str, str]:
    """The environment of a ``yolostream`` subprocess: this checkout on PYTHONPATH, no inherited token, ``extra``."""
    paths = [str(REPO / d) for d in ("protos", "server", "client")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("YOLOSTREAM_TOKEN", None)
    env.update(extra)
    return env


def cli_cmd(*args: str) -> list[str]:
    """``yolostream ARGS…`` as a command line for this interpreter and checkout."""
    return [sys.executable, "-m", "yolostream.server.cli", *args]


def serve_cmd(*args: str) -> list[str]:
    return cli_cmd("serve", *args)


class ServeProcess:
    """A ``yolostream serve`` subprocess: stdout read line by line on a thread, stderr to a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.stderr_path = tmp_path / f"serve-{os.getpid()}-{id(self)}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(serve_cmd(*args), stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=env if env is not None else serve_env(), cwd=tmp_path)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.model = self.address = self.details = ""

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_serving(self, timeout: float = START_TIMEOUT) -> str:
        """Block until the start-up line, at most ``timeout`` s; returns ``host:port``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no 'serving' line within {timeout:g} s; stderr:\n{self.stderr()}")
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


def raw_frame(k: int, h: int = 48, w: int = 64, channels: int = 3) -> pb.Frame:
    """Seeded random pixels as a raw BGR frame (or GRAY with ``channels=1``)."""
    return frame_of(k, np.random.default_rng(k).integers(0, 256, (h, w, channels), dtype=np.uint8))


def frame_of(frame_id: int, image: np.ndarray) -> pb.Frame:
    """``image`` (H, W, 3) BGR or (H, W, 1) GRAY uint8 as a raw Frame, stamped ``1000 + frame_id`` µs."""
    h, w, channels = image.shape
    fmt = pb.PIXEL_FORMAT_BGR if channels == 3 else pb.PIXEL_FORMAT_GRAY
    return pb.Frame(frame_id=frame_id, capture_timestamp_us=1000 + frame_id,
                    raw=pb.RawImage(data=image.tobytes(), height=h, width=w, channels=channels, format=fmt))


def stream_config(max_in_flight: int = 4) -> pb.StreamRequest:
    return pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"]),
                                                   max_in_flight=max_in_flight))


def grpc_channel(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


def run_commands(commands: dict, cwd: Path, timeout: float = 120.0, parallel: int = 4) -> dict:
    """Run ``yolostream`` commands (name → argument list), ``parallel`` at a time; name → (stdout, stderr, exit code).

    Each start pays for importing torch, so they overlap; every one is killed if it outlives ``timeout``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def run(args: list[str]) -> tuple[str, str, int]:
        proc = subprocess.Popen(cli_cmd(*args), env=serve_env(), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return out, err, proc.returncode

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_one_line_error(name: str, outcome: tuple[str, str, int], command: str, words: list[str],
                          code: int = 2) -> str:
    """The command failed with ``code``, and stderr is exactly one ``yolostream COMMAND: error:`` line holding
    every one of ``words``, without a traceback; returns that line."""
    _, err, returncode = outcome
    lines = [line for line in err.splitlines() if line.strip()]
    assert returncode == code, f"{name}: exit {returncode}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
    assert lines[0].startswith(f"yolostream {command}: error: "), f"{name}: {lines[0]}"
    for word in words:
        assert word in lines[0], f"{name}: {word!r} not in {lines[0]!r}"
    return lines[0]


def self_signed_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A fresh self-signed certificate and key (``openssl req``) for ``san``; skips without the openssl command."""
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("TLS test needs the openssl command to make a self-signed certificate (not on PATH)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", f"subjectAltName={san}"], check=True, capture_output=True, timeout=60)
    return cert, key
