"""End to end through gRPC on loopback: concurrent streams, each in its own client process, against a server process.

Every client talks to the server with the raw generated stubs (no client library), streams one pre-encoded
frame over and over, either as fast as its in-flight window allows or paced at a camera rate, and timestamps
each frame from the moment its request is handed to gRPC until its answer arrives. All clients start together;
only the frames answered inside the measuring window count for throughput, and the server's CPU time is read
at the window's two ends. The driver owns the window: it lasts ``duration_s`` and, on a machine too slow or too
loaded for that, until every client has had ``min_frames`` answers inside it (``SharedWindow``). This module
imports neither torch nor the server package: the clients stay light.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import psutil

from report import percentiles

MESSAGE_LIMIT = 128 * 1024 * 1024
#: How much longer than its ``duration_s`` a window may wait for every client's ``min_frames`` answers before the
#: run fails: generous, so that only a stalled server or client trips it, never a slow machine.
WINDOW_TIMEOUT_S = 120.0
#: The server's per-frame Timings fields, averaged per cell.
TIMING_STAGES = ("queued_us", "preprocess_us", "compute_us", "encode_us")
LAYER_SETS = {"backbone": ("backbone",), "P3,P4,P5": ("P3", "P4", "P5")}


def synthetic_frame(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A natural-looking BGR test image: sky and ground gradients, soft-edged shapes, texture and sensor noise.

    Pure noise would make JPEGs several times larger than camera frames; this compresses like a real scene.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * 0.45
    sky = np.stack([230 - 60 * yy / horizon, 200 - 40 * yy / horizon, 150 - 30 * yy / horizon], axis=-1)
    ground_t = (yy - horizon) / (height - horizon)
    ground = np.stack([70 + 30 * ground_t, 110 + 20 * ground_t, 90 + 40 * ground_t], axis=-1)
    img = np.where((yy < horizon)[..., None], sky, ground)
    img += 12 * np.sin(xx / 23.0 + np.cos(yy / 31.0))[..., None]
    canvas = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(14):
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(int(horizon) - 40, height))
        if rng.random() < 0.5:
            w, h = int(rng.integers(30, 160)), int(rng.integers(30, 140))
            cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.circle(canvas, (x, y), int(rng.integers(12, 70)), colour, -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.6)
    noise = rng.normal(0, 3.0, canvas.shape)
    return np.clip(canvas.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


@dataclass(frozen=True)
class FramePayload:
    """One frame as it goes on the wire: JPEG bytes, or raw BGR pixels of ``height`` × ``width``."""

    kind: str
    data: bytes
    height: int
    width: int

    @staticmethod
    def of(image: np.ndarray, kind: str) -> "FramePayload":
        if kind == "jpeg":
            return FramePayload("jpeg", encode_jpeg(image), image.shape[0], image.shape[1])
        if kind == "raw":
            return FramePayload("raw", np.ascontiguousarray(image).tobytes(), image.shape[0], image.shape[1])
        raise ValueError(f"unknown input kind {kind!r}: choose jpeg or raw")


@dataclass(frozen=True)
class StreamSpec:
    """What one client process sends, how, and for how long at least (seconds on the shared monotonic clock)."""

    address: str
    payload: FramePayload
    layers: tuple[str, ...] = ("backbone",)
    dtype: str = "float32"
    max_in_flight: int = 8
    rate: float = 0.0
    warm_s: float = 0.5
    duration_s: float = 3.0
    imgsz: int = 0
    square: bool = False
    #: Paced streams start this many seconds after the others: independent cameras are not in lockstep.
    phase: float = 0.0


def _stub(address: str):
    import grpc

    from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

    options = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]
    channel = grpc.insecure_channel(address, options=options)
    grpc.channel_ready_future(channel).result(timeout=60)
    return channel, pb_grpc.FeatureServiceStub(channel)


def frame_message(payload: FramePayload, frame_id: int, timestamp_us: int):
    from yolostream.v1 import feature_service_pb2 as pb

    if payload.kind == "jpeg":
        frame = pb.Frame(frame_id=frame_id, capture_timestamp_us=timestamp_us, encoded=payload.data)
    else:
        frame = pb.Frame(frame_id=frame_id, capture_timestamp_us=timestamp_us,
                         raw=pb.RawImage(data=payload.data, height=payload.height, width=payload.width, channels=3,
                                         format=pb.PIXEL_FORMAT_BGR))
    return pb.StreamRequest(frame=frame)


def config_message(spec: StreamSpec):
    from yolostream.v1 import feature_service_pb2 as pb
    from yolostream.v1 import wire

    options = pb.FeatureOptions(layers=list(spec.layers), dtype=wire.dtype_from_name(spec.dtype), imgsz=spec.imgsz,
                                letterbox=pb.LETTERBOX_POLICY_SQUARE if spec.square else 0)
    return pb.StreamRequest(config=pb.StreamConfig(options=options, max_in_flight=spec.max_in_flight))


def run_stream(spec: StreamSpec, window: ClientWindow, connected: tuple | None = None) -> dict[str, Any]:
    """Stream from the window's start until the driver closes it; per frame: send and receive times, batch size,
    status.

    Paced streams (``rate`` > 0) send frame i at ``start_at + i / rate``, or as soon as an in-flight slot frees
    when behind; latency is always counted from the moment a frame is handed to gRPC.
    """
    from yolostream.v1 import feature_service_pb2 as pb

    channel, stub = connected or _stub(spec.address)
    start_at = window.start_at
    slots = threading.Semaphore(spec.max_in_flight)
    sent: list[float] = []

    def requests():
        yield config_message(spec)
        _sleep_until(start_at)
        i = 0
        while True:
            if spec.rate > 0:
                _sleep_until(start_at + spec.phase + i / spec.rate)
            if not slots.acquire(timeout=120):
                return
            now = time.perf_counter()
            if window.closed(now):
                slots.release()
                return
            sent.append(now)
            yield frame_message(spec.payload, i, int(now * 1e6))
            i += 1

    received, batch, ok, reply_bytes = [], [], [], 0
    stages = {name: [] for name in TIMING_STAGES}
    try:
        for response in stub.StreamFeatures(requests(), timeout=rpc_timeout_s(spec)):
            received.append(window.answered())
            slots.release()
            result = response.result
            batch.append(result.batch_size)
            ok.append(result.status == pb.FRAME_STATUS_OK)
            for name in TIMING_STAGES:
                stages[name].append(getattr(result.timings, name))
            if not reply_bytes:
                reply_bytes = response.ByteSize()
    finally:
        channel.close()
    n = len(received)
    return {"sent": np.asarray(sent[:n]), "received": np.asarray(received), "batch": np.asarray(batch),
            "ok": np.asarray(ok, bool), "reply_bytes": reply_bytes, "error_count": int(n - sum(ok)),
            "timings_us": {name: np.asarray(values, np.float64) for name, values in stages.items()}}


def rpc_timeout_s(spec: Any) -> float:
    """A client stream's gRPC deadline (``spec`` has ``warm_s`` and ``duration_s``): past the longest window
    ``run_clients`` may hold open, with time to spare for the answers still in flight."""
    return spec.warm_s + spec.duration_s + WINDOW_TIMEOUT_S + 300


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


@dataclass
class SharedWindow:
    """The measuring window in shared memory, between the driver and its client processes.

    The driver owns both ends: it sets the common start, and closes the window once it has lasted ``duration_s``
    and every client has had ``min_frames`` answers inside it (``close_window``). Clients never compute the end
    themselves: they poll it, stop sending once it has passed, and count their answers inside it. A slow or loaded
    machine therefore makes the window longer instead of empty, and frames/s stays frames over real seconds.
    Times are ``time.perf_counter()`` values: the monotonic clock every process on the machine shares.
    """

    #: the common start (the clients' first send)
    start_at: Any
    #: the window's start: the common start plus the warm-up
    opens_at: Any
    #: the window's end, +inf until the driver closes it
    closes_at: Any
    #: per client, its answers inside the window so far
    answers: Any

    @staticmethod
    def create(ctx: Any, clients: int) -> "SharedWindow":
        """A window for ``clients`` processes of ``ctx``, open forever until the driver closes it."""
        return SharedWindow(ctx.RawValue("d", 0.0), ctx.RawValue("d", math.inf), ctx.RawValue("d", math.inf),
                            ctx.RawArray("q", clients))


@dataclass(frozen=True)
class ClientWindow:
    """One client's side of a ``SharedWindow``: when to start, whether to stop sending, and its answer count."""

    shared: SharedWindow
    slot: int

    @property
    def start_at(self) -> float:
        return self.shared.start_at.value

    def closed(self, now: float) -> bool:
        """Whether the driver has closed the window by ``now``: the client sends nothing more."""
        return now >= self.shared.closes_at.value

    def inside(self, now: float) -> bool:
        """Whether ``now`` falls inside the window as the driver has set it so far."""
        return self.shared.opens_at.value <= now < self.shared.closes_at.value

    def answered(self) -> float:
        """Record an answer arriving now (counted when inside the window, which the driver waits on); its time."""
        now = time.perf_counter()
        if self.inside(now):
            self.shared.answers[self.slot] += 1
        return now


def close_window(opens_at: float, duration_s: float, answers: Callable[[], Sequence[int]], min_frames: int,
                 ended: Callable[[], bool], timeout_s: float = WINDOW_TIMEOUT_S) -> float | None:
    """Wait until the window opened at ``opens_at`` has lasted ``duration_s`` and every client's count in
    ``answers()`` has reached ``min_frames``; return the window's end (``perf_counter`` time).

    The end is read after the counts, so every answer counted is inside it. Returns None as soon as ``ended()``
    says a client stopped before that (the caller reports why); raises TimeoutError when the counts are still
    short ``timeout_s`` after ``duration_s``: a stalled stream, not a slow machine.
    """
    _sleep_until(opens_at + duration_s)
    deadline = opens_at + duration_s + timeout_s
    while True:
        counts = list(answers())
        if min(counts, default=min_frames) >= min_frames:
            return time.perf_counter()
        if ended():
            return None
        if time.perf_counter() > deadline:
            raise TimeoutError(f"after {duration_s + timeout_s:.0f} s the measuring window still lacks "
                               f"{min_frames} answers per client (answers per client: {counts})")
        time.sleep(0.005)


def _client_main(worker: Callable, spec: Any, ready: Any, go: Any, window: SharedWindow, results: Any,
                 slot: int) -> None:
    """A client process: connect, say ready, wait for the common start, run, send back the timings."""
    try:
        prepared = worker(spec, None)
        ready.put(("ready", slot, None))
        go.wait(300)
        results.put((slot, worker(spec, ClientWindow(window, slot), prepared), None))
    except BaseException as err:  # report, do not hang the driver
        import traceback

        ready.put(("error", slot, traceback.format_exc()))
        results.put((slot, None, f"{type(err).__name__}: {err}"))


def grpc_worker(spec: StreamSpec, window: ClientWindow | None, prepared: Any = None) -> Any:
    """Client-process entry for a gRPC stream: prepare (connect) when ``window`` is None, else run."""
    if window is None:
        return _stub(spec.address)
    return run_stream(spec, window, prepared)


@dataclass
class Window:
    """What happened inside the measuring window, over all clients."""

    frames: int
    duration_s: float
    latencies_ms: np.ndarray
    batch_sizes: np.ndarray
    errors: int
    reply_bytes: int
    cpu_s: float | None
    per_client_frames: list[int] = field(default_factory=list)
    client_cpu_s: float | None = None
    machine_busy_s: float | None = None
    timings_us: dict[str, float] = field(default_factory=dict)
    cpu_by_role_s: dict[str, float] = field(default_factory=dict)
    #: the window's edges (``time.perf_counter()``)
    start: float = 0.0
    end: float = 0.0
    #: integer counts a worker returned beyond the standard fields, summed over the clients
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.duration_s


def run_clients(worker: Callable, specs: Sequence[Any], *, warm_s: float, duration_s: float, min_frames: int = 1,
                cpu_seconds: Callable[[], float] | None = None, ready_timeout: float = 120.0,
                cpu_by_role: Callable[[], dict[str, float]] | None = None,
                window_timeout_s: float = WINDOW_TIMEOUT_S) -> Window:
    """Start one spawned process per spec, start them together, and sum up their measuring window.

    ``worker(spec, None)`` prepares in the client process (connects), then ``worker(spec, ClientWindow, prepared)``
    runs: it sends until ``closed``, calls ``answered`` per answer and returns its timings. The window opens
    ``warm_s`` after the start and lasts ``duration_s``, longer when needed until every client has had
    ``min_frames`` answers inside it (a loaded machine must not make a row empty), ``window_timeout_s`` at most.
    ``cpu_seconds`` (and ``cpu_by_role``, per server process role) are sampled at the window's real edges.
    """
    ctx = mp.get_context("spawn")
    ready, results, go, shared = ctx.Queue(), ctx.Queue(), ctx.Event(), SharedWindow.create(ctx, len(specs))
    procs = [ctx.Process(target=_client_main, args=(worker, spec, ready, go, shared, results, k), daemon=True)
             for k, spec in enumerate(specs)]
    for p in procs:
        p.start()
    try:
        _wait_ready(ready, procs, ready_timeout)
        start_at = time.perf_counter() + 0.05
        window_start = start_at + warm_s
        shared.start_at.value, shared.opens_at.value = start_at, window_start
        go.set()
        clients = [psutil.Process(p.pid) for p in procs]
        _sleep_until(window_start)
        first = _cpu_sample(cpu_seconds, clients)
        roles_first = cpu_by_role() if cpu_by_role else {}
        window_end = close_window(window_start, duration_s, lambda: shared.answers[:], min_frames,
                                  lambda: any(p.exitcode is not None for p in procs), window_timeout_s)
        if window_end is None:
            ended, counts = [k for k, p in enumerate(procs) if p.exitcode is not None], shared.answers[:]
            shared.closes_at.value = time.perf_counter()
            _collect(results, procs, timeout=600)  # a client's own error, when it failed, says more
            raise RuntimeError(f"client(s) {ended} ended their stream before having {min_frames} answers in the "
                               f"window (answers per client: {counts})")
        shared.closes_at.value = window_end
        last = _cpu_sample(cpu_seconds, clients)
        roles_last = cpu_by_role() if cpu_by_role else {}
        outputs = _collect(results, procs, timeout=warm_s + duration_s + 600)
    finally:
        shared.closes_at.value = min(shared.closes_at.value, time.perf_counter())
        go.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join()
    window = summarise([outputs[k] for k in sorted(outputs)], window_start, window_end,
                       (first[0], last[0]) if cpu_seconds is not None else (None, None))
    window.client_cpu_s = last[1] - first[1]
    window.machine_busy_s = last[2] - first[2]
    window.cpu_by_role_s = {role: roles_last[role] - roles_first[role] for role in roles_last}
    return window


def _cpu_sample(server: Callable[[], float] | None, clients: Sequence[psutil.Process]) -> tuple[float, float, float]:
    """(server CPU s, clients' CPU s, whole machine's busy CPU s) so far."""
    own = sum(sum(c.cpu_times()[:2]) for c in clients)
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return (server() if server is not None else 0.0), own, busy


def _wait_ready(ready: Any, procs: Sequence[Any], timeout: float) -> None:
    """Every client said ready; a client that died on the way (it never will say so) fails the run at once."""
    deadline, waiting = time.perf_counter() + timeout, len(procs)
    while waiting:
        try:
            state, slot, detail = ready.get(timeout=0.5)
        except queue.Empty:
            dead = [k for k, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"client process(es) {dead} exited before starting (exit codes "
                                   f"{[procs[k].exitcode for k in dead]})") from None
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{waiting} client(s) not ready after {timeout:.0f} s") from None
            continue
        if state != "ready":
            raise RuntimeError(f"client {slot} failed to start:\n{detail}")
        waiting -= 1


def _collect(results: Any, procs: Sequence[Any], timeout: float) -> dict[int, Any]:
    """Every client's result by slot; a client that crashed (non-zero exit, no result) fails the run at once."""
    deadline, outputs = time.perf_counter() + timeout, {}
    while len(outputs) < len(procs):
        try:
            slot, value, error = results.get(timeout=0.5)
        except queue.Empty:
            crashed = [k for k, p in enumerate(procs) if k not in outputs and p.exitcode not in (None, 0)]
            if crashed:
                raise RuntimeError(f"client process(es) {crashed} crashed (exit codes "
                                   f"{[procs[k].exitcode for k in crashed]})") from None
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(procs) - len(outputs)} client(s) did not report within {timeout:.0f} s") \
                    from None
            continue
        if error:
            raise RuntimeError(f"client {slot} failed: {error}")
        outputs[slot] = value
    return outputs


def summarise(outputs: Sequence[dict], window_start: float, window_end: float, cpu: Sequence[float | None]) -> Window:
    """Frames answered inside the window count for throughput; frames sent inside it give the latencies."""
    frames, latencies, batches, errors, counts, reply = 0, [], [], 0, [], 0
    timings: dict[str, list[np.ndarray]] = {}
    for out in outputs:
        sent, received = out["sent"], out["received"]
        inside = (received >= window_start) & (received <= window_end)
        counts.append(int(inside.sum()))
        frames += counts[-1]
        batches.append(out["batch"][inside])
        timed = (sent >= window_start) & (sent <= window_end)
        latencies.append((received[timed] - sent[timed]) * 1000.0)
        errors += int((~out["ok"][inside]).sum())
        for stage, values in out.get("timings_us", {}).items():
            timings.setdefault(stage, []).append(values[inside & out["ok"]])
        reply = reply or out["reply_bytes"]
    cpu_s = cpu[1] - cpu[0] if cpu[0] is not None and cpu[1] is not None else None
    means = {stage: float(np.concatenate(parts).mean()) for stage, parts in timings.items()
             if sum(p.size for p in parts)}
    extra: dict[str, int] = {}
    for out in outputs:
        for key, value in out.items():
            if isinstance(value, int) and not isinstance(value, bool) and key != "reply_bytes":
                extra[key] = extra.get(key, 0) + value
    return Window(frames, window_end - window_start, np.concatenate(latencies) if latencies else np.zeros(0),
                  np.concatenate(batches) if batches else np.zeros(0), errors, reply, cpu_s, counts,
                  timings_us=means, start=window_start, end=window_end, extra=extra)


@dataclass(frozen=True)
class E2ECell:
    streams: int
    input: str
    layers: str
    dtype: str
    rate: float = 0.0


def run_cell(address: str, cell: E2ECell, payloads: dict[str, FramePayload], *, warm_s: float, duration_s: float,
             max_in_flight: int, cpu_seconds: Callable[[], float] | None, min_frames: int = 1) -> dict[str, Any]:
    """One row of the end-to-end (or camera-rate) table."""
    spec = StreamSpec(address, payloads[cell.input], LAYER_SETS[cell.layers], cell.dtype, max_in_flight, cell.rate,
                      warm_s, duration_s)
    # paced streams are spread evenly over one frame period, as independent cameras would be
    specs = [replace(spec, phase=k / (cell.streams * cell.rate)) if cell.rate > 0 else spec
             for k in range(cell.streams)]
    window = run_clients(grpc_worker, specs, warm_s=warm_s, duration_s=duration_s, min_frames=min_frames,
                         cpu_seconds=cpu_seconds)
    stats = percentiles(window.latencies_ms)
    return {
        "streams": cell.streams, "input": cell.input, "layers": cell.layers, "dtype": cell.dtype,
        "rate": cell.rate or None, "fps": window.fps, "frames": window.frames, "duration_s": window.duration_s,
        "p50_ms": stats["p50"], "p95_ms": stats["p95"], "p99_ms": stats["p99"],
        "mean_batch": float(window.batch_sizes.mean()) if window.batch_sizes.size else None,
        "server_cpu_s": window.cpu_s,
        "server_cpu_ms_per_frame": (window.cpu_s / window.frames * 1000.0) if window.cpu_s and window.frames else None,
        "client_cpu_ms_per_frame": (window.client_cpu_s / window.frames * 1000.0) if window.frames else None,
        "machine_busy_cores": window.machine_busy_s / window.duration_s,
        "other_cpu_cores": max(0.0, window.machine_busy_s - window.client_cpu_s - (window.cpu_s or 0.0)) / window.duration_s,
        "server_timings_ms": {k.removesuffix("_us"): v / 1000.0 for k, v in window.timings_us.items()},
        "errors": window.errors, "reply_bytes": window.reply_bytes, "per_client_frames": window.per_client_frames,
        "frame_bytes": len(payloads[cell.input].data), "max_in_flight": max_in_flight,
    }


def engine_reference(engine_rows: Sequence[dict], layers: str, mean_batch: float | None,
                     dtype: str | None = None) -> dict | None:
    """The server-way engine row for ``layers`` (and output ``dtype`` when such rows exist) at the measured batch
    size nearest ``mean_batch``."""
    rows = [r for r in engine_rows if r["way"].startswith("server") and r["layers"] == layers]
    same_dtype = [r for r in rows if r.get("out_dtype") == dtype]
    rows = same_dtype or rows
    if not rows or mean_batch is None:
        return None
    return min(rows, key=lambda r: (abs(r["batch"] - mean_batch), r["batch"]))


def add_engine_ratio(row: dict, engine_rows: Sequence[dict]) -> dict:
    ref = engine_reference(engine_rows, row["layers"], row["mean_batch"], row.get("dtype"))
    if ref is not None:
        row["engine_fps"] = ref["fps"]
        row["engine_batch"] = ref["batch"]
        row["engine_ref"] = f"{ref['fps']:.0f} (b{ref['batch']})"
        row["ratio_vs_engine"] = row["fps"] / ref["fps"]
    return row


def add_camera_ratio(row: dict, engine_rows: Sequence[dict]) -> dict:
    ref = next((r for r in engine_rows if r["way"].startswith("server") and r["layers"] == row["layers"]
                and r["batch"] == 1), None)
    if ref is not None and row["p50_ms"] is not None:
        row["engine_b1_ms"] = ref["ms_batch"]
        row["p50_vs_engine"] = row["p50_ms"] / ref["ms_batch"]
        row["p99_vs_engine"] = row["p99_ms"] / ref["ms_batch"]
    return row


def jpeg_decode_ms(payload: FramePayload, repeats: int = 31) -> float:
    """Median milliseconds one thread takes to decode ``payload`` with OpenCV: what a front-end's decode thread
    spends per frame of this bench."""
    data = np.frombuffer(payload.data, np.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cv2.imdecode(data, cv2.IMREAD_COLOR)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def add_decode_bound(row: dict, decode_fps: float | None) -> dict:
    """Say which side bounds a row: the front-ends' JPEG decode capacity (``decode_fps``, JPEG rows only) or the
    engine's frames/s at the row's batch size, whichever is lower. Rows far below both are bound elsewhere (gRPC,
    the front-ends' GIL); the columns show that too."""
    row["decode_cap_fps"] = decode_fps if row["input"] == "jpeg" else None
    engine = row.get("engine_fps")
    if engine is None:
        row["bound"] = None
    elif row["decode_cap_fps"] is not None and row["decode_cap_fps"] < engine:
        row["bound"] = "decode"
    else:
        row["bound"] = "engine"
    return row


def run_e2e(address: str, cells: Sequence[E2ECell], payloads: dict[str, FramePayload], *, warm_s: float,
            duration_s: float, max_in_flight: int = 8, cpu_seconds: Callable[[], float] | None = None,
            engine_rows: Sequence[dict] = (), camera: bool = False, min_frames: int = 1,
            progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every cell against one running server, in order; rows carry the ratio to the engine where it was measured.
    Each cell's window lasts ``duration_s``, longer when needed for ``min_frames`` answers per stream."""
    rows = []
    for cell in cells:
        row = run_cell(address, cell, payloads, warm_s=warm_s, duration_s=duration_s, max_in_flight=max_in_flight,
                       cpu_seconds=cpu_seconds, min_frames=min_frames)
        rows.append(add_camera_ratio(row, engine_rows) if camera else add_engine_ratio(row, engine_rows))
        progress(f"{'camera' if camera else 'e2e'} {cell}: {row['fps']:.1f} frames/s, p50 {row['p50_ms']} ms")
    return rows


def payloads_for(height: int = 480, width: int = 640) -> dict[str, FramePayload]:
    image = synthetic_frame(height, width)
    return {"jpeg": FramePayload.of(image, "jpeg"), "raw": FramePayload.of(image, "raw")}

