"""FeatureClient: the Python API of a yolostream server, with grpc, protobuf, numpy and OpenCV only (no torch).

One client holds one channel, to one server or balanced over several replicas (see :mod:`.resume`); ``extract``
answers one image, ``stream`` returns a :class:`~.stream.FeatureStream` over a video or camera.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

from .options import (
    DetectOptions,
    ObjectFeatureOptions,
    TrackOptions,
    check_encoding,
    feature_options,
    fill_frame,
    stream_compression,
    stream_tracking,
)
from .results import FeatureResult, FeatureServerError, FrameError, ModelInfo, result_from_proto
from .resume import ResumePolicy, balancing_options, channel_target, is_address_list, names_one_address, resume_policy
from .shm import SPARE_SLOTS, StreamMemory
from .stream import REALTIME_SEND_QUEUE, FeatureStream

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Largest gRPC message either way: a raw 1080p frame is 6.2 MB, a multi-scale float32 reply at 640 ~5.7 MB.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: The server's default ``max_in_flight``; the client window is twice the stream's value.
SERVER_DEFAULT_IN_FLIGHT = 8
#: Default FeatureClient.settle_s for targets that may name several replicas.
DEFAULT_SETTLE_S = 0.5


class FeatureClient:
    """A connection to a yolostream server or to several replicas; use it as a context manager.

    ``address`` is ``host:port``, a list of ``ip:port`` replicas (or one comma-separated string of them), or any
    gRPC target (``dns:///name:port``, ``ipv4:a:p,b:p``). Calls are balanced round-robin over the replicas that
    are up and report SERVING on their health service; a replica that drains or warms up gets no new calls.
    ``token`` is sent as ``authorization: Bearer <token>`` with every call. TLS is used when ``tls`` is true or
    ``tls_ca`` (a PEM file of root certificates; the system roots otherwise) is given; ``tls_server_name`` overrides
    the name the certificate must carry (required with a list of IP addresses, which names no host). ``timeout``
    (seconds) is the deadline of ``model_info`` and ``extract``; streams have none, as a camera may run for days, and
    rely on keepalive pings every ``keepalive_s`` (answered within ``keepalive_timeout_s``) to notice a server host
    that disappears without closing the connection. ``resume`` (a :class:`ResumePolicy`, or False to turn it off)
    says how streams move to another replica when theirs fails; it is on by default. ``settle_s`` is how long the
    first streams of a new client wait for every replica to connect, so that they spread (see ``_settle``; None:
    ``DEFAULT_SETTLE_S``, or 0 when the target is one IP address, which cannot name several replicas).
    ``shared_memory``: streams pass frames and features through memory shared with the server instead of the
    connection (the client must be on the server's host and the server run with ``--allow-client-shm``; see
    :meth:`stream`); ``extract`` is unchanged.
    """

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *, token: str | None = None,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_server_name: str | None = None,
                 timeout: float | None = 30.0, max_message_bytes: int = MAX_MESSAGE_BYTES, keepalive_s: float = 20.0,
                 keepalive_timeout_s: float = 10.0, resume: ResumePolicy | bool = True,
                 settle_s: float | None = None, shared_memory: bool = False) -> None:
        target = channel_target(address)
        self.address = address if isinstance(address, str) else ",".join(address)
        self.target = target
        self.timeout = timeout
        self.shared_memory = shared_memory
        self.resume = resume_policy(resume, ResumePolicy())
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            # Every ping gets this deadline too: without it, a BDP-probe ping that is in flight when the server
            # freezes is never timed out and keeps the keepalive ping from being sent (measured: a stream to a
            # SIGSTOPped server then hangs forever instead of failing after keepalive_s + keepalive_timeout_s).
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            *balancing_options(),
        ]
        if tls or tls_ca is not None:
            if is_address_list(target) and not tls_server_name:
                raise ValueError("TLS over a list of IP addresses needs tls_server_name (--tls-server-name): the "
                                 "name every replica's certificate carries")
            root = Path(tls_ca).read_bytes() if tls_ca is not None else None
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        # When a replica was first reached (a call answered, or the channel seen ready): a stream that fails
        # before that has nothing to resume and fails at once. Found without a standing connectivity subscription,
        # whose polling thread races channel.close() in grpcio ("Cannot monitor channel state: Channel closed!").
        self._reached_at: float | None = None
        self.settle_s = (0.0 if names_one_address(target) else DEFAULT_SETTLE_S) if settle_s is None else settle_s
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._in_flight_default: int | None = None
        self._class_names: tuple[str, ...] | None = None

    @property
    def _reached(self) -> bool:
        return self._reached_at is not None

    def _mark_reached(self) -> None:
        if self._reached_at is None:
            self._reached_at = time.monotonic()

    def _settle(self) -> None:
        """Before the first streams of a new channel, give every replica ``settle_s`` to connect.

        round_robin spreads calls over the replicas that are ready *when each call starts*; the first replica to
        answer its health check makes the channel ready while the others are still connecting, so streams opened
        at once on a new client would all land on it and, being long-lived, stay there (measured on 3 loopback
        replicas and a loaded 2-core machine, 6 streams: 0/4/2 without settling, 1/4/1 with 0.25 s, 2/2/2 with
        1 s). Waiting ``settle_s`` after the channel first became ready (and at most ``settle_s`` for it to)
        costs that once per client.
        """
        if self.settle_s <= 0:
            return
        if self._reached_at is None:
            self._wait_ready(self.settle_s)
        if self._reached_at is not None:
            left = self._reached_at + self.settle_s - time.monotonic()
            if left > 0:
                threading.Event().wait(left)

    def _wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a replica that is up and healthy; False if none came."""
        if timeout <= 0:
            return False
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
            self._mark_reached()
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()

    def __enter__(self) -> "FeatureClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; streams still open on it end with an error."""
        self._channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            reply = method(request, timeout=self.timeout, metadata=self._metadata)
            self._mark_reached()
            return reply
        except grpc.RpcError as err:
            raise FeatureServerError.from_rpc(err, self.address) from None

    def model_info(self) -> ModelInfo:
        """The served model, its layer catalogue, the server's defaults and limits."""
        info = ModelInfo.from_proto(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))
        self._in_flight_default = int(info.batching["max_in_flight"]) or SERVER_DEFAULT_IN_FLIGHT
        self._class_names = info.class_names
        return info

    def class_names(self) -> tuple[str, ...]:
        """The served model's class names (asked once; empty when its checkpoint carries none)."""
        if self._class_names is None:
            self.model_info()
        return self._class_names

    def _server_in_flight(self) -> int:
        """The server's default max_in_flight (asked once): the send window follows what the server will hold."""
        if self._in_flight_default is None:
            self.model_info()
        return self._in_flight_default

    def extract(self, image: np.ndarray, *, layers: str | Sequence[str | int] | None = None,
                dtype: str | None = None, pooling: str | None = None, letterbox: str | None = None,
                imgsz: int | None = None, encoding: str = "png", quality: int = 90,
                detect: DetectOptions | bool | None = None, objects: ObjectFeatureOptions | str | None = None,
                boxes: Any = None, box_ids: Any = None) -> FeatureResult:
        """Features of one BGR image (lossless PNG by default, so they equal ``yolostream extract``'s).

        ``detect`` and ``objects`` as for :func:`feature_options`. ``boxes``: your own (N, 4) x1, y1, x2, y2 boxes
        in image pixels, each to get an object vector instead of running detection, with optional ``box_ids``
        (N integers, echoed in ``result.detections.box_ids``).
        Raises FrameError when the server cannot process the image, FeatureServerError for a bad request.
        """
        check_encoding(encoding, quality)
        request = pb.ExtractRequest(options=feature_options(layers, dtype, pooling, letterbox, imgsz, detect,
                                                            objects))
        fill_frame(request.frame, image, encoding, quality)
        if boxes is not None:
            wire.set_frame_boxes(request.frame, boxes, box_ids)
        request.frame.capture_timestamp_us = int(round(time.time() * 1e6))
        names = self.class_names() if detect else ()
        start = time.perf_counter()
        msg = self._unary(self._stub.Extract, request)
        result = result_from_proto(msg, time.perf_counter() - start, None, names)
        if result.status != "ok":
            raise FrameError(f"server {self.address} could not process the image: {result.error}")
        return result

    def stream(self, frames: Iterable[np.ndarray | tuple[np.ndarray, float]], *,
               layers: str | Sequence[str | int] | None = None, dtype: str | None = None,
               pooling: str | None = None, letterbox: str | None = None, imgsz: int | None = None,
               realtime: bool = False, max_in_flight: int | None = None, encoding: str = "jpeg",
               quality: int = 90, keep_images: bool = False,
               resume: ResumePolicy | bool | None = None, detect: DetectOptions | bool | None = None,
               objects: ObjectFeatureOptions | str | None = None, compression: str | None = None,
               track: TrackOptions | bool | None = None, shared_memory: bool | None = None,
               shm_slots: int | None = None) -> "FeatureStream":
        """Stream ``frames`` (BGR arrays, or ``(array, capture_time_seconds)`` pairs) and iterate over the results.

        A frame may also come with boxes of its own, as ``(array, time, boxes)`` or ``(array, time, boxes, ids)``
        (time may be None): those boxes get object vectors instead of detection (a tracker's predicted boxes,
        say). ``detect`` and ``objects`` as for :func:`feature_options`.

        Results come in frame order, one per frame, with frame ids 0, 1, 2... in the order of ``frames``; a frame
        without a timestamp is stamped with ``time.time()`` when read. ``max_in_flight`` is how many frames the
        server holds at once (None: the server's default, from GetModelInfo); ``keep_images`` puts each frame on its result (``image``),
        for drawing. The iterable is consumed in a background thread; an exception it raises (a camera that
        disappears) is re-raised after the results of the frames read before it. ``resume`` overrides the client's
        policy for this stream (False: end with UNAVAILABLE as soon as the replica carrying it fails).

        ``dtype="uint8"`` asks for 8-bit codes (a quarter of float32's bytes): ``result.features`` still holds float32
        arrays (decoded), and ``result.codes`` the codes with their per-channel scales and offsets.
        ``compression="zstd"`` asks the server to compress each tensor losslessly (byte shuffle, then Zstandard) when
        that makes it smaller; it needs the zstandard package here too (the ``compress`` extra). Results are the same
        either way; only the bytes on the wire change.

        ``track=True`` (or a ``TrackOptions``) tracks the boxes on the server: each result's ``detections`` gets
        ``track_ids`` and ``track_new``, and ``result.track_epoch`` says which tracker state they belong to (it
        changes when the stream is resumed on another replica, whose state starts anew). Frames may carry scores
        for their own boxes, as ``(array, time, boxes, ids, scores)`` (ids may be None).

        ``shared_memory`` (default: the client's) sends frames as raw pixels through a region of memory shared with
        the server (a sealed memfd of ``shm_slots`` slots, sized from the first frame and the server's largest
        reply; default: the frames the stream keeps unanswered plus ``SPARE_SLOTS``) and receives the features
        there: result arrays are then read-only views of the region, and a frame's slot is reused only once every
        array of its result has been dropped, so copy the arrays of results you keep (when every slot is held,
        sending waits). Larger frames than the first travel in the message, their features still in the region.
        A server without ``--allow-client-shm`` ends the stream with FAILED_PRECONDITION naming the flag; a client
        on another host ends it with FAILED_PRECONDITION too.
        """
        check_encoding(encoding, quality)
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        config = pb.StreamConfig(options=feature_options(layers, dtype, pooling, letterbox, imgsz, detect, objects),
                                 max_in_flight=max_in_flight or 0, realtime=realtime,
                                 compression=stream_compression(compression), tracking=stream_tracking(track))
        names = self.class_names() if detect else ()
        window = None if realtime else 2 * (max_in_flight or self._server_in_flight())
        memory = None
        if self.shared_memory if shared_memory is None else shared_memory:
            if shm_slots is not None and shm_slots < 1:
                raise ValueError(f"shm_slots must be at least 1, got {shm_slots}")
            # realtime: the frames the server holds, its one waiting frame and the few read ahead of gRPC
            unanswered = window or (max_in_flight or self._server_in_flight()) + 1 + REALTIME_SEND_QUEUE
            memory = StreamMemory(shm_slots or unanswered + SPARE_SLOTS)
        self._settle()
        return FeatureStream(self, frames, config, encoding=encoding, quality=quality, window=window,
                             keep_images=keep_images, policy=resume_policy(resume, self.resume), class_names=names,
                             memory=memory)

    def _open_stream(self, requests: Iterator[pb.StreamRequest]) -> Any:
        return self._stub.StreamFeatures(requests, metadata=self._metadata)
