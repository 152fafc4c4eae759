"""One front-end: the grpc.aio server with its servicer, health, reflection, auth, TLS, message sizes and drain.

``FeatureServer`` is what each front-end process runs: it knows the model only as a card and computes through its
link to the device process. (``serve.in_process.ServerThread`` runs the same pieces inside one process.)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from yolostream.v1 import feature_service_pb2 as pb

from ..ipc.batching import BatcherConfig
from ..common.card import ModelCard
from ..common.errors import GRPC_AIO_LOGGER, UnparsableRequestFilter
from .client_shm import RegionBroker
from .frames import FrameLimits
from .heap import HeapTrimmer
from .link import DeviceLink
from .metrics import ServerMetrics
from .pipeline import Pipeline
from .service import FeatureService, StreamLimits, add_to_server, model_info
from ..common.settings import ServerSettings
from ..common.lifecycle import available_cores
from ..common.sizing import default_decode_threads

log = logging.getLogger(__name__)
# grpc.aio logs a whole traceback for every message a client sends that does not parse: one line is enough.
logging.getLogger(GRPC_AIO_LOGGER).addFilter(UnparsableRequestFilter())

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
#: Room left in a reply for everything but the tensor bytes (names, shapes, letterbox, timings).
REPLY_ENVELOPE_BYTES = 64 * 1024


def listen(server: Any, settings: ServerSettings, address: str | None = None) -> int:
    """Add ``address`` (default ``host:port`` of the settings) to a grpc server, with TLS when the settings have
    it; the bound port. OSError with one line when it cannot be bound.

    Args:
        server: a ``grpc.server`` or ``grpc.aio.server``, not yet started.
        settings: where to listen and the TLS files.
        address: another address, e.g. ``unix:PATH``.
    """
    address = address or f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert or settings.tls_key:
            if not (settings.tls_cert and settings.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials([(Path(settings.tls_key).read_bytes(),
                                                  Path(settings.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not available")
    return port


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


class FeatureServer:
    """The feature service of one front-end on its port (and optional Unix socket); drains cleanly on stop.

    Args:
        settings: the server's settings (address, limits, security, grace).
        card: the served model, as data.
        batching: the device's batching settings (reported by GetModelInfo).
        link: this front-end's link to the device process (started by ``start``).
        reuse_port: share the port with the other front-ends (SO_REUSEPORT).
        uds: also listen on this Unix domain socket path.
        serve_metrics: serve Prometheus metrics on ``settings.metrics_port``.
        trim_heap: give freed heap back to the system after calls end (``heap.HeapTrimmer``); for a process
            that is only this front-end, not one that shares its heap with a device (``serve.in_process``).
    """

    def __init__(self, settings: ServerSettings, card: ModelCard, batching: BatcherConfig, link: DeviceLink, *,
                 reuse_port: bool = False, uds: str | None = None, serve_metrics: bool = True,
                 trim_heap: bool = False) -> None:
        s = self.settings = settings
        self.card = card
        self.link = link
        self.reuse_port = reuse_port
        self.uds = uds
        self.serve_metrics = serve_metrics and s.metrics_port is not None
        limits = FrameLimits(max_pixels=s.max_pixels, max_frame_bytes=s.max_frame_bytes, max_boxes=s.max_boxes)
        decode_threads = s.decode_threads or default_decode_threads(card.device, available_cores(), 1)
        self.pipeline = Pipeline(card, link, limits, default_layers=tuple(s.layers), decode_threads=decode_threads,
                                 max_reply_bytes=s.max_message_bytes - REPLY_ENVELOPE_BYTES)
        stream_limits = StreamLimits(default_in_flight=s.max_in_flight, max_in_flight=s.max_in_flight_limit)
        self.regions = RegionBroker() if s.allow_client_shm else None
        info = model_info(card, batching, stream_limits, limits, s.max_message_bytes, self.regions)
        self.metrics = ServerMetrics({
            "model": info.model_name, "source": info.source, "device": info.device, "dtype": info.dtype,
            "random_weights": str(info.random_weights).lower()})
        link.on_depth = self.metrics.queue_depth
        self.service = FeatureService(self.pipeline, info, stream_limits, self.metrics, self.regions)
        self.trimmer = HeapTrimmer() if trim_heap else None
        if self.trimmer is not None:
            self.service.on_call_end = self.trimmer.call_ended
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _device_lost(self) -> None:
        """The device process is gone: report NOT_SERVING; calls now end with UNAVAILABLE."""
        if self._loop is not None:
            self._loop.create_task(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def start(self) -> int:
        """Connect to the device, bind and start; returns the bound port (useful with port 0).

        Health stays NOT_SERVING until the server can answer (the device warmed up before it reported ready), so
        readiness probes and health-checking clients send nothing earlier. Raises OSError if the port is taken.
        """
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self.link.on_lost = self._device_lost
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.link.start()
        self.pipeline.start()
        if self.regions is not None:
            self.regions.start()
        options = [("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                   # Clients ping to notice a vanished server while a camera stream is quiet; grpc's default
                   # allows one ping per 5 minutes without data and then closes the connection ("too many
                   # pings"), killing a stream that merely paused. Accept one per second; floods still strike out.
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        if s.max_connection_age is not None:
            options.append(("grpc.max_connection_age_ms", max(1, int(s.max_connection_age * 1000))))
        if s.max_connection_age_grace is not None:
            options.append(("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace * 1000)))
        interceptors = [BearerTokenInterceptor(s.token)] if s.token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        add_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = listen(server, s)
        if self.uds:
            listen(server, s, f"unix:{self.uds}")
        await server.start()
        self.server, self.port = server, port
        if self.serve_metrics:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as err:
                await server.stop(0)
                raise OSError(f"cannot serve metrics on {s.host}:{s.metrics_port}: {err}") from err
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (device %s)", self.card.name, s.host, port, self.card.device)
        return port

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Drain: report NOT_SERVING, keep serving for ``drain_delay`` (health-checking clients send new streams
        elsewhere meanwhile), then stop reading frames, answer every accepted frame, and stop."""
        grace = self.settings.grace if grace is None else grace
        drain_delay = self.settings.drain_delay if drain_delay is None else drain_delay
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain_delay > 0 and self.service.active_calls:
            await asyncio.sleep(drain_delay)
        await self.service.drain()
        if self.server is not None:
            try:
                # Feature calls finish their accepted frames (new ones are refused UNAVAILABLE meanwhile); after
                # that only their final statuses are worth a moment (1 s at most), and open health Watch or
                # reflection streams (which never end by themselves) are cancelled instead of holding the grace
                # period. A first stop(grace) here would be awaited by the second whatever its grace.
                await asyncio.wait_for(self.service.wait_idle(), grace)
            except asyncio.TimeoutError:
                log.warning("drain: feature calls still running after %.0f s; cancelling them", grace)
            await self.server.stop(min(grace, 1.0))
        if self.regions is not None:
            self.regions.close()
        self.link.close()
        self.pipeline.close()
        self.metrics.close()
