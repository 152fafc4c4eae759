"""Assembling the grpc.aio server: servicer, health, reflection, auth, TLS, message sizes and draining.

``FeatureServer`` is what ``yolostream serve`` runs; ``ServerThread`` runs the same server on a private event
loop in a background thread, for tests, the demo and benchmarks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

from .batcher import BatcherConfig, MicroBatcher
from .engine import Engine, available_cores
from .frames import FrameLimits
from .metrics import ServerMetrics
from .pipeline import Pipeline
from .service import FeatureService, StreamLimits, model_info

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
#: Room left in a reply for everything but the tensor bytes (names, shapes, letterbox, timings).
REPLY_ENVELOPE_BYTES = 64 * 1024


@dataclass
class ServerSettings:
    """Every knob of a server; ``yolostream serve`` flags and the YAML file map onto these names."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_batch: int | None = None
    max_delay_ms: float | None = None
    queue_capacity: int | None = None
    workers: int | None = None
    max_in_flight: int = 8
    max_in_flight_limit: int = 64
    max_pixels: int = FrameLimits.max_pixels
    max_frame_bytes: int = FrameLimits.max_frame_bytes
    max_message_bytes: int = 128 * 1024 * 1024
    decode_threads: int = 4
    default_layers: tuple[str, ...] = ("backbone",)
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    grace_s: float = 30.0
    metrics_port: int | None = None

    def batcher_config(self, device_type: str) -> BatcherConfig:
        base = BatcherConfig.for_device(device_type, available_cores())
        max_batch = self.max_batch or base.max_batch
        return BatcherConfig(
            max_batch=max_batch,
            max_delay_ms=base.max_delay_ms if self.max_delay_ms is None else self.max_delay_ms,
            queue_capacity=self.queue_capacity or max(base.queue_capacity, 4 * max_batch),
            workers=self.workers or base.workers,
        ).validated()


HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>``, except health checks.

    Health status reveals nothing, and orchestrators' built-in gRPC probes cannot send headers.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover - abort raises

        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        supplied = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(supplied, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.request_streaming:
            return self._deny_stream
        return self._deny_unary


@dataclass
class FeatureServer:
    """The feature service on one port, with its batcher and decode pool; drains cleanly on stop."""

    engine: Engine
    settings: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        s = self.settings
        batching = s.batcher_config(self.engine.device.type)
        self._threads_before = self.engine.share_cpu(batching.workers)
        self.engine.warmup(batching.max_batch)
        self.batcher = MicroBatcher(self.engine, batching)
        limits = FrameLimits(max_pixels=s.max_pixels, max_frame_bytes=s.max_frame_bytes)
        self.pipeline = Pipeline(self.engine, self.batcher, limits, default_layers=tuple(s.default_layers),
                                 decode_threads=s.decode_threads,
                                 max_reply_bytes=s.max_message_bytes - REPLY_ENVELOPE_BYTES)
        stream_limits = StreamLimits(default_in_flight=s.max_in_flight, max_in_flight=s.max_in_flight_limit)
        info = model_info(self.pipeline, stream_limits, s.max_message_bytes)
        self.metrics = ServerMetrics(lambda: self.batcher.queued, {
            "model": info.model_name, "source": info.source, "device": info.device, "dtype": info.dtype,
            "random_weights": str(info.random_weights).lower()})
        self.service = FeatureService(self.pipeline, info, stream_limits, self.metrics)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0). Raises OSError if the port is taken."""
        s = self.settings
        options = [("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0),
                   # Clients ping to notice a vanished server while a camera stream is quiet; grpc's default
                   # allows one ping per 5 minutes without data and then closes the connection ("too many
                   # pings"), killing a stream that merely paused. Accept one per second; floods still strike out.
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        interceptors = [BearerTokenInterceptor(s.token)] if s.token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_FeatureServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.port}"
        try:
            if s.tls_cert or s.tls_key:
                if not (s.tls_cert and s.tls_key):
                    raise ValueError("TLS needs both --tls-cert and --tls-key")
                creds = grpc.ssl_server_credentials([(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot listen on {address}: {err}") from err
        if port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        await server.start()
        self.server, self.port = server, port
        if s.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as err:
                await server.stop(0)
                raise OSError(f"cannot serve metrics on {s.host}:{s.metrics_port}: {err}") from err
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (device %s)", self.engine.name, s.host, port, self.engine.device)
        return port

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, stop reading frames, answer every accepted frame, then stop."""
        grace = self.settings.grace_s if grace is None else grace
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.service.drain()
        if self.server is not None:
            stopping = asyncio.create_task(self.server.stop(grace))
            try:
                # Feature calls finish their accepted frames; after that only their final statuses are worth a
                # moment (1 s at most), and open health Watch or reflection streams (which never end by
                # themselves) are cancelled instead of holding the whole grace period.
                await asyncio.wait_for(self.service.wait_idle(), grace)
            except asyncio.TimeoutError:
                log.warning("drain: feature calls still running after %.0f s; cancelling them", grace)
            await self.server.stop(min(grace, 1.0))
            await stopping
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close, True, grace)
        self.pipeline.close()
        self.metrics.close()
        self.engine.set_cpu_threads(self._threads_before)


class ServerThread:
    """Run a FeatureServer on its own event loop in a daemon thread (tests, demo, benchmarks).

    Use as a context manager; ``address`` is ``host:port`` once entered. Exiting drains and stops the server.
    """

    def __init__(self, engine: Engine, settings: ServerSettings | None = None) -> None:
        self.server = FeatureServer(engine, settings or ServerSettings(port=0))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="yolostream-server-loop", daemon=True)
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.server.settings.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
                self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
