"""Shared memory for clients on the server's host: frames and features through a region both sides map.

Off unless the server runs with ``--allow-client-shm``. A stream asks for it in its config
(``StreamConfig.shared_memory``). The gRPC connection cannot carry a file descriptor, so the front-end serving the
stream answers with the name of its own abstract Unix socket and a one-time token (the call's initial metadata,
see the proto comment on ``SharedMemoryOptions``); the client passes its memfd there with ``SCM_RIGHTS``, and the
token hands that descriptor to this stream and no other. Because the front-end that accepted the stream is the one
that names the socket, the region reaches exactly the process serving it, however many front-ends share the port.

Where the tensors go: the front-end's service shares a stream's region with the device process (``link.DeviceLink.
share_region``, the same descriptor passed on), which maps it too and writes each frame's tensors straight into the
frame's output room; the front-end only puts their offsets in the reply (``ClientRegion.pack`` says where they go,
for both). Streams of 8-bit codes (DTYPE_UINT8_AFFINE), whose scales and offsets belong in the message, and streams
beyond what the device maps for one front-end (``ipc.messages.MAX_SHARED_REGIONS``) take the path that copies:
the device writes into the front-end's arena and ``ClientRegion.place`` copies the tensors into the room.

Safety, in the order a region meets it:

- Only memfds sealed against shrinking are mapped (``common.memfd.check_region_fd``, which the device runs again
  on the descriptor it gets): ``F_GET_SEALS`` must include ``F_SEAL_SHRINK``, so the region can never become
  shorter than a mapping and no access through one can raise SIGBUS. A descriptor that has no seals (a regular
  file, a pipe, a socket) or an unsealed memfd is refused at registration, and so is a memfd on hugetlbfs
  (``MFD_HUGETLB``), whose pages come from a fixed pool: a write that finds the pool empty raises SIGBUS; only
  shmem (tmpfs) memfds are taken. The size is read after the seal check (it cannot shrink afterwards) and is
  bounded by ``MAX_REGION_BYTES``.
- Every offset and length a frame names is checked against that size, in Python integers (no overflow), before a
  byte is read or written, and before the frame goes to the device (``ClientRegion.pixels``,
  ``ClientRegion.check_room``, ``ClientRegion.pack``): a bad one fails that frame, with a message of numbers
  only. The device checks the span against its own mapping again before it writes.
- The received descriptor is closed once mapped and shared, and the mappings are closed when the stream ends,
  however it ends (``FeatureService.StreamFeatures``' finally releases the device's and closes this one); the
  device also drops every region of a front-end that disconnects. A client that closes or unmaps its side
  changes nothing here: the memory lives until the last mapping goes.

A region gives the server nothing the client could not already reach (a descriptor passed over a socket is one the
client holds), and a token gives a region to one stream only: it is random (128 bits), used once, and void when
its stream ends. The client may change pixels while the server reads them; that spoils its own features only.

Torch-free: this module runs in front-end processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab, wire

from ..common.memfd import MAX_REGION_BYTES, RegionRefused, check_region_fd, map_region, packed_spans, \
    spans_end, unmap_region
from ..common.preprocess import input_shape
from .frames import FrameError, FrameLimits, pixels_to_bgr, raw_channels
from .pipeline import FrameOptions, Pipeline, Reply, error_result

log = logging.getLogger(__name__)

#: The flag that turns shared memory on, named in the refusal a client gets without it.
FLAG = "--allow-client-shm"
#: Seconds a registration connection may stay open without sending its message.
CONNECTION_TIMEOUT_S = 5.0
#: Largest registration message read: the token is 32 characters.
_MAX_MESSAGE = 256
#: Registration connections open at once; more are closed at once (a local process cannot exhaust descriptors).
MAX_CONNECTIONS = 64


class RegionError(Exception):
    """A stream cannot have its region: ``code`` is the gRPC status that ends the stream, ``message`` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def room_bytes(sizes: Sequence[int]) -> int:
    """Bytes of output room that tensors of ``sizes`` bytes need wherever the room starts (each is 64-byte
    aligned in the region, the first one too)."""
    return sum(vocab.shm_aligned(size) for size in sizes) + vocab.SHM_ALIGN


def output_room(pipeline: Pipeline, options: FrameOptions) -> int:
    """The most output room one frame of a stream with ``options`` can need: its tensors at the square input of its
    imgsz (a letterboxed frame is never larger), as the server lays them out in a region."""
    shapes = pipeline.output_shapes(options, input_shape(options.imgsz, pipeline.card.stride))
    return room_bytes([math.prod(shape) * wire.ITEMSIZE[options.dtype] for shape in shapes])


class ClientRegion:
    """A client's region, mapped in this front-end for one stream. Build it with ``map``; ``close`` it once.

    It keeps a descriptor of its own (``fd``) until ``close_descriptor``: the service passes it on to the device
    process, which maps the region too, and then closes it, so that a stream holds no descriptor while it runs.

    Args:
        fd: the checked descriptor (duplicated here; the caller still closes its own).
        size: its size, from ``check_region_fd``.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = map_region(fd, size)
        try:
            self.fd: int | None = os.dup(fd)
        except BaseException:
            self._map.close()
            raise

    @classmethod
    def map(cls, fd: int, max_bytes: int = MAX_REGION_BYTES) -> "ClientRegion":
        """Check and map the region behind ``fd`` (which the caller still closes); RegionRefused if it cannot be."""
        size = check_region_fd(fd, max_bytes)
        try:
            return cls(fd, size)
        except OSError as err:  # e.g. a memfd reopened read-only: no writable shared mapping
            raise RegionRefused(f"the region cannot be mapped for reading and writing ({err.strerror})") from None

    def _check_span(self, offset: int, length: int, what: str) -> None:
        if offset > self.size or length > self.size - offset:
            raise FrameError(f"{what} (offset {offset}, {length} bytes) reaches past the end of the stream's "
                             f"shared-memory region ({self.size} bytes)")

    def check_room(self, ref: pb.SharedMemoryFrame) -> None:
        """FrameError unless the frame's output room lies inside the region."""
        self._check_span(ref.output_offset, ref.output_length, "the output room")

    def pack(self, room: pb.SharedMemoryFrame, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """(offset, length) in the region of each of a reply's tensors of ``sizes`` bytes, laid out in the frame's
        output room as ``common.memfd.packed_spans`` lays them (the device writes them there itself on a shared
        region); FrameError when they do not fit in the room or the region.

        Args:
            room: the frame's ``Frame.shared_memory``.
            sizes: each tensor's bytes, in the reply's order.
        """
        spans = packed_spans(room.output_offset, sizes)
        needed = spans_end(room.output_offset, spans) - room.output_offset
        if needed > room.output_length:
            raise FrameError(f"the reply needs {needed} bytes of output room from offset {room.output_offset} "
                             f"(tensors 64-byte aligned), the frame gives {room.output_length}")
        self._check_span(room.output_offset, needed, "the output room")
        return spans

    def pixels(self, ref: pb.SharedMemoryImage, limits: FrameLimits) -> np.ndarray:
        """The frame's pixels as a BGR image: for BGR a view of the region, no copy. FrameError for a bad header,
        a size over the limits or bytes outside the region."""
        expected = raw_channels(ref.format, ref.channels, ref.height, ref.width, limits, "shared-memory image")
        if ref.length != expected:
            raise FrameError(f"shared-memory image is {ref.length} bytes, but {ref.width}x{ref.height}x"
                             f"{expected // (ref.width * ref.height)} needs {expected}")
        self._check_span(ref.offset, ref.length, "the image")
        pixels = np.frombuffer(self._map, np.uint8, count=expected, offset=ref.offset)
        return pixels_to_bgr(pixels.reshape(ref.height, ref.width, -1), ref.format)

    def place(self, reply: Reply, frame: pb.Frame) -> Reply:
        """Copy a computed reply's tensor bytes into the frame's output room and point its tensors there: the path
        of frames whose tensors the device could not write into the region itself (8-bit codes, or a region the
        device does not share). An ERROR reply when they do not fit. The arena's slot is released either way. A
        reply without tensors, or a frame without output room, is returned as it is."""
        room = frame.shared_memory
        if not room.output_length or not reply.payloads:
            return reply
        payloads = [memoryview(np.ascontiguousarray(p)).cast("B") for p in reply.payloads]
        try:
            spans = self.pack(room, [payload.nbytes for payload in payloads])
            for tensor, payload, (start, length) in zip(reply.result.tensors, payloads, spans):
                self._map[start:start + length] = payload
                tensor.shared_memory.offset = start
                tensor.shared_memory.length = length
            return Reply(reply.result, [b""] * len(spans))
        except FrameError as err:
            return Reply(error_result(frame, str(err)))
        finally:
            reply.release()

    def close_descriptor(self) -> None:
        """Close the region's own descriptor (idempotent): the device has its copy, or will never need one."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Close the descriptor and unmap the region (idempotent). A view still alive somewhere (a traceback holding
        a frame) is collected first; only if one survives that is the mapping left to the garbage collector, and
        that is logged."""
        self.close_descriptor()
        if self._map is not None:
            unmap_region(self._map)
            self._map = None


def frame_pixels(frame: pb.Frame, region: ClientRegion | None, limits: FrameLimits) -> np.ndarray | None:
    """The frame's pixels when they are in its stream's region, else None (they travel in the message).

    FrameError (the frame fails, the stream goes on) for a frame that names shared memory on a stream without a
    region, carries its pixels twice, or names bytes outside the region.
    """
    if not frame.HasField("shared_memory"):
        return None
    if region is None:
        raise FrameError("the frame names shared memory (Frame.shared_memory), but its stream has no region: set "
                         "StreamConfig.shared_memory")
    ref = frame.shared_memory
    region.check_room(ref)
    if not ref.HasField("image"):
        return None
    if frame.WhichOneof("data") is not None:
        raise FrameError("the frame carries its pixels twice: in the message and in shared memory; send one")
    return region.pixels(ref.image, limits)


@dataclass(eq=False)
class _Expected:
    """A stream waiting for its region."""

    future: asyncio.Future
    max_bytes: int


class RegionBroker:
    """This front-end's registration socket: each stream that asks for shared memory gets the region its client
    passes with the stream's token, once. Start and close it on the serving loop.

    Args:
        max_region_bytes: the largest region a stream may pass.
    """

    def __init__(self, max_region_bytes: int = MAX_REGION_BYTES) -> None:
        self.max_region_bytes = max_region_bytes
        #: The socket's abstract name as clients are told it: "@" then the name.
        self.name = f"@yolostream-{os.getpid()}-{secrets.token_hex(8)}"
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected: dict[str, _Expected] = {}
        self._connections: dict[socket.socket, asyncio.TimerHandle] = {}

    def start(self) -> None:
        """Listen on the abstract socket (nothing on the file system, gone with the process)."""
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + self.name[1:])
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening; streams still waiting for their region fail."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for conn in list(self._connections):
            self._drop(conn)
        for expected in self._expected.values():
            if not expected.future.done():
                expected.future.set_exception(RegionError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        self._expected.clear()

    async def attach(self, output_bytes: int, context: grpc.aio.ServicerContext) -> ClientRegion:
        """The handshake of one stream: send its token and this socket's name (initial metadata), then wait for
        its client's region. RegionError (the stream ends with its code) when the region is refused or does not
        come within ``SHM_REGISTER_TIMEOUT_S``.

        Args:
            output_bytes: the most output room one frame of this stream can need (``room_bytes``), told to the
                client so that it sizes its slots.
            context: the stream's call.
        """
        if self._sock is None:
            raise RegionError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        token = secrets.token_hex(16)
        expected = _Expected(self._loop.create_future(), self.max_region_bytes)
        self._expected[token] = expected
        try:
            await context.send_initial_metadata(((vocab.SHM_SOCKET_KEY, self.name), (vocab.SHM_TOKEN_KEY, token),
                                                 (vocab.SHM_OUTPUT_BYTES_KEY, str(output_bytes))))
            done, _ = await asyncio.wait((expected.future,), timeout=vocab.SHM_REGISTER_TIMEOUT_S)
            if not done:
                raise RegionError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"no shared-memory region was registered within {vocab.SHM_REGISTER_TIMEOUT_S:g} s "
                                  f"of the stream's config (socket {self.name}): the client must be on the server's "
                                  f"host, in its network namespace")
            try:
                return expected.future.result()
            except RegionRefused as err:
                raise RegionError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"shared-memory region refused: {err}") from None
        except BaseException:
            # Cancelled (the client went away) after the region came: it must not stay mapped.
            if expected.future.done() and not expected.future.cancelled() and expected.future.exception() is None:
                expected.future.result().close()
            raise
        finally:
            self._expected.pop(token, None)
            if not expected.future.done():
                expected.future.cancel()

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. out of descriptors: this connection fails, the socket goes on
                log.warning("shared-memory registration: accept failed (%s)", err.strerror)
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                conn.close()
                continue
            conn.setblocking(False)
            self._connections[conn] = self._loop.call_later(CONNECTION_TIMEOUT_S, self._drop, conn)
            self._loop.add_reader(conn.fileno(), self._receive, conn)

    def _drop(self, conn: socket.socket) -> None:
        timer = self._connections.pop(conn, None)
        if timer is None:
            return
        timer.cancel()
        self._loop.remove_reader(conn.fileno())
        conn.close()

    def _receive(self, conn: socket.socket) -> None:
        try:
            message, fds, flags, _ = socket.recv_fds(conn, _MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        try:
            answer = self._register(message, fds, flags)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            conn.send(answer)
        except OSError:
            pass
        self._drop(conn)

    def _register(self, message: bytes, fds: list[int], flags: int) -> bytes:
        """Hand the passed region to the stream whose token the message holds; the answer to send back."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return vocab.SHM_ERROR + b"message too long: send the token with exactly one descriptor"
        expected = self._expected.pop(message.decode("ascii", errors="replace"), None)
        if expected is None or expected.future.done():
            return vocab.SHM_ERROR + b"unknown or already used token"
        if len(fds) != 1:
            expected.future.set_exception(RegionRefused(f"{len(fds)} descriptors came with the token: send one"))
            return vocab.SHM_ERROR + b"send exactly one descriptor"
        try:
            region = ClientRegion.map(fds[0], expected.max_bytes)
        except RegionRefused as err:
            expected.future.set_exception(err)
            return vocab.SHM_ERROR + str(err).encode()
        expected.future.set_result(region)
        return vocab.SHM_OK


async def open_region(broker: RegionBroker | None, config: pb.StreamConfig, output_bytes: int,
                      context: grpc.aio.ServicerContext) -> ClientRegion:
    """The region of a stream whose config asks for shared memory; RegionError (with the gRPC code to end the
    stream with) when this server does not allow it, the options cannot go with it, or the handshake fails.

    Args:
        broker: this front-end's broker; None when the server runs without ``--allow-client-shm``.
        config: the stream's config.
        output_bytes: the most output room one frame of the stream can need.
        context: the stream's call.
    """
    if broker is None:
        raise RegionError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"shared memory for clients on the same host is off on this server: start it with {FLAG} "
                          f"(or stream without shared memory)")
    if config.compression not in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE):
        raise RegionError(grpc.StatusCode.INVALID_ARGUMENT,
                          "compression and shared memory do not go together (tensors in shared memory are never "
                          "compressed): ask for one of them")
    return await broker.attach(output_bytes, context)


def shared_memory_info(broker: RegionBroker | None) -> pb.SharedMemoryInfo:
    """ModelInfo.shared_memory for a front-end with (or without) a broker."""
    if broker is None:
        return pb.SharedMemoryInfo(allowed=False)
    return pb.SharedMemoryInfo(allowed=True, max_region_bytes=broker.max_region_bytes)

