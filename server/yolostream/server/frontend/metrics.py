"""Prometheus metrics: what an operator watches on a running server.

Every answered frame passes through ``observe`` (OK, ERROR and DROPPED alike), so the counters account for every
frame. Each server has its own registry, so several servers in one process (tests, benchmarks) never mix their
numbers; ``serve`` exposes it over HTTP only when a metrics port is configured.

``yolostream serve`` runs several front-end processes, and ``/metrics`` must count all of them. The supervisor gives
them one directory in ``$PROMETHEUS_MULTIPROC_DIR`` before they import prometheus_client (its multiprocess mode):
every front-end writes its counters there, and front-end 0 serves the sum over every front-end, alive or gone. The
queue gauge is set by each front-end whenever its depth at the device changes (a frame sent, answered, failed or
withdrawn), so the sum over the live front-ends is the true depth at every scrape (prometheus_client cannot call
a function in another process).
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from yolostream.v1 import feature_service_pb2 as pb

from ..common.lifecycle import METRICS_DIR_ENV

_STATUS = {pb.FRAME_STATUS_OK: "ok", pb.FRAME_STATUS_ERROR: "error", pb.FRAME_STATUS_DROPPED: "dropped"}
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STAGES = ("queued", "preprocess", "compute", "encode")


class ServerMetrics:
    """Frames by status, per-stage server time, batch sizes, open streams and queue depth."""

    def __init__(self, model: dict[str, str]) -> None:
        self.shared = bool(os.environ.get(METRICS_DIR_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        self.frames = Counter("yolostream_frames", "Frames answered, by status (ok, error, dropped).", ["status"],
                              registry=self.registry)
        self.stage_seconds = Histogram("yolostream_frame_stage_seconds",
                                       "Server time per frame by stage: queued for the device, decode+letterbox, "
                                       "compute of its batch, device-to-host copy and encoding.", ["stage"],
                                       buckets=_SECONDS, registry=self.registry)
        self.batch_size = Histogram("yolostream_batch_size", "Frames in the device batch each OK frame ran in.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.streams = Gauge("yolostream_streams_active", "Open StreamFeatures calls.", multiprocess_mode="livesum",
                             registry=self.registry)
        self._queue = Gauge("yolostream_queue_frames", "Frames the front-ends have at the device (queued or "
                            "computing).", multiprocess_mode="livesum", registry=self.registry)
        self._info = Info("yolostream_model", "The served model.", registry=self.registry)
        self._info.info(model)
        for status in _STATUS.values():
            self.frames.labels(status)
        self._http = None
        self._thread: threading.Thread | None = None

    def observe(self, result: pb.FrameResult) -> None:
        status = _STATUS.get(result.status, "error")
        self.frames.labels(status).inc()
        if status != "ok":
            return
        t = result.timings
        for stage, micros in zip(_STAGES, (t.queued_us, t.preprocess_us, t.compute_us, t.encode_us)):
            self.stage_seconds.labels(stage).observe(micros / 1e6)
        self.batch_size.observe(result.batch_size)

    def queue_depth(self, frames: int) -> None:
        """This front-end now has ``frames`` at the device (``DeviceLink.on_depth``)."""
        self._queue.set(float(frames))

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); returns the bound port."""
        registry = self.registry
        if self.shared:  # every front-end's numbers, from the shared directory, and the model's description
            registry = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(registry)
            registry.register(self._info)
        self._http, self._thread = start_http_server(port, addr=host, registry=registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._http = None
