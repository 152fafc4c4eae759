"""Same host (issue 20): shared memory against gRPC over a Unix socket and gRPC over TCP loopback.

Every way uses the client library (``FeatureClient``, one client process, one stream), so the client CPU is what
a user's process spends, and the server is ``server_proc.py`` with ``--allow-client-shm --uds``:

- **shm**: ``FeatureClient("unix://…", shared_memory=True)``: raw frames written into the stream's region, the
  features read as views of it; only offsets travel in the messages (over the Unix socket);
- **uds**: ``FeatureClient("unix://…")``, raw frames and features in the messages;
- **tcp**: ``FeatureClient("127.0.0.1:PORT")``, the same over TCP loopback (what every client paid before).

Two tables. *Throughput and CPU* (model bypassed, ``ModelBypass``: replies of their real size, no layer runs),
per reply size and input: a 640×1 raw strip (letterboxed to the square by padding only, as in the transport
section: the reply's cost alone) and a raw 1080p frame (the input's cost too), ``in_flight`` frames in flight.
*Latency at camera rate* (the real model, one device worker): a raw 1080p stream paced at ``rate`` frames/s,
its p50 against the engine's batch-1 time for the same letterboxed input, layers and threads, measured here
in-process before the server starts. ``targets`` sets both against the three goals of issue 20.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from e2e_bench import TIMING_STAGES, ClientWindow, run_clients, synthetic_frame
from report import median, median_row, percentiles, rotated
from server_proc import ServerProcess, server_args
from transport_bench import TransportCase

MB = 1e6
WAYS = ("shm", "uds", "tcp")
#: The bench's inputs by name: (height, width) of a raw BGR frame.
INPUTS = {"strip": (1, 640), "1080p": (1080, 1920)}


@dataclass(frozen=True)
class ClientSpec:
    """One client process's stream: where, which way, the frame, the options, the pace and the window."""

    way: str
    target: str
    height: int
    width: int
    layers: tuple[str, ...]
    dtype: str
    imgsz: int
    square: bool
    max_in_flight: int
    rate: float
    warm_s: float
    duration_s: float


def _image(height: int, width: int) -> np.ndarray:
    if height < 16:  # the strip: its pixels do not matter, and the synthetic scene needs some height
        return np.zeros((height, width, 3), np.uint8)
    return synthetic_frame(height, width)


def client_worker(spec: ClientSpec, window: ClientWindow | None, prepared: Any = None) -> Any:
    """Client-process entry: connect when ``window`` is None; else stream until the driver closes the window and
    return the per-frame send and receive times, batch sizes, statuses, reply bytes and server timings."""
    from yolostream.client import FeatureClient

    if window is None:
        # settle_s=0: one server, so no replicas to wait for (a unix: target would otherwise wait 0.5 s)
        client = FeatureClient(spec.target, shared_memory=spec.way == "shm", timeout=60, settle_s=0)
        client.model_info()
        return client, _image(spec.height, spec.width)
    client, image = prepared
    start_at = window.start_at

    def frames():
        left = start_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        i = 0
        while True:
            if spec.rate > 0:
                left = start_at + i / spec.rate - time.perf_counter()
                if left > 0:
                    time.sleep(left)
            if window.closed(time.perf_counter()):
                return
            yield image
            i += 1

    sent, received, batch, ok, reply_bytes = [], [], [], [], 0
    stages: dict[str, list[float]] = {name: [] for name in TIMING_STAGES}
    with client:
        for result in client.stream(frames(), layers=spec.layers, dtype=spec.dtype, imgsz=spec.imgsz or None,
                                    letterbox="square" if spec.square else None, encoding="raw",
                                    max_in_flight=spec.max_in_flight):
            now = window.answered()
            received.append(now)
            sent.append(now - result.latency)
            batch.append(result.batch_size)
            ok.append(result.ok)
            for name in TIMING_STAGES:
                stages[name].append(result.timings_us[name])
            if result.ok and not reply_bytes:
                reply_bytes = sum(array.nbytes for array in result.features.values())
    return {"sent": np.asarray(sent), "received": np.asarray(received), "batch": np.asarray(batch),
            "ok": np.asarray(ok, bool), "reply_bytes": reply_bytes, "error_count": int(len(ok) - sum(ok)),
            "timings_us": {name: np.asarray(values, np.float64) for name, values in stages.items()}}


def _targets(server: ServerProcess, uds: Path) -> dict[str, str]:
    return {"shm": f"unix://{uds}", "uds": f"unix://{uds}", "tcp": server.address}


def _per_msg(seconds: float | None, frames: int) -> float | None:
    return seconds / frames * 1000.0 if seconds is not None and frames else None


def _row(window: Any, **fields: Any) -> dict[str, Any]:
    stats = percentiles(window.latencies_ms)
    server = _per_msg(window.cpu_s, window.frames)
    client = _per_msg(window.client_cpu_s, window.frames)
    by_role = {role: _per_msg(seconds, window.frames) for role, seconds in window.cpu_by_role_s.items()}
    frontend = by_role.get("frontends")
    return {**fields, "msgs_s": window.fps, "frames": window.frames, "reply_bytes": window.reply_bytes,
            "mb_s": window.fps * window.reply_bytes / MB, "p50_ms": stats["p50"], "p99_ms": stats["p99"],
            "server_cpu_ms_per_msg": server, "client_cpu_ms_per_msg": client,
            "cpu_ms_per_msg": server + client if server is not None and client is not None else None,
            "frontend_cpu_ms_per_msg": frontend, "device_cpu_ms_per_msg": by_role.get("device"),
            "frontend_client_cpu_ms_per_msg": frontend + client if frontend is not None and client is not None
            else None,
            "errors": window.errors,
            "server_timings_ms": {k.removesuffix("_us"): v / 1000.0 for k, v in window.timings_us.items()},
            "other_cpu_cores": max(0.0, window.machine_busy_s - window.client_cpu_s - (window.cpu_s or 0.0))
            / window.duration_s}


def run_samehost(cases: Sequence[TransportCase], *, inputs: Sequence[str] = ("strip", "1080p"), in_flight: int = 8,
                 warm_s: float = 0.5, duration_s: float = 3.0, rounds: int = 1, min_frames: int = 1,
                 progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Throughput and CPU per message, model bypassed: one row per (reply size, input, way), the median of
    ``rounds`` measurements, the ways interleaved and the first one rotating each round (a loaded machine's load
    then hits every way alike)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="yolostream-samehost-") as tmp:
        uds = Path(tmp) / "ys.sock"
        for case in cases:
            args = server_args(case.cfg, case.imgsz, device="cpu", bypass=True, frontends=1, uds=str(uds),
                               client_shm=True)
            with ServerProcess(args) as server:
                targets = _targets(server, uds)
                for name in inputs:
                    height, width = INPUTS[name]
                    measured: dict[str, list[dict]] = {way: [] for way in WAYS}
                    for r in range(rounds):
                        for way in rotated(WAYS, r):
                            spec = ClientSpec(way, targets[way], height, width, case.layers, case.dtype, case.imgsz,
                                              True, in_flight, 0.0, warm_s, duration_s)
                            window = run_clients(client_worker, [spec], warm_s=warm_s, duration_s=duration_s,
                                                 min_frames=min_frames, cpu_seconds=server.cpu_seconds,
                                                 cpu_by_role=server.cpu_by_role)
                            measured[way].append(_row(window, what=case.what, input=name, way=way,
                                                      in_flight=in_flight))
                    for way in WAYS:
                        row = median_row(measured[way])
                        row["msgs_s_rounds"] = [r["msgs_s"] for r in measured[way]]
                        rows.append(row)
                        progress(f"samehost {case.what}, {name}, {way}: {row['msgs_s']:.0f} msgs/s, server+client "
                                 f"{row['cpu_ms_per_msg'] or 0:.2f} CPU-ms/msg")
            uds.unlink(missing_ok=True)
    return rows


def engine_b1_ms(cfg: str, imgsz: int, device: str, half: bool, layers: Sequence[str], dtype: str,
                 hw: tuple[int, int], repeats: int, warmup: int, threads: int | None) -> tuple[float, str]:
    """The engine's batch-1 milliseconds (median) for a ``hw`` frame letterboxed as the server does it (``auto``),
    the way the micro-batcher runs it, with ``threads`` torch threads (None: as set); and the input's shape."""
    import torch

    from engine_bench import time_interleaved
    from yolostream.server.device.engine import DeviceRunner
    from yolostream.server.model.loader import load_model

    engine = DeviceRunner(load_model(cfg=cfg), device=device, half=half, imgsz=imgsz)
    frame, _ = engine.preprocess(synthetic_frame(*hw))
    keys = [(r.index, "none", dtype) for r in engine.resolve(list(layers))]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def run() -> None:
        engine.collect(engine.launch([frame], keys))
        sync()

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        (times,) = time_interleaved([run], repeats, warmup)
    finally:
        torch.set_num_threads(before)
    return median(times), f"{frame.shape[0]}x{frame.shape[1]}"


def run_samehost_camera(cfg: str, imgsz: int, *, device: str, half: bool, threads: int | None, layers: str,
                        dtype: str, rate: float, hw: tuple[int, int], warm_s: float, duration_s: float,
                        repeats: int = 11, warmup: int = 2, min_frames: int = 1,
                        progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Latency at camera rate through each way: one raw ``hw`` stream paced at ``rate``, the real model with one
    device worker of ``threads`` torch threads; p50 and p99 against the engine's batch-1 time for the same input
    and threads."""
    names = tuple(layers.split(","))
    engine_ms, shape = engine_b1_ms(cfg, imgsz, device, half, names, dtype, hw, repeats, warmup, threads)
    progress(f"samehost camera: engine batch 1 on {shape}: {engine_ms:.1f} ms")
    rows = []
    with tempfile.TemporaryDirectory(prefix="yolostream-samehost-") as tmp:
        uds = Path(tmp) / "ys.sock"
        args = server_args(cfg, imgsz, device=device, half=half, threads=threads, workers=1, uds=str(uds),
                           client_shm=True)
        with ServerProcess(args) as server:
            targets = _targets(server, uds)
            for way in WAYS:
                spec = ClientSpec(way, targets[way], *hw, names, dtype, imgsz, False, 8, rate, warm_s, duration_s)
                window = run_clients(client_worker, [spec], warm_s=warm_s, duration_s=duration_s,
                                     min_frames=min_frames, cpu_seconds=server.cpu_seconds,
                                     cpu_by_role=server.cpu_by_role)
                row = _row(window, way=way, input=f"{hw[1]}x{hw[0]} raw", layers=layers, dtype=dtype, rate=rate,
                           model_input=shape, engine_b1_ms=engine_ms,
                           mean_batch=float(window.batch_sizes.mean()) if window.batch_sizes.size else None)
                row["p50_vs_engine"] = row["p50_ms"] / engine_ms if row["p50_ms"] is not None else None
                row["p99_vs_engine"] = row["p99_ms"] / engine_ms if row["p99_ms"] is not None else None
                rows.append(row)
                progress(f"samehost camera {way}: {row['msgs_s']:.1f} frames/s, p50 {row['p50_ms'] or 0:.1f} ms "
                         f"({row['p50_vs_engine'] or 0:.2f}x engine b1)")
    return rows


def targets(rows: Sequence[dict], camera: Sequence[dict], cases: Sequence[TransportCase],
            transport: Sequence[dict] = ()) -> list[dict]:
    """The three goals of issue 20, on the strip rows (the reply's cost alone) and the camera rows; with the
    transport section's rows of the same run, messages/s are also set against its raw-stub gRPC client (one
    front-end), the "today" of the issue."""
    def pick(source: Sequence[dict], **match: Any) -> dict | None:
        return next((r for r in source if all(r.get(k) == v for k, v in match.items())), None)

    small, large = cases[0].what, cases[-1].what
    out = []
    shm_large = pick(rows, what=large, input="strip", way="shm")
    grpc_small = pick(rows, what=small, input="strip", way="tcp")
    tcp_large = pick(rows, what=large, input="strip", way="tcp")
    if shm_large and grpc_small and shm_large["cpu_ms_per_msg"] and grpc_small["cpu_ms_per_msg"]:
        ratio = shm_large["cpu_ms_per_msg"] / grpc_small["cpu_ms_per_msg"]
        out.append({"goal": f"server+client CPU per frame: shm {large} ≤ gRPC (TCP) {small}",
                    "measured": f"{shm_large['cpu_ms_per_msg']:.2f} ÷ {grpc_small['cpu_ms_per_msg']:.2f} ms",
                    "ratio": ratio, "limit": "≤ 1", "met": ratio <= 1.0})
    if shm_large and grpc_small and shm_large["frontend_client_cpu_ms_per_msg"] \
            and grpc_small["frontend_client_cpu_ms_per_msg"]:
        ratio = shm_large["frontend_client_cpu_ms_per_msg"] / grpc_small["frontend_client_cpu_ms_per_msg"]
        out.append({"goal": "the same without the device process (front-end + client: moving the bytes, not "
                            "making them)",
                    "measured": f"{shm_large['frontend_client_cpu_ms_per_msg']:.2f} ÷ "
                                f"{grpc_small['frontend_client_cpu_ms_per_msg']:.2f} ms",
                    "ratio": ratio, "limit": "≤ 1", "met": ratio <= 1.0})
    if shm_large and tcp_large and tcp_large["msgs_s"]:
        ratio = shm_large["msgs_s"] / tcp_large["msgs_s"]
        out.append({"goal": f"messages/s, {large}: shm ≥ 5× gRPC (TCP)",
                    "measured": f"{shm_large['msgs_s']:.0f} ÷ {tcp_large['msgs_s']:.0f} msgs/s",
                    "ratio": ratio, "limit": "≥ 5", "met": ratio >= 5.0})
    raw_stub = pick(transport, what=large, frontends=1)
    if shm_large and raw_stub and raw_stub["grpc_msgs_s"]:
        ratio = shm_large["msgs_s"] / raw_stub["grpc_msgs_s"]
        out.append({"goal": f"messages/s, {large}: shm ≥ 5× the transport section's raw-stub gRPC client",
                    "measured": f"{shm_large['msgs_s']:.0f} ÷ {raw_stub['grpc_msgs_s']:.0f} msgs/s",
                    "ratio": ratio, "limit": "≥ 5", "met": ratio >= 5.0})
    shm_camera = pick(camera, way="shm")
    if shm_camera and shm_camera["p50_vs_engine"] is not None:
        out.append({"goal": "p50 at camera rate, shm: ≤ 1.3× the engine's batch-1 time",
                    "measured": f"{shm_camera['p50_ms']:.1f} ÷ {shm_camera['engine_b1_ms']:.1f} ms",
                    "ratio": shm_camera["p50_vs_engine"], "limit": "≤ 1.3",
                    "met": shm_camera["p50_vs_engine"] <= 1.3})
    return out
