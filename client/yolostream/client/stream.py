"""FeatureStream: one stream of frames to a yolostream server and its results, in order, surviving its replica.

``FeatureClient.stream`` keeps three things moving at once, so that neither side waits for the other:

- a *sender thread* pulls frames from the caller's iterable (a camera, say), encodes them (JPEG, PNG or raw) and
  keeps them, numbered, until they are answered;
- gRPC's own thread takes them from there, in order, and writes them to the connection;
- the caller's thread reads the answers as they arrive and turns them into :class:`FeatureResult` objects.

Backpressure, the choice made here. Outside realtime mode the sender waits for room in a window of
``2 × max_in_flight`` unanswered frames *before* it reads the next frame from the source: a slow server slows the
source down and the client never buffers more than the window. In realtime mode the sender does not wait for
answers; the server keeps only the newest waiting frame and answers the others DROPPED, so a fast camera is never
held back by a slow model. The sender then only waits while gRPC has not taken its few frames read ahead, which
happens when the connection itself cannot take more bytes. The client never drops frames on its own: every frame
it read gets exactly one result (OK, ERROR or DROPPED) from the server.

Many replicas. The address may name several servers (a list, ``ipv4:a:p,b:p``, ``dns:///name:port``): the channel
balances calls round-robin over the healthy ones (see :mod:`.resume`). Keeping every unanswered frame is what lets
a stream survive its replica: on UNAVAILABLE the stream is reopened on another and those frames are sent again.

The sender thread always ends: when the answers run out, when the server fails, when the caller stops iterating
early (``close()``, leaving a ``with`` block, ``break`` and letting the stream go) or on KeyboardInterrupt, the call
is cancelled, the waiting threads are woken and the sender is joined. A server that dies mid-stream (and no replica
to resume on) ends the iteration with :class:`FeatureServerError` (UNAVAILABLE) thanks to the closed connection or,
for a host that vanishes silently, to the channel's keepalive pings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from .options import fill_frame
from .results import FeatureResult, FeatureServerError, result_from_proto
from .resume import DRAIN_REFUSAL, RESUMABLE_CODES, ResumePolicy
from .shm import SharedRegion, StreamMemory

if TYPE_CHECKING:
    from .client import FeatureClient

log = logging.getLogger(__name__)

#: Frames encoded ahead of gRPC's writer in realtime mode (outside it, the window bounds them).
REALTIME_SEND_QUEUE = 2
#: Longest wait in close() for the sender thread, which may be stuck in a network camera's read.
SENDER_JOIN_S = 30.0


@dataclass
class _Pending:
    """A frame read from the source and not answered yet: kept, encoded, so that it can be sent again."""

    request: pb.StreamRequest
    image: np.ndarray | None
    sent: float | None = None
    sends: int = 0
    #: The shared-memory slot holding the frame and room for its features (shared-memory streams only).
    slot: int | None = None


@dataclass
class _Attempt:
    """One StreamFeatures call of a stream; ``cursor`` is the id of the next frame its request iterator sends.
    ``call`` is the call once opened (``opened`` is then set): a shared-memory stream reads its handshake there."""

    cursor: int
    closed: bool = False
    call: Any = None
    opened: threading.Event = field(default_factory=threading.Event)

    def bind(self, call: Any) -> None:
        self.call = call
        self.opened.set()


class _SendState:
    """Shared by the sender thread, gRPC's request threads and the reader; never references the FeatureStream,
    so that dropping the stream object lets it be finalised (and closed) while the threads still run.

    Frames are numbered 0, 1, 2... as read; ``answered`` is the lowest id without an answer, ``read`` the next id,
    and ``frames`` holds every id in between. Each attempt (call) sends from its own cursor, so a new call can start
    again at ``answered`` while the sender keeps adding frames. ``room`` bounds how far the sender reads ahead: the
    window of unanswered frames outside realtime mode, the frames not yet taken by the current call in it.
    """

    def __init__(self, window: int | None, send_ahead: int, memory: StreamMemory | None = None) -> None:
        self.memory = memory
        #: Why the stream's shared memory could not reach the server (raised by the reader instead of the cancel).
        self.memory_error: FeatureServerError | None = None
        self.cond = threading.Condition()
        self.window = window
        self.send_ahead = send_ahead
        self.stop = threading.Event()
        self.frames: dict[int, _Pending] = {}
        self.read = 0
        self.answered = 0
        self.source_done = False
        self.error: BaseException | None = None
        self.attempt = _Attempt(0)

    def has_room(self) -> bool:
        if self.window is not None:
            return self.read - self.answered < self.window
        return self.read - self.attempt.cursor < self.send_ahead

    def wait_for_room(self) -> bool:
        """Block until the sender may read another frame; False once the stream is closed."""
        with self.cond:
            self.cond.wait_for(lambda: self.stop.is_set() or self.has_room())
            return not self.stop.is_set()

    def add(self, pending: _Pending) -> None:
        with self.cond:
            self.frames[self.read] = pending
            self.read += 1
            self.cond.notify_all()

    def answer(self, frame_id: int) -> _Pending | None:
        """Take the answered frame out; answers come in frame order, so it is the lowest unanswered one."""
        with self.cond:
            pending = self.frames.pop(frame_id, None)
            self.answered = max(self.answered, frame_id + 1)
            self.cond.notify_all()
            return pending

    def new_attempt(self) -> _Attempt:
        """Close the current call's request iterator and start another at the first unanswered frame."""
        with self.cond:
            self.attempt.closed = True
            self.attempt = _Attempt(self.answered)
            self.cond.notify_all()
            return self.attempt

    def finish(self) -> None:
        """Wake every waiting thread after ``stop`` was set."""
        self.stop.set()
        with self.cond:
            self.attempt.closed = True
            self.attempt.opened.set()
            self.cond.notify_all()
        if self.memory is not None:
            self.memory.interrupt()


def _send_frames(state: _SendState, frames: Iterable[Any], encoding: str, quality: int, keep_images: bool) -> None:
    """Sender thread: read and encode frames until the source ends, fails or the stream is closed."""
    iterator = iter(frames)
    try:
        while state.wait_for_room():
            try:
                item = next(iterator)
            except StopIteration:
                break
            boxes = ids = scores = None
            if isinstance(item, tuple):
                if not 2 <= len(item) <= 5:
                    raise ValueError(f"a frame tuple is (image, time[, boxes[, ids[, scores]]]), got {len(item)} items")
                image, timestamp, boxes, ids, scores = (*item, None, None, None)[:5]
            else:
                image, timestamp = item, None
            if timestamp is None:
                timestamp = time.time()
            request = pb.StreamRequest()
            slot = None
            if state.memory is not None:
                state.memory.offer(image)
                slot = state.memory.acquire(state.stop)
                if slot is None:
                    break
                try:
                    request.frame.shared_memory.CopyFrom(state.memory.region.frame_ref(slot, image))
                except BaseException:
                    state.memory.region.release(slot)
                    raise
            if slot is None or not request.frame.shared_memory.HasField("image"):  # pixels in the message
                fill_frame(request.frame, image, encoding, quality)
            if boxes is not None:
                wire.set_frame_boxes(request.frame, boxes, ids, scores)
            request.frame.frame_id = state.read
            request.frame.capture_timestamp_us = int(round(float(timestamp) * 1e6))
            state.add(_Pending(request, image if keep_images else None, slot=slot))
    except BaseException as err:  # re-raised in the reader's thread once the answers are in
        state.error = err
    finally:
        if state.memory is not None:
            state.memory.source_ended()
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # a source failing to release must not hide the stream's own outcome
                log.exception("closing the frame source failed")
        with state.cond:
            state.source_done = True
            state.cond.notify_all()


def _requests(state: _SendState, attempt: _Attempt, config: pb.StreamConfig,
              address: str = "") -> Iterator[pb.StreamRequest]:
    """The request iterator of one call, consumed by gRPC in its own thread: the config, then every frame from the
    attempt's cursor on, until the source ends (the half-close lets the server finish) or the attempt is closed.

    A shared-memory stream sends its config once the first frame is read (it sizes the region; a source without
    frames asks for no shared memory), then registers the region with the front-end that answered the config
    (see :class:`~.shm.StreamMemory`) before any frame; a region that cannot reach the server cancels the call."""
    memory = state.memory
    if memory is not None and memory.wait_first():
        shared = pb.StreamConfig()
        shared.CopyFrom(config)
        shared.shared_memory.SetInParent()
        yield pb.StreamRequest(config=shared)
        attempt.opened.wait()
        if attempt.closed or attempt.call is None:
            return
        try:
            if not memory.connect(attempt.call.initial_metadata(), address):
                return
        except FeatureServerError as err:
            state.memory_error = err
            attempt.call.cancel()
            return
    else:
        yield pb.StreamRequest(config=config)
    while True:
        with state.cond:
            state.cond.wait_for(lambda: attempt.closed or max(attempt.cursor, state.answered) < state.read
                                or state.source_done)
            following = max(attempt.cursor, state.answered)
            if attempt.closed or following >= state.read:
                return  # closed, or the source ended and every frame went out on this call
            pending = state.frames[following]
            attempt.cursor = pending.request.frame.frame_id + 1
            pending.sends += 1
            if pending.sent is None:
                pending.sent = time.perf_counter()
            state.cond.notify_all()
        yield pending.request


class FeatureStream:
    """An iterator of :class:`FeatureResult`, one per frame in frame order; also a context manager.

    When the replica carrying the stream fails (UNAVAILABLE: it died, drained, or keepalive found it frozen), the
    stream is reopened over the same channel, which round_robin places on a healthy replica, and the frames sent
    but not answered are sent again: every frame still gets exactly one result, in order, and ``retries`` on a
    result says how many times it was re-sent. ``resumes`` counts the reopenings. The policy bounds the attempts
    and the time; past them the stream ends with FeatureServerError UNAVAILABLE. A stream whose first call fails
    while the channel has never reached any replica fails at once (there is nothing to resume).

    ``close()`` stops early: it cancels the call and joins the sender thread. It runs by itself when the iteration
    ends, fails, or the object is garbage-collected. ``frames_read`` counts frames taken from the source.
    """

    def __init__(self, client: FeatureClient, frames: Iterable[Any], config: pb.StreamConfig, *, encoding: str,
                 quality: int, window: int | None, keep_images: bool, policy: ResumePolicy,
                 class_names: Sequence[str] = (), memory: StreamMemory | None = None) -> None:
        self._closed = True  # until fully started, so that a failed start leaves nothing for __del__ to close
        self._client = client
        self._config = config
        self._policy = policy
        self._class_names = tuple(class_names)
        self._address = client.address
        self._state = state = _SendState(window, REALTIME_SEND_QUEUE, memory)
        self._sender = threading.Thread(target=_send_frames, args=(state, frames, encoding, quality, keep_images),
                                        name="yolostream-sender", daemon=True)
        self._call = client._open_stream(_requests(state, state.attempt, config, self._address))
        state.attempt.bind(self._call)
        self.resumes = 0
        self._track_epoch = 0  # the latest tracker epoch answered, passed on when the stream resumes
        self._cut: tuple[float, FeatureServerError] | None = None  # when and why the stream was cut, until an answer
        self._failures = 0
        # Cancels a resumed call that has not answered by the end of the resume time (a replica that accepts the
        # connection but never answers would otherwise hold the stream for as long as keepalive takes to tell).
        self._watchdog = threading.Timer(0, lambda: None)
        self._expired = threading.Event()
        self._sender.start()
        self._closed = False

    @property
    def frames_read(self) -> int:
        return self._state.read

    @property
    def shared_memory(self) -> "SharedRegion | None":
        """The stream's shared-memory region (its memfd's name shows in /proc/PID/maps); None for a stream without
        shared memory, and until the server has answered the config."""
        return self._state.memory.region if self._state.memory is not None else None

    def __iter__(self) -> "FeatureStream":
        return self

    def __next__(self) -> FeatureResult:
        if self._closed:
            raise StopIteration
        state = self._state
        while True:
            try:
                msg = next(self._call)
            except StopIteration:
                self.close()
                if state.error is not None:
                    raise state.error from None
                raise
            except grpc.RpcError as err:
                if state.memory_error is not None:
                    self.close()
                    raise state.memory_error from None
                error = FeatureServerError.from_rpc(err, self._address)
                if self._expired.is_set():
                    self._give_up(error)
                self._resume_or_raise(error)
                continue
            except BaseException:
                self.close()
                raise
            result = msg.result
            if (self._policy.enabled and result.status == pb.FRAME_STATUS_ERROR
                    and result.error_message.startswith(DRAIN_REFUSAL)):
                self._resume_or_raise(FeatureServerError(grpc.StatusCode.UNAVAILABLE, result.error_message,
                                                         self._address))
                continue
            break
        received = time.perf_counter()
        if result.frame_id != state.answered:
            self.close()
            raise FeatureServerError(grpc.StatusCode.INTERNAL, f"answer for frame {result.frame_id} while frame "
                                     f"{state.answered} was expected: answers must come once each, in order",
                                     self._address)
        pending = state.answer(result.frame_id)
        self._client._mark_reached()
        if self._cut is not None:
            self._watchdog.cancel()
            self._cut, self._failures = None, 0
        sent = pending.sent if pending is not None else None
        features = None
        if pending is not None and pending.slot is not None:
            try:
                features = state.memory.region.features(result, pending.slot)
            except ValueError as err:
                self.close()
                raise FeatureServerError(grpc.StatusCode.INTERNAL, str(err), self._address) from None
        answer = result_from_proto(result, received - sent if sent is not None else None,
                                    pending.image if pending is not None else None, self._class_names, features)
        answer.retries = max(0, pending.sends - 1) if pending is not None else 0
        self._track_epoch = max(self._track_epoch, answer.track_epoch)
        return answer

    def _resume_or_raise(self, error: FeatureServerError) -> None:
        """Reopen the stream after ``error``, or close it and raise: not resumable, or out of attempts or time."""
        policy = self._policy
        if not policy.enabled or error.code not in RESUMABLE_CODES or not self._client._reached:
            self.close()
            raise error
        now = time.monotonic()
        if self._cut is None:
            self._cut = (now, error)
        since = self._cut[0]
        self._failures += 1
        remaining = since + policy.timeout_s - now
        if self._failures > policy.max_attempts or remaining <= 0:
            self._give_up(error)
        self._state.stop.wait(min(policy.backoff(self._failures), remaining))
        if not self._client._wait_ready(since + policy.timeout_s - time.monotonic()):
            self._give_up(error)
        if self._state.stop.is_set():
            raise StopIteration
        self._call.cancel()
        if self._config.HasField("tracking") and self._track_epoch:  # the new replica's state is a new epoch
            self._config.tracking.previous_epoch = self._track_epoch
        attempt = self._state.new_attempt()
        log.info("resuming the stream at frame %d after %s", attempt.cursor, error)
        self._call = call = self._client._open_stream(_requests(self._state, attempt, self._config, self._address))
        attempt.bind(call)
        self.resumes += 1
        self._watchdog.cancel()
        self._watchdog = threading.Timer(max(0.0, since + policy.timeout_s - time.monotonic()), self._expire, (call,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self, call: Any) -> None:
        """Watchdog: the resume time ran out before the resumed call answered; end it, and the stream with it."""
        if call is self._call and self._cut is not None:
            self._expired.set()
            call.cancel()

    def _give_up(self, last: FeatureServerError) -> None:
        since, first = self._cut
        self.close()
        policy = self._policy
        raise FeatureServerError(
            grpc.StatusCode.UNAVAILABLE,
            f"stream lost and not resumed within {policy.timeout_s:g} s / {policy.max_attempts} attempt(s) "
            f"({self._failures - 1} reopening(s) over {time.monotonic() - since:.1f} s); cut by: {first.details}"
            + (f"; last: {last.details}" if last is not first else ""),
            self._address) from None

    def close(self) -> None:
        """End the stream now; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        self._state.finish()
        self._call.cancel()
        if self._sender is not threading.current_thread():
            # The sender notices the stop at once, unless it is inside a source read; a network camera that hangs
            # there must not hang the caller too (the thread is a daemon).
            self._sender.join(timeout=SENDER_JOIN_S)
            if self._sender.is_alive():
                log.warning("the frame source did not return within %.0f s; leaving its thread behind", SENDER_JOIN_S)
        if self._state.memory is not None:
            self._state.memory.close()

    def __enter__(self) -> "FeatureStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
