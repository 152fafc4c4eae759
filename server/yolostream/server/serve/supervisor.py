"""The supervisor: ``yolostream serve``'s parent process. Starts, watches and stops the device and the front-ends.

Layout (one code path whatever the front-end count and the device):

- one **device process** (``device.device_main``): the model, the micro-batcher, the only process with torch;
- N **front-end processes** (``frontend.frontend_main``): gRPC on the shared port, decode, letterbox, replies.

Failure semantics:

- A front-end that dies is replaced (same port, fresh shared memory). Its own streams end with UNAVAILABLE when
  their connection drops; streams on other front-ends never notice.
- If the device process dies, the front-ends turn health NOT_SERVING and end their calls with UNAVAILABLE; the
  supervisor then stops them and exits 1 with a one-line reason. It does not restart the device: a restart means
  loading and warming the model again (seconds to minutes), during which an orchestrator's probes and clients that
  resume elsewhere do better than a half-alive server.
- SIGTERM or SIGINT drains: front-ends stop taking frames and answer every accepted frame, then the device stops,
  and the exit code is 0. A second signal cancels the streams still open.
- Children die with the supervisor (PR_SET_PDEATHSIG), and shared memory is unlinked as soon as both sides have
  mapped it, so nothing outlives the server, whatever kills it; names carry the supervisor's pid and the next
  start sweeps any left by a dead server.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, TextIO

from ..ipc.batching import BatcherConfig
from ..ipc.messages import FrontEndReady, Ready, StartFailed, Stop
from ..common.card import ModelCard
from ..common.errors import UserError
from ..frontend.process import FrontEndSpec, frontend_main
from ..common.settings import ServerSettings
from ..common.lifecycle import available_cores, process_alive
from ..common.sizing import frontend_plan
from ..ipc.shm import SHM_DIR, leftover_segments, segment_prefix, sweep_stale

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_BANNER = """\
################################################################################
##  WARNING: RANDOM WEIGHTS
##  No --weights given: serving {name} with seeded random weights.
##  The features it returns are meaningless; use them for testing only.
##  Serve a trained model with --weights yolov5n.pt (or a path to a .pt file).
################################################################################"""

#: Seconds a child may take to report ready (the device loads and warms the model in that time).
START_TIMEOUT_S = 600.0
#: Seconds beyond the grace period that a draining child gets before it is killed.
STOP_SLACK_S = 10.0


#: Name prefix of a server's shared metrics directory (in the temporary directory), followed by its pid.
METRICS_DIR_PREFIX = "yolostream-metrics-"


def sweep_stale_metrics() -> None:
    """Remove the metrics directories of servers that died without cleaning up (SIGKILL): their pid is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        pid = path.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Child:
    name: str
    process: Any
    status: Connection


@dataclass
class Supervisor:
    """Runs a server as processes. ``run()`` blocks until the server has stopped and returns the exit code.

    Args:
        settings: the server's settings.
        bypass: bench only: the device answers with zero features instead of running the model.
        device_threads: bench only: torch threads of the device over all its workers (default: every core).
        announce: called with the start-up line once every front-end serves.
    """

    settings: ServerSettings
    bypass: bool = False
    device_threads: int | None = None
    announce: Callable[[str], None] = lambda line: print(line, flush=True)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.prefix = segment_prefix()
        self.device: _Child | None = None
        self.frontends: dict[int, _Child] = {}
        self.generations: dict[int, int] = {}
        self.card: ModelCard | None = None
        self.batching: BatcherConfig | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics_dir: str | None = None
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._device_address: Any = None
        self._authkey = b""

    def _say(self, text: str) -> None:
        print(f"yolostream: {text}", file=self.err, flush=True)

    def run(self) -> int:
        """Start everything, serve until a signal (or the device's death), stop everything; the exit code."""
        sweep_stale()
        sweep_stale_metrics()
        if self.settings.metrics_port is not None:
            self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            try:
                self._start()
            except BaseException:
                self._kill_all()
                raise
            if self._signals:
                return self._drain()
            return self._watch()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for name in leftover_segments(self.prefix):
                try:
                    (SHM_DIR / name).unlink()
                except OSError:
                    pass
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self._wake_r.close()
            self._wake_w.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _start(self) -> None:
        s = self.settings
        from ..device.process import device_main

        placeholder = StartupHealth(s)
        self.port = placeholder.start()
        try:
            self._start_children(device_main)
        finally:
            placeholder.stop()
        self.announce(f"yolostream serving {self.card.name} on {s.host}:{self.port} "
                      f"({self._describe(len(self.frontends))})")

    def _start_children(self, device_main: Callable) -> None:
        s = self.settings

        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=device_main, args=(s, os.getpid(), child, self.bypass, self.device_threads),
                                   name="yolostream-device", daemon=False)
        process.start()
        child.close()
        self.device = _Child("device", process, parent)
        ready = self._await_report(self.device)
        if not isinstance(ready, Ready):
            raise UserError(ready.line)
        self.batching, self._device_address, self._authkey = ready.batching, ready.address, ready.authkey
        self.card = ModelCard.from_dict(ready.card)
        if self.card.random_weights:
            print(RANDOM_WEIGHTS_BANNER.format(name=self.card.name), file=self.err, flush=True)
        count, decode_threads = frontend_plan(s.frontends, s.decode_threads, self.card.device, available_cores())
        self.settings = s.replace(decode_threads=decode_threads)
        for index in range(count):
            port, metrics_port = self._start_frontend(index)
            if index == 0:
                self.metrics_port = metrics_port

    def _start_frontend(self, index: int) -> tuple[int, int | None]:
        generation = self.generations.get(index, -1) + 1
        self.generations[index] = generation
        spec = FrontEndSpec(index=index, generation=generation, port=self.port, card=self.card.to_dict(),
                            batching=self.batching, device_address=self._device_address, authkey=self._authkey,
                            shm_prefix=self.prefix, metrics_dir=self.metrics_dir)
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=frontend_main, args=(self.settings, spec, os.getpid(), child),
                                   name=f"yolostream-frontend-{index}", daemon=False)
        process.start()
        child.close()
        entry = _Child(f"front-end {index}", process, parent)
        self.frontends[index] = entry
        report = self._await_report(entry)
        if not isinstance(report, FrontEndReady):
            raise UserError(report.line)
        return report.port, report.metrics_port

    def _await_report(self, child: _Child) -> Ready | FrontEndReady | StartFailed:
        """The child's first report; a child that dies first is a one-line error (signals are noted, not lost)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready = wait([child.status, child.process.sentinel], timeout=max(0.0, deadline - time.monotonic()))
            if child.status in ready:
                try:
                    return child.status.recv()
                except (EOFError, OSError):
                    pass
            if ready:
                child.process.join(1)
                return StartFailed(f"the {child.name} process exited ({_exit_text(child.process.exitcode)}) "
                                   "before it was ready")
            if time.monotonic() >= deadline:
                return StartFailed(f"the {child.name} process was not ready within {START_TIMEOUT_S:.0f} s")

    def _watch(self) -> int:
        """Serve: replace front-ends that die; stop on a signal or when the device dies."""
        while True:
            sentinels = {c.process.sentinel: i for i, c in self.frontends.items()}
            waitables = [self._wake_r, self.device.process.sentinel, *sentinels]
            ready = wait(waitables, timeout=None)
            if self._wake_r in ready:
                try:
                    self._wake_r.recv(64)
                except BlockingIOError:
                    pass
            if self._signals:
                return self._drain()
            if self.device.process.sentinel in ready:
                self.device.process.join(1)
                self._say(f"the device process died ({_exit_text(self.device.process.exitcode)}); stopping")
                self._stop_frontends(grace=min(self.settings.grace, 5.0))
                return 1
            for sentinel, index in sentinels.items():
                if sentinel in ready:
                    child = self.frontends[index]
                    child.process.join(1)
                    self._say(f"front-end {index} died ({_exit_text(child.process.exitcode)}); replacing it")
                    if self.metrics_dir is not None:  # its counters stay in the sum; its gauges must not
                        from prometheus_client.multiprocess import mark_process_dead

                        mark_process_dead(child.process.pid, self.metrics_dir)
                    try:
                        self._start_frontend(index)
                    except UserError as err:
                        self._say(f"could not replace front-end {index}: {err}; stopping")
                        self._stop_frontends(grace=self.settings.grace)
                        self._stop_device()
                        return 1

    def _drain(self) -> int:
        name = signal.Signals(self._signals[0]).name
        self._say(f"{name}: draining (health NOT_SERVING; taking frames for {self.settings.drain_delay:g} s more, "
                  f"then answering accepted frames, up to {self.settings.grace:g} s)")
        self._stop_frontends(grace=self.settings.grace)
        self._stop_device()
        self._say("stopped")
        return 0

    def _stop_frontends(self, grace: float) -> None:
        """SIGTERM every front-end and wait for them; a second signal to us is passed on (cancel at once)."""
        children = [c for c in self.frontends.values() if c.process.is_alive()]
        for child in children:
            _signal(child.process, signal.SIGTERM)
        forwarded = len(self._signals)
        deadline = time.monotonic() + self.settings.drain_delay + grace + STOP_SLACK_S
        while time.monotonic() < deadline:
            # One look at who is alive per turn: a child that exits after it is wakes the wait through its sentinel
            # (looking twice could see it alive, then leave its sentinel out and sleep until the deadline).
            alive = [c for c in children if c.process.is_alive()]
            if not alive:
                break
            wait([self._wake_r, *(c.process.sentinel for c in alive)], timeout=max(0.0, deadline - time.monotonic()))
            try:
                self._wake_r.recv(64)
            except (BlockingIOError, OSError):
                pass
            if len(self._signals) > forwarded:
                forwarded = len(self._signals)
                self._say("second signal: cancelling the streams still open")
                for child in children:
                    _signal(child.process, signal.SIGTERM)
        for child in children:
            if child.process.is_alive():
                child.process.kill()
            child.process.join(5)

    def _stop_device(self) -> None:
        """Tell the device to finish what it has and exit (the front-ends are gone, so that is quick)."""
        child = self.device
        if child is None or not child.process.is_alive():
            return
        try:
            child.status.send(Stop(5.0))
            if child.status.poll(STOP_SLACK_S):
                child.status.recv()
        except (EOFError, OSError):
            pass
        child.process.join(STOP_SLACK_S)

    def _kill_all(self) -> None:
        for child in [*self.frontends.values(), *([self.device] if self.device else [])]:
            if child.process.is_alive():
                child.process.kill()
            child.process.join(5)

    def _describe(self, frontends: int) -> str:
        s, card = self.settings, self.card
        parts = [card.device, card.dtype, card.backend,
                 "RANDOM WEIGHTS" if card.random_weights else f"weights {card.source}",
                 f"{frontends} front-end{'s' if frontends != 1 else ''}"]
        if s.uds:
            parts.append(f"unix:{s.uds}")
        if s.allow_client_shm:
            parts.append("client shared memory")
        if s.tls_cert:
            parts.append("TLS")
        if s.token:
            parts.append("bearer token")
        if self.metrics_port is not None:
            parts.append(f"metrics on :{self.metrics_port}/metrics")
        if card.startup_check:
            parts.append(f"start-up check: {card.startup_check}")
        return ", ".join(parts)


class StartupHealth:
    """The port's answer while the model loads and warms up: health NOT_SERVING, nothing else.

    Kubernetes readiness (and client-side health checking) then sees a server that is starting, not a refused
    connection. It listens with SO_REUSEPORT, as the front-ends do, so they bind beside it and it closes once
    they serve: the port never goes quiet in between.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._server: Any = None

    def start(self) -> int:
        """Bind and serve; the bound port (the one the front-ends must share, when the settings say 0)."""
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from ..frontend.server import SERVICE_NAME, listen

        server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="yolostream-startup"),
                             options=[("grpc.so_reuseport", 1)])
        servicer = health.HealthServicer()
        for name in ("", SERVICE_NAME):
            servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = listen(server, self.settings)
        server.start()
        self._server = server
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None


def _signal(process: Any, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except (ProcessLookupError, TypeError):
        pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
