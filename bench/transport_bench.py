"""Transport alone: our service with the model bypassed against a plain TCP socket moving the same bytes.

Three ways of moving the same reply, each a server process and a client process keeping the same number of
requests in flight, measured over the same kind of window:

- **our service**: the real server (decode, letterbox, batcher, tensor encoding, protobuf, HTTP/2) with
  ``ModelBypass`` in place of the engine, so replies have their real size and no layer runs. The request is an
  imgsz×1 raw strip (640×1): letterboxing it to the square imgsz input needs padding only, no resize, so the
  server's preprocessing costs as little as any frame's can (a 64×64 frame costs 6× more, in the upscale).
- **plain gRPC**: a grpc.aio bidirectional stream of opaque bytes, one reply of the same size per request, no
  service logic: what grpcio itself costs.
- **raw socket**: the physical limit here: read a request of our serialised request's size, answer with as
  many bytes as our serialised reply.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import psutil

from e2e_bench import ClientWindow, FramePayload, StreamSpec, frame_message, grpc_worker, rpc_timeout_s, run_clients
from report import percentiles
from server_proc import ServerProcess, server_args

MB = 1e6


@dataclass(frozen=True)
class TransportCase:
    """A reply size, named by the model, layers and dtype that produce it at ``imgsz`` (square letterbox)."""

    what: str
    cfg: str
    layers: tuple[str, ...]
    dtype: str = "float32"
    imgsz: int = 640


@dataclass(frozen=True)
class SocketSpec:
    """A reference client's work: where to connect, the message sizes, the window and the in-flight depth."""

    port: int
    request_bytes: int
    reply_bytes: int
    max_in_flight: int
    warm_s: float
    duration_s: float


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on EOF before any byte."""
    got, size = 0, len(view)
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            if got:
                raise ConnectionError(f"connection closed mid-message ({got} of {size} bytes)")
            return False
        got += n
    return True


def socket_server(request_bytes: int, reply_bytes: int, ports: Any) -> None:
    """Serve one connection: read a request, answer ``reply_bytes`` bytes, until the client closes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        ports.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reply = bytes(reply_bytes)
            view = memoryview(bytearray(request_bytes))
            while _recv_exact(conn, view):
                conn.sendall(reply)


def _windowed(window: ClientWindow, slots: threading.Semaphore, sent: list[float]) -> Iterator[None]:
    """From the window's start until the driver closes it, yield once per free in-flight slot (the caller sends one
    request), recording each send time in ``sent``; the receiver releases a slot per reply."""
    left = window.start_at - time.perf_counter()
    if left > 0:
        time.sleep(left)
    while slots.acquire(timeout=120):
        now = time.perf_counter()
        if window.closed(now):
            return
        sent.append(now)
        yield


def socket_worker(spec: SocketSpec, window: ClientWindow | None, prepared: Any = None) -> Any:
    """Client-process entry: connect when ``window`` is None; else keep ``max_in_flight`` requests going."""
    if window is None:
        conn = socket.create_connection(("127.0.0.1", spec.port), timeout=60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(None)
        return conn
    conn: socket.socket = prepared
    slots = threading.Semaphore(spec.max_in_flight)
    request = bytes(spec.request_bytes)
    sent: list[float] = []

    def send() -> None:
        for _ in _windowed(window, slots, sent):
            conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    view = memoryview(bytearray(spec.reply_bytes))
    received = []
    with conn:
        while _recv_exact(conn, view):
            received.append(window.answered())
            slots.release()
    sender.join()
    n = len(received)
    return {"sent": np.asarray(sent[:n]), "received": np.asarray(received), "batch": np.ones(n),
            "ok": np.ones(n, bool), "reply_bytes": spec.reply_bytes, "error_count": 0}


_ECHO_METHOD = "/bench.Echo/Stream"


def echo_server(request_bytes: int, reply_bytes: int, ports: Any) -> None:
    """A plain grpc.aio server: one ``reply_bytes`` reply per request on one bidirectional stream of raw bytes."""
    import asyncio

    import grpc

    from e2e_bench import MESSAGE_LIMIT

    reply = bytes(reply_bytes)

    async def serve() -> None:
        done = asyncio.Event()

        async def stream(requests: Any, context: Any):
            async for _ in requests:
                yield reply
            done.set()

        server = grpc.aio.server(options=[("grpc.max_send_message_length", MESSAGE_LIMIT),
                                          ("grpc.max_receive_message_length", MESSAGE_LIMIT)])
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await done.wait()
        await server.stop(1.0)

    asyncio.run(serve())


def echo_worker(spec: SocketSpec, window: ClientWindow | None, prepared: Any = None) -> Any:
    """Client-process entry for the plain gRPC stream (same window and in-flight logic as the service client)."""
    import grpc

    from e2e_bench import MESSAGE_LIMIT

    if window is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{spec.port}",
                                        options=[("grpc.max_receive_message_length", MESSAGE_LIMIT)])
        grpc.channel_ready_future(channel).result(timeout=60)
        return channel
    channel = prepared
    slots = threading.Semaphore(spec.max_in_flight)
    request = bytes(spec.request_bytes)
    sent: list[float] = []

    def requests():
        for _ in _windowed(window, slots, sent):
            yield request

    received = []
    with channel:
        for reply in channel.stream_stream(_ECHO_METHOD)(requests(), timeout=rpc_timeout_s(spec)):
            received.append(window.answered())
            slots.release()
    n = len(received)
    return {"sent": np.asarray(sent[:n]), "received": np.asarray(received), "batch": np.ones(n),
            "ok": np.ones(n, bool), "reply_bytes": spec.reply_bytes, "error_count": 0}


def run_pair(server_main: Callable, worker: Callable, request_bytes: int, reply_bytes: int, max_in_flight: int,
             warm_s: float, duration_s: float, min_frames: int = 1):
    """A reference server process and one client process; returns the client's window (server CPU included)."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=server_main, args=(request_bytes, reply_bytes, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        ps = psutil.Process(server.pid)
        spec = SocketSpec(port, request_bytes, reply_bytes, max_in_flight, warm_s, duration_s)
        window = run_clients(worker, [spec], warm_s=warm_s, duration_s=duration_s, min_frames=min_frames,
                             cpu_seconds=lambda: sum(ps.cpu_times()[:2]))
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join()
    return window


def _cpu_ms(window: Any) -> float | None:
    return window.cpu_s / window.frames * 1000.0 if window.cpu_s and window.frames else None


def _other_cores(window: Any) -> float:
    """CPU the rest of the machine used during the window (other processes: noise), in cores."""
    return max(0.0, window.machine_busy_s - window.client_cpu_s - (window.cpu_s or 0.0)) / window.duration_s


def _client_cpu_ms(window: Any) -> float | None:
    return window.client_cpu_s / window.frames * 1000.0 if window.client_cpu_s and window.frames else None


def run_transport(cases: Sequence[TransportCase], *, in_flight: Sequence[int] = (8,), warm_s: float = 0.5,
                  duration_s: float = 3.0, frontends: Sequence[int] = (1, 2), min_frames: int = 1,
                  progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per (case, front-ends, in-flight depth): our service (model bypassed) with that many front-end
    processes and as many client streams, plain gRPC and a raw socket moving the same bytes. Every window lasts
    ``duration_s``, longer when needed for ``min_frames`` answers per client (``run_clients``).

    Server CPU is the whole process tree (supervisor, device, front-ends), also given per role; the plain gRPC
    and socket references are one process each.
    """
    rows = []
    for case in cases:
        strip = FramePayload("raw", bytes(case.imgsz * 3), 1, case.imgsz)
        for count in frontends:
            with ServerProcess(server_args(case.cfg, case.imgsz, device="cpu", bypass=True,
                                           frontends=count)) as server:
                for depth in in_flight:
                    spec = StreamSpec(server.address, strip, case.layers, case.dtype, depth, 0.0, warm_s, duration_s,
                                      imgsz=case.imgsz, square=True)
                    grpc_window = run_clients(grpc_worker, [spec] * count, warm_s=warm_s, duration_s=duration_s,
                                              min_frames=min_frames, cpu_seconds=server.cpu_seconds,
                                              cpu_by_role=server.cpu_by_role)
                    request_bytes = frame_message(strip, 0, 0).ByteSize()
                    reply_bytes = grpc_window.reply_bytes
                    echo = run_pair(echo_server, echo_worker, request_bytes, reply_bytes, depth, warm_s, duration_s,
                                    min_frames)
                    sock = run_pair(socket_server, socket_worker, request_bytes, reply_bytes, depth, warm_s,
                                    duration_s, min_frames)
                    row = {
                        "what": case.what, "cfg": case.cfg, "layers": ",".join(case.layers), "dtype": case.dtype,
                        "imgsz": case.imgsz, "frontends": count, "streams": count, "in_flight": depth,
                        "request_bytes": request_bytes, "reply_bytes": reply_bytes,
                        "grpc_msgs_s": grpc_window.fps, "grpc_mb_s": grpc_window.fps * reply_bytes / MB,
                        "grpc_latency_ms": percentiles(grpc_window.latencies_ms),
                        "grpc_errors": grpc_window.errors,
                        "server_cpu_ms_per_msg": _cpu_ms(grpc_window),
                        "server_cpu_ms_per_msg_by_role": {
                            role: seconds / max(1, grpc_window.frames) * 1000.0
                            for role, seconds in grpc_window.cpu_by_role_s.items()},
                        "client_cpu_ms_per_msg": _client_cpu_ms(grpc_window),
                        "server_timings_ms": {k.removesuffix("_us"): v / 1000.0
                                              for k, v in grpc_window.timings_us.items()},
                        "echo_msgs_s": echo.fps, "echo_mb_s": echo.fps * reply_bytes / MB,
                        "echo_latency_ms": percentiles(echo.latencies_ms),
                        "echo_server_cpu_ms_per_msg": _cpu_ms(echo), "echo_client_cpu_ms_per_msg": _client_cpu_ms(echo),
                        "socket_msgs_s": sock.fps, "socket_mb_s": sock.fps * reply_bytes / MB,
                        "socket_latency_ms": percentiles(sock.latencies_ms),
                        "socket_server_cpu_ms_per_msg": _cpu_ms(sock),
                        "socket_client_cpu_ms_per_msg": _client_cpu_ms(sock),
                    }
                    row["other_cpu_cores"] = _other_cores(grpc_window)
                    row["ratio"] = row["grpc_mb_s"] / row["socket_mb_s"] if row["socket_mb_s"] else None
                    row["echo_ratio"] = row["echo_mb_s"] / row["socket_mb_s"] if row["socket_mb_s"] else None
                    by_role = row["server_cpu_ms_per_msg_by_role"]
                    row["frontend_cpu_ms_per_msg"] = by_role.get("frontends")
                    row["device_cpu_ms_per_msg"] = by_role.get("device")
                    echo_cpu = row["echo_server_cpu_ms_per_msg"]
                    row["frontend_vs_plain_grpc"] = (row["frontend_cpu_ms_per_msg"] / echo_cpu
                                                     if echo_cpu and row["frontend_cpu_ms_per_msg"] else None)
                    row["cpu_vs_plain_grpc"] = (row["server_cpu_ms_per_msg"] / echo_cpu
                                                if echo_cpu and row["server_cpu_ms_per_msg"] else None)
                    rows.append(row)
                    progress(f"transport {case.what} x{count} front-end(s) in-flight {depth}: service "
                             f"{row['grpc_mb_s']:.0f} MB/s, plain gRPC {row['echo_mb_s']:.0f} MB/s, socket "
                             f"{row['socket_mb_s']:.0f} MB/s; server CPU {row['server_cpu_ms_per_msg'] or 0:.3f} "
                             f"ms/msg ({row['cpu_vs_plain_grpc'] or 0:.2f}x plain gRPC)")
    return rows
