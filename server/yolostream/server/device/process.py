"""The device process: the model, the micro-batcher, and one link per front-end.

``DeviceHost`` listens on a local ``multiprocessing.connection`` socket. Each front-end connects, names its shared-
memory arena, and then sends one small message per frame (slot offsets, shape, requested outputs). Frames of every
front-end go into the same micro-batcher queue, so batches mix streams of all front-ends. When a batch is done the
host writes each frame's features into its front-end's arena, or straight into the client's region of a stream
whose front-end shared it (``regions``), and answers that front-end once for the whole batch.

``device_main`` is the process entry point used by the supervisor: it loads the model, reports the model card (or
a one-line start-up error), serves front-ends, and stops when the supervisor says so. The same ``DeviceHost`` runs
on threads inside one process for tests and the demo (``grpc_server.ServerThread``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import Any

import numpy as np

from ..ipc.batching import BatcherConfig
from .batcher import BatchEngine, BatchResult, MicroBatcher, ServerBusy, WorkItem
from ..common.errors import one_line
from ..common.lifecycle import become_child
from ..common.object_request import ObjectJob
from ..ipc.messages import Cancel, FrameDone, FrameFailed, Hello, Ready, RegionAnswer, ReleaseRegion, Results, Run, \
    ShareRegion, StartFailed, Stop, Stopped, Welcome, descriptor_socket, receive_descriptor
from ..ipc.shm import SharedArena
from .regions import ClientRegions

log = logging.getLogger(__name__)


def listener_address(tag: str) -> str:
    """An abstract Unix socket name (Linux): nothing on disk to clean up, gone with the process."""
    return f"\0yolostream-{os.getpid()}-{tag}-{secrets.token_hex(4)}"


def _one_line(err: BaseException) -> str:
    return one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__, 500)


class _FrontEndPort:
    """One connected front-end: its arena, the client regions it shared, its connection, and its frames at the
    device (a batcher sink)."""

    def __init__(self, host: "DeviceHost", conn: Connection, arena: SharedArena) -> None:
        self.host = host
        self.conn = conn
        self.arena = arena
        self.regions = ClientRegions()
        #: the link as a socket object, made once here so that reading a region's descriptor allocates nothing
        self._fd_socket = descriptor_socket(conn)
        self.items: dict[int, WorkItem] = {}
        self._send_lock = threading.Lock()
        self._items_lock = threading.Lock()

    def serve(self) -> None:
        """Read this front-end's messages until it disconnects; then withdraw its queued frames and unmap the
        regions it shared (a frame being written finishes first)."""
        try:
            while True:
                try:
                    messages = self.conn.recv()
                    for message in messages:
                        if isinstance(message, Run):
                            self._run(message)
                        elif isinstance(message, Cancel):
                            self._cancel(message.rid)
                        elif isinstance(message, ShareRegion):
                            self._share(message)
                        elif isinstance(message, ReleaseRegion):
                            self.regions.release(message.region)
                except (EOFError, OSError):
                    return
        finally:
            with self._items_lock:
                items, self.items = list(self.items.values()), {}
            for item in items:
                self.host.batcher.cancel(item)
            self.regions.close()
            self._fd_socket.close()
            self.conn.close()
            self.host.detach(self)

    def _share(self, message: ShareRegion) -> None:
        """Map the region whose descriptor follows the message (EOFError/OSError: the link is broken), and answer
        whether it is mapped. A descriptor that did not arrive (this process is out of them) refuses that region
        alone."""
        fd = receive_descriptor(self._fd_socket)
        if fd is None:
            refused = self.regions.refuse(message.region, "the device process could not receive the stream's "
                                                          "region (out of file descriptors)")
        else:
            try:
                refused = self.regions.share(message.region, fd, message.size)
            finally:
                os.close(fd)
        with self._send_lock:
            self.conn.send(RegionAnswer(message.region, refused or ""))

    def _run(self, run: Run) -> None:
        image = self.arena.view(run.in_offset, tuple(run.in_shape))
        item = WorkItem(image, tuple(run.keys), self, run, objects=run.job)
        with self._items_lock:
            self.items[run.rid] = item
        try:
            self.host.batcher.put(item)
        except ServerBusy as err:
            self.deliver([(item, err)])

    def _cancel(self, rid: int) -> None:
        with self._items_lock:
            item = self.items.get(rid)
        if item is not None and self.host.batcher.cancel(item):
            self.deliver([(item, None)])

    def deliver(self, results: list[tuple[WorkItem, BatchResult | BaseException | None]]) -> None:
        """Write each finished frame's features into the arena or its client's region (its boxes into the arena),
        then answer once for all of them."""
        done: list[FrameDone] = []
        failed: list[FrameFailed] = []
        for item, outcome in results:
            run: Run = item.tag
            rid = run.rid
            with self._items_lock:
                self.items.pop(rid, None)
            if outcome is None or isinstance(outcome, BaseException):
                failed.append(FrameFailed(rid, None if outcome is None else _one_line(outcome),
                                          unavailable=isinstance(outcome, ServerBusy)))
                continue
            job: ObjectJob | None = item.objects
            offset = run.out_offset
            if run.target is not None:
                refused = self.regions.write(run.target, outcome.arrays)
                if refused is not None:
                    failed.append(FrameFailed(rid, refused))
                    continue
            else:
                feature_bytes = run.out_bytes - (job.layout.nbytes if job is not None else 0)
                total = sum(a.nbytes for a in outcome.arrays)
                if total != feature_bytes:
                    failed.append(FrameFailed(rid, f"internal error: the features are {total} bytes, the "
                                                   f"front-end expected {feature_bytes}"))
                    continue
                for array in outcome.arrays:
                    np.copyto(self.arena.view(offset, array.shape, array.dtype), array, casting="no")
                    offset += array.nbytes
            boxes = -1
            if job is not None:
                try:
                    job.layout.write(self.arena.view(offset, (job.layout.nbytes,), np.uint8), outcome.objects)
                except (ValueError, AttributeError) as err:
                    failed.append(FrameFailed(rid, f"internal error: {_one_line(err)}"))
                    continue
                boxes = len(outcome.objects.boxes)
            done.append(FrameDone(rid, outcome.batch_size, outcome.queued_us, outcome.compute_us, outcome.fetch_us,
                                  boxes))
        with self._send_lock:
            try:
                self.conn.send(Results(done, failed))
            except (OSError, ValueError):  # the front-end is gone; its frames no longer matter
                pass


@dataclass
class DeviceHost:
    """Serves front-ends over a local socket: their frames into one micro-batcher, features back into their arenas.

    Args:
        runner: what the batcher drives (a ``DeviceRunner``, or a stand-in in tests and the transport bench).
        batching: the batcher's settings.
        threads_before: the process's torch thread count before the engine was given its share of the cores (its
            owner restores it when the host is done).
    """

    runner: BatchEngine
    batching: BatcherConfig
    threads_before: int | None = None

    def __post_init__(self) -> None:
        self.authkey = secrets.token_bytes(32)
        self.address = listener_address("device")
        self.batcher = MicroBatcher(self.runner, self.batching)
        self._listener: Listener | None = None
        self._ports: set[_FrontEndPort] = set()
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, name="yolostream-device-accept", daemon=True)

    def start(self) -> "DeviceHost":
        """Start the batcher and listen for front-ends."""
        self.batcher.start()
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._accepting.start()
        return self

    def _accept(self) -> None:
        listener = self._listener
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                if self._listener is None:  # stopped: stop accepting
                    return
                continue  # a peer with the wrong key, or one that went away mid-handshake
            threading.Thread(target=self._welcome, args=(conn,), name="yolostream-device-port", daemon=True).start()

    def _welcome(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
            if not isinstance(hello, Hello):
                raise ValueError(f"expected Hello, got {type(hello).__name__}")
            arena = SharedArena.attach(hello.arena)
            conn.send(Welcome())
        except Exception as err:
            log.error("a front-end could not attach: %s", _one_line(err))
            conn.close()
            return
        port = _FrontEndPort(self, conn, arena)
        with self._lock:
            self._ports.add(port)
        port.serve()

    def detach(self, port: _FrontEndPort) -> None:
        with self._lock:
            self._ports.discard(port)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop listening; finish (``drain``) or fail what is queued; close every front-end's link."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.batcher.close(drain=drain, timeout=timeout)
        with self._lock:
            ports = list(self._ports)
        for port in ports:
            try:
                port.conn.close()
            except OSError:
                pass


def device_main(settings: Any, parent_pid: int, status: Connection, bypass: bool = False,
                threads: int | None = None) -> None:
    """Device process entry: load the model, report ``Ready`` or ``StartFailed`` (``ipc.messages``) on ``status``,
    serve front-ends, and drain and exit on ``Stop``.

    Args:
        settings: the server's ``ServerSettings``.
        parent_pid: the supervisor, whose death ends this process.
        status: the supervisor's end of a pipe.
        bypass: bench only: answer with real-sized zero features instead of running the model.
        threads: bench only: torch threads over all device workers (default: every core this process may use).
    """
    become_child(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor stops the device last, after the front-ends
    logging.basicConfig(level=logging.WARNING, format="yolostream device: %(message)s")
    logging.getLogger("yolostream.server.device.engine").setLevel(logging.INFO)  # --backend auto says what it chose
    try:
        runner, host = build_device(settings, bypass=bypass, threads=threads)
        host.start()
    except Exception as err:  # every start-up failure is one line for the supervisor to print
        status.send(StartFailed(one_line(str(err)) if str(err) else type(err).__name__))
        return
    status.send(Ready(runner.card().to_dict(), host.batching, host.address, host.authkey))
    try:
        while True:
            try:
                message = status.recv()
            except (EOFError, OSError):
                host.stop(drain=False, timeout=1)
                return
            if isinstance(message, Stop):
                host.stop(drain=True, timeout=message.grace)
                status.send(Stopped())
                return
    finally:
        runner.set_cpu_threads(host.threads_before)


def build_device(settings: Any, bypass: bool = False, threads: int | None = None) -> tuple[Any, DeviceHost]:
    """Load the model the settings name and prepare it as ``prepare_device`` does; returns (runner, host)."""
    from ..model.loader import load_model
    from .engine import DeviceRunner

    loaded = load_model(settings.weights, settings.cfg)
    runner = DeviceRunner(loaded, device=settings.device, half=settings.half, fuse=settings.fuse,
                          imgsz=settings.imgsz, letterbox=settings.letterbox, backend=settings.backend)
    return runner, prepare_device(runner, settings, bypass=bypass, threads=threads)


def prepare_device(runner: Any, settings: Any, bypass: bool = False, threads: int | None = None) -> DeviceHost:
    """Everything ``serve`` does to an engine before it takes frames, in one place for ``serve`` and the in-process
    server: bound its pinned memory, check the default layers, size the batching and share the cores, resolve the
    backend, warm up, and prove the served path against the reference path (``self_check``). Returns the (not yet started) host; its ``threads_before`` is the thread count to restore.

    Args:
        runner: a ``DeviceRunner`` (or a stand-in with its interface).
        settings: the server's ``ServerSettings``.
        bypass: bench only: answer with real-sized zero features instead of running the model.
        threads: bench only: torch threads over all device workers.
    """
    from ..common.lifecycle import available_cores

    runner.configure_staging(settings.pinned_bytes)
    try:
        runner.resolve(settings.layers)
    except ValueError as err:
        raise ValueError(f"--layers: {err}") from err
    batching = batching_for(settings, runner.device.type, available_cores())
    threads_before = runner.share_cpu(batching.workers)
    if threads:
        runner.set_cpu_threads(max(1, threads // batching.workers))
    if bypass:  # no layer runs: nothing to warm up
        from .transport_probe import ModelBypass

        return DeviceHost(ModelBypass(runner), batching, threads_before)
    runner.resolve_backend()
    runner.warmup(batching.max_batch)
    runner.check_fast_path(settings.layers)
    return DeviceHost(runner, batching, threads_before)


def batching_for(settings: Any, device_type: str, cores: int) -> BatcherConfig:
    """The batcher's settings: the device's defaults, overridden by what the settings give."""
    base = BatcherConfig.for_device(device_type, cores)
    max_batch = settings.max_batch or base.max_batch
    return BatcherConfig(
        max_batch=max_batch,
        max_delay_ms=base.max_delay_ms if settings.max_delay_ms is None else settings.max_delay_ms,
        queue_capacity=settings.queue_capacity or max(base.queue_capacity, 4 * max_batch),
        workers=settings.workers or base.workers,
    ).validated()
