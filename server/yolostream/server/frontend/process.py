"""A front-end process: one gRPC server on the shared port, linked to the device process. Imports no torch.

Each front-end does all per-frame CPU work of its streams (parsing, validation, decode, letterbox, building and
sending replies) and hands letterboxed frames to the device process through shared memory. Several front-ends
listen on the same port (SO_REUSEPORT): the kernel spreads connections over them, and each connection stays with
the front-end that accepted it.

Signals: SIGTERM drains (health NOT_SERVING, stop taking frames, answer every accepted frame, end the streams with
UNAVAILABLE, exit 0); a second SIGTERM cancels what is left. SIGINT is the supervisor's to handle.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..ipc.batching import BatcherConfig
from ..common.card import ModelCard
from ..common.errors import one_line
from ..common.lifecycle import become_child
from ..ipc.messages import FrontEndReady, StartFailed
from ..ipc.shm import arena_name
from .link import DeviceLink
from ..common.settings import ServerSettings


@dataclass(frozen=True)
class FrontEndSpec:
    """What a front-end needs to know, all plain data: it crosses the process boundary when the front-end starts.

    Args:
        index: which front-end this is (0 also serves the Unix socket and the metrics).
        generation: how many front-ends had this index before (a replaced one gets a fresh arena name).
        port: the port to listen on (the one front-end 0 bound, when the settings say 0).
        card: the served model, as ``ModelCard.to_dict()``.
        batching: the device's batching settings.
        device_address, authkey: where the device process listens.
        shm_prefix: the server's shared-memory name prefix.
        metrics_dir: where every front-end writes its metrics for front-end 0 to serve (see ``metrics.py``), or
            None when the server serves no metrics.
    """

    index: int
    generation: int
    port: int
    card: dict[str, Any]
    batching: BatcherConfig
    device_address: Any
    authkey: bytes
    shm_prefix: str
    metrics_dir: str | None = None


def frontend_main(settings: ServerSettings, spec: FrontEndSpec, parent_pid: int, status: Connection) -> None:
    """Process entry: serve until SIGTERM; report ``FrontEndReady`` or ``StartFailed`` (``ipc.messages``) on
    ``status``."""
    become_child(parent_pid, spec.metrics_dir)
    logging.basicConfig(level=logging.WARNING, format=f"yolostream front-end {spec.index}: %(message)s")
    try:
        code = asyncio.run(_serve(settings, spec, status))
    except KeyboardInterrupt:
        code = 1
    sys.exit(code)


async def _serve(settings: ServerSettings, spec: FrontEndSpec, status: Connection) -> int:
    from .server import FeatureServer

    link = DeviceLink(spec.device_address, spec.authkey, arena_name(spec.shm_prefix, spec.index, spec.generation),
                      settings.shm_bytes, spec.batching.queue_capacity)
    server = FeatureServer(settings.replace(port=spec.port), ModelCard.from_dict(spec.card), spec.batching, link,
                           reuse_port=True, uds=settings.uds if spec.index == 0 else None,
                           serve_metrics=spec.index == 0, trim_heap=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal() -> None:
        signals.append(signal.SIGTERM)
        if len(signals) == 1:
            stop.set()
        elif server.server is not None:
            loop.create_task(server.server.stop(0))

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    try:
        port = await server.start()
    except Exception as err:  # one line for the supervisor to print
        status.send(StartFailed(one_line(str(err)) if str(err) else type(err).__name__))
        await server.stop(0)
        return 2
    status.send(FrontEndReady(port, server.metrics_port))
    await stop.wait()
    await server.stop(settings.grace)
    return 0
