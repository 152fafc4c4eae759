"""Shared memory with a server on the same host: the client's side of ``StreamConfig.shared_memory``.

A :class:`SharedRegion` is one stream's memory: a memfd (it has no name in any file system, so nothing can be left
in /dev/shm), sealed against shrinking and growing before the server sees it, cut into equal slots. A slot holds one
frame's raw pixels and the room for that frame's tensors. The sender writes a frame into a free slot; the server
letterboxes it from there and writes the features into the slot's output room; the result's arrays are views of
that room. Nothing is copied on this side after the frame, and only offsets travel in the messages.

A slot is given back when the last array viewing it is garbage-collected (a ``weakref.finalize`` on the one array
every view of the slot shares), never earlier, so the server never writes over features still in use. When every
slot is held the sender waits: copy the arrays of results you keep (``np.array(r.features["P3"])``), or the
stream slows down to the slots left.

:class:`StreamMemory` makes the region when the stream's size is known (its first frame, and the output room the
server asks for in the call's initial metadata) and :func:`register` passes it to the front-end serving each call
of the stream, over the abstract Unix socket that front-end names, with the token it gives (``SCM_RIGHTS``: see
the proto comment on ``SharedMemoryOptions``). A stream that resumes on another replica registers the same region
there again.

Linux only (memfd_create and file seals). Imports grpc, protobuf and numpy only.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import socket
import threading
import weakref
from collections.abc import Sequence

import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab, wire

from .options import frame_pixels

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds
from .results import FeatureServerError

#: Slots beyond the frames a stream keeps unanswered: results whose arrays the caller still holds.
SPARE_SLOTS = 4
#: The seals every region carries: it can neither shrink (which would make the server's accesses fault) nor grow,
#: and no seal can be removed or added later.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_NAMES = itertools.count()


def sealed_memfd(size: int, name: str) -> int:
    """A new memfd of ``size`` bytes (zeros, no memory used until written), sealed with ``SEALS``; the caller
    closes it. ``name`` shows in /proc/PID/maps only.

    Args:
        size: bytes, at least 1.
        name: the memfd's name, for debugging.
    """
    if not hasattr(os, "memfd_create"):
        raise OSError("shared memory with the server needs Linux (memfd_create)")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedRegion:
    """A sealed memfd of ``slots`` slots, each ``frame_bytes`` of pixels then ``output_bytes`` of tensor room (both
    rounded up to 64), mapped here. Slots are handed out last-freed first, so the pages of slots a stream never
    needs at once are never touched (and never take memory).

    Args:
        slots: number of slots.
        frame_bytes: the largest frame (height × width × channels) a slot takes; larger ones travel in the message.
        output_bytes: the output room of a slot: the most one frame's tensors can need.
    """

    def __init__(self, slots: int, frame_bytes: int, output_bytes: int) -> None:
        if slots < 1:
            raise ValueError(f"a region needs at least one slot, got {slots}")
        self.slots = slots
        self.frame_bytes = vocab.shm_aligned(max(1, frame_bytes))
        self.output_bytes = vocab.shm_aligned(max(1, output_bytes))
        self.slot_bytes = self.frame_bytes + self.output_bytes
        self.size = slots * self.slot_bytes
        self.name = f"yolostream-client-{os.getpid()}-{next(_NAMES)}"
        fd = sealed_memfd(self.size, self.name)
        try:
            self._map = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self._free = list(range(slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._interrupted = False

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self, stop: threading.Event, timeout: float | None = None) -> int | None:
        """A free slot, waiting while every slot is held (a held slot is never handed out again); None once ``stop``
        is set, ``interrupt`` was called or ``timeout`` seconds passed (None: no limit)."""
        with self._cond:
            self._cond.wait_for(lambda: self._free or stop.is_set() or self._interrupted, timeout)
            if stop.is_set() or self._interrupted or not self._free:
                return None
            return self._free.pop()

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array``'s elements lie in this region (a result array read from shared memory does)."""
        start = np.frombuffer(self._map, np.uint8, 1).__array_interface__["data"][0]
        low, high = byte_bounds(array)
        return start <= low and high <= start + self.size

    def release(self, slot: int) -> None:
        """Give a slot back (its frame is answered and no array views its room any more)."""
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Wake every ``acquire`` with None: the stream is closing."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def frame_ref(self, slot: int, image: np.ndarray | None) -> pb.SharedMemoryFrame:
        """Where a frame in ``slot`` goes: the slot's output room, and the frame's pixels, copied into the slot, when
        ``image`` is given and fits (``image`` is then set on the returned reference)."""
        start = slot * self.slot_bytes
        ref = pb.SharedMemoryFrame(output_offset=start + self.frame_bytes, output_length=self.output_bytes)
        if image is None:
            return ref
        pixels = frame_pixels(image)
        height, width = pixels.shape[:2]
        channels = 1 if pixels.ndim == 2 else 3
        nbytes = height * width * channels
        if nbytes > self.frame_bytes:
            return ref
        np.copyto(np.frombuffer(self._map, np.uint8, nbytes, start).reshape(pixels.shape), pixels)
        ref.image.offset, ref.image.length = start, nbytes
        ref.image.height, ref.image.width, ref.image.channels = height, width, channels
        ref.image.format = pb.PIXEL_FORMAT_GRAY if channels == 1 else pb.PIXEL_FORMAT_BGR
        return ref

    def features(self, result: pb.FrameResult, slot: int) -> dict[str, np.ndarray] | None:
        """The result's arrays, those in shared memory as read-only views of ``slot``'s output room, which is then
        released when the last of them is collected; None (and the slot released now) when no tensor is there.
        ValueError, the slot released, when the server points outside the slot's room."""
        placed = [t for t in result.tensors if t.HasField("shared_memory")]
        if not placed:
            self.release(slot)
            return None
        base = slot * self.slot_bytes + self.frame_bytes
        room = np.frombuffer(self._map, np.uint8, self.output_bytes, base)
        weakref.finalize(room, self.release, slot)
        arrays = {}
        for tensor in result.tensors:
            if not tensor.HasField("shared_memory"):
                arrays[tensor.name] = wire.tensor_from_proto(tensor)
                continue
            start, length = tensor.shared_memory.offset - base, tensor.shared_memory.length
            if start < 0 or length > self.output_bytes - start:
                raise ValueError(f"the server placed tensor {tensor.name[:64]!r} at offset "
                                 f"{tensor.shared_memory.offset} ({length} bytes), outside the frame's output room")
            array = wire.tensor_from_proto(tensor, room[start:start + length])
            array.flags.writeable = False
            arrays[tensor.name] = array
        return arrays

    def close(self) -> None:
        """Close the descriptor (no further registration); the mapping stays until the last array goes."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def handshake(metadata: Sequence[tuple[str, str]] | None) -> tuple[str, str, int] | None:
    """(socket, token, output bytes) from a call's initial metadata; None when the server sent none (the call
    failed first: its status says why). ValueError for a socket that is not a yolostream front-end's."""
    values = dict(metadata or ())
    if vocab.SHM_TOKEN_KEY not in values or vocab.SHM_SOCKET_KEY not in values:
        return None
    name = str(values[vocab.SHM_SOCKET_KEY])
    if not name.startswith("@yolostream-") or len(name) > 107:
        raise ValueError("the server named a socket that is not a yolostream front-end's")
    return name, str(values[vocab.SHM_TOKEN_KEY]), int(values.get(vocab.SHM_OUTPUT_BYTES_KEY, 0))


def register(fd: int, socket_name: str, token: str, timeout: float = vocab.SHM_REGISTER_TIMEOUT_S) -> None:
    """Pass the region ``fd`` to the front-end listening on ``socket_name`` (an abstract socket, "@name") for the
    stream whose ``token`` it gave. OSError when the socket cannot be reached (another host or network namespace),
    ValueError with the server's reason when it refuses the region.

    Args:
        fd: the region's memfd.
        socket_name: the ``yolostream-shm-socket`` metadata value.
        token: the ``yolostream-shm-token`` metadata value.
        timeout: seconds for connecting, sending and the answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        conn.connect("\0" + socket_name[1:])
        socket.send_fds(conn, [token.encode("ascii")], [fd])
        answer = conn.recv(512)
    if answer != vocab.SHM_OK:
        reason = answer[len(vocab.SHM_ERROR):] if answer.startswith(vocab.SHM_ERROR) else answer
        raise ValueError(reason.decode("utf-8", errors="replace") or "no answer")


class StreamMemory:
    """The shared memory of one stream: the region, made once its size is known, and registered for every call.

    The sender reports the first frame (``offer``) and then takes slots (``acquire``), which waits for the region.
    Each call of the stream runs ``connect`` after sending its config: it reads the handshake from the call's
    initial metadata, makes the region the first time (sized for the first frame and the room the server asks
    for) and registers it with the front-end serving the call.

    Args:
        slots: number of slots of the region.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.region: SharedRegion | None = None
        self._first: int | None = None
        self._cond = threading.Condition()
        self._ended = False
        self._interrupted = False

    def offer(self, image: np.ndarray) -> None:
        """The sender has read a frame: the first one sizes the region's frame part."""
        with self._cond:
            if self._first is None:
                pixels = frame_pixels(image)
                self._first = pixels.size
                self._cond.notify_all()

    def source_ended(self) -> None:
        """The sender read its last frame (there may have been none)."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_first(self) -> bool:
        """Block until the first frame is known (True), or the source ended without one or the stream closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._first is not None or self._ended or self._interrupted)
            return self._first is not None

    def acquire(self, stop: threading.Event) -> int | None:
        """A free slot of the region, waiting for the region and for a slot; None once the stream stops."""
        with self._cond:
            self._cond.wait_for(lambda: self.region is not None or stop.is_set() or self._interrupted)
            region = self.region
        if region is None:
            return None
        return region.acquire(stop)

    def interrupt(self) -> None:
        """The stream is closing (or its source ended): wake every wait."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()
        if self.region is not None:
            self.region.interrupt()

    def connect(self, metadata: Sequence[tuple[str, str]] | None, address: str) -> bool:
        """Register the region for one call from its initial metadata, making the region the first time; False
        when the metadata holds no handshake (the call failed). FeatureServerError FAILED_PRECONDITION when the
        region cannot reach the server or is refused."""
        try:
            found = handshake(metadata)
            if found is None:
                return False
            socket_name, token, output_bytes = found
            with self._cond:
                if self.region is None:
                    self.region = SharedRegion(self.slots, self._first or 1, output_bytes)
                    self._cond.notify_all()
                region = self.region
                if region.fd is None:  # the stream is closing
                    return False
                fd = os.dup(region.fd)  # its own descriptor: closing the stream meanwhile cannot swap the file
            try:
                if output_bytes > region.output_bytes:
                    raise ValueError(f"the server asks for {output_bytes} bytes of output room per frame, the "
                                     f"region's slots have {region.output_bytes} (a replica with other defaults?)")
                register(fd, socket_name, token)
            finally:
                os.close(fd)
            return True
        except OSError as err:
            raise FeatureServerError(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"cannot pass the shared-memory region to the server ({err}): shared memory "
                                     f"needs the client on the server's host, in its network namespace",
                                     address) from None
        except ValueError as err:
            raise FeatureServerError(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"shared-memory region refused: {err}", address) from None

    def close(self) -> None:
        """Close the region's descriptor; its arrays stay valid."""
        self.interrupt()
        with self._cond:
            if self.region is not None:
                self.region.close()
