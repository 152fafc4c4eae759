"""The whole server inside one process, on threads: for tests, the demo and benchmarks.

``ServerThread`` prepares the engine exactly as ``serve`` does (``device.process.prepare_device``: the pinned-memory
budget, the ``--layers`` check, batching, core sharing, backend choice and warm-up), then runs the same pieces as
``serve`` (a ``DeviceHost``, a ``DeviceLink`` over a local socket and a shared-memory arena, a ``FeatureServer``)
without child processes, so what tests exercise is the served configuration.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..common.settings import ServerSettings
from ..device.process import DeviceHost, prepare_device
from ..frontend.link import DeviceLink
from ..frontend.server import FeatureServer
from ..ipc.batching import BatcherConfig
from ..ipc.shm import arena_name, segment_prefix


class ServerThread:
    """Run the device host and one front-end inside this process, on threads.

    Use as a context manager (or ``start()``/``stop()``); ``address`` is ``host:port`` once started. Stopping drains
    and stops the server and restores the process's torch thread count.

    Args:
        runner: a ``DeviceRunner`` (or a stand-in with its interface), not yet prepared.
        settings: server settings (default: port 0).
    """

    def __init__(self, runner: Any, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings(port=0)
        self.runner = runner
        self.device: DeviceHost | None = None
        self.server: FeatureServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def batching(self) -> BatcherConfig:
        return self.device.batching

    @property
    def batcher(self):
        return self.device.batcher

    def start(self) -> "ServerThread":
        """Prepare the engine as ``serve`` does, start the device host, then the front-end on its own loop."""
        self.device = prepare_device(self.runner, self.settings)
        link = DeviceLink(self.device.address, self.device.authkey, arena_name(segment_prefix(), 0, id(self)),
                          self.settings.shm_bytes, self.batching.queue_capacity)
        self.server = FeatureServer(self.settings, self.runner.card(), self.batching, link, uds=self.settings.uds)
        self.device.start()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="yolostream-server-loop", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Drain the front-end (up to ``grace`` seconds), stop the loop and the device host."""
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace, drain_delay=0), self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self.device.stop(drain=True, timeout=grace)
            self.runner.set_cpu_threads(self.device.threads_before)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
