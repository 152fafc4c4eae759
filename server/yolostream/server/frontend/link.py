"""The front-end's side of the device link: frames go to the device process through shared memory.

A front-end owns one shared-memory arena (``ipc.shm.SharedArena``). For each frame it takes a slot for the
letterboxed uint8 input and one for the features, writes the input, and sends the device a small control message
(``ipc.messages.Run``: slot offsets, shape, requested outputs) over a ``multiprocessing.connection`` socket. The
device answers once per batch (``Results``) with the timings of every frame of this front-end in it, after writing
the features into their slots. Only offsets and a few numbers are pickled, never arrays. See BENCHMARKS.md for why this channel and not pyzmq.

A stream whose client shares a region with this front-end (``client_shm``) may have it shared with the device too
(``share_region``): its frames then name an ``OutputTarget`` in that region, where the device writes their features
itself, and only the input (and any boxes and object vectors) takes arena space.

Slots are freed only when the device has answered for them (a cancelled frame is first withdrawn from the device
queue, or finished), so the device never writes into memory the front-end has handed to another frame. The number
of frames a front-end has at the device is bounded by ``capacity`` and by the arena itself; a frame that could
never fit is refused at once with a per-frame error.

Torch-free: this module runs in front-end processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any, Callable, Sequence

import numpy as np

from yolostream.v1 import wire
from yolostream.v1.vocab import DTYPES

from ..common import affine
from ..common.object_request import ObjectJob, ObjectLayout
from ..ipc.messages import MAX_SHARED_REGIONS, Cancel, FrontEndMessage, Hello, OutputKey, OutputTarget, \
    RegionAnswer, ReleaseRegion, Results, Run, ShareRegion, Welcome, descriptor_socket, send_descriptor
from ..ipc.shm import ArenaFull, SharedArena, SlotAllocator

log = logging.getLogger(__name__)

#: Seconds a cancelled frame waits for the device to withdraw or finish it.
CANCEL_WAIT_S = 30.0
#: Seconds a stream waits, before its first frame, for the device to say it mapped the stream's region (it maps it
#: between two batches' messages: milliseconds); past them the stream's features are copied instead.
REGION_ANSWER_S = 10.0


class DeviceUnavailable(ConnectionError):
    """The device process is gone (or the link is closing): the server cannot compute features any more."""


class DeviceFrameError(RuntimeError):
    """The device could not compute this frame (its batch failed); the frame fails, the stream goes on."""


class FrameTooLarge(ValueError):
    """This frame's input plus features exceed the front-end's whole shared-memory arena."""


def output_layout(keys: Sequence[OutputKey],
                  shapes: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], np.dtype]]:
    """How a frame's outputs lie in its slot, one after the other: (shape, dtype) per output, in ``keys`` order.

    An output is its tensor in the wire's storage dtype, except ``uint8`` (DTYPE_UINT8_AFFINE), which is one
    ``common.affine`` record per frame: the scales and offsets, then the codes.

    Args:
        keys: the requested outputs, (layer index, pooling, dtype name) each.
        shapes: each output's tensor shape for one frame, as sent.
    """
    layout = []
    for key, shape in zip(keys, shapes):
        if key[2] == "uint8":
            layout.append(((affine.record_bytes(shape),), np.dtype(np.uint8)))
        else:
            layout.append((tuple(shape), wire.storage_dtype(DTYPES[key[2]])))
    return layout


def layout_bytes(layout: Sequence[tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of the outputs of an ``output_layout``."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout)


@dataclass
class Computed:
    """A frame's features as views of the arena (none when the device wrote them to the frame's ``OutputTarget``);
    ``release`` frees them (call it once the reply is built). ``objects``: the frame's boxes, scores, classes and
    vectors (views, see ``ObjectLayout.views``), if asked."""

    arrays: list[np.ndarray]
    batch_size: int
    queued_us: int
    compute_us: int
    fetch_us: int
    release: Callable[[], None]
    objects: dict[str, np.ndarray | None] | None = None


@dataclass(eq=False)
class FrameSlot:
    """A reserved place in the arena: ``input`` is the frame's (H,W,3) uint8 view to fill before ``submit``. Its
    features go to ``target`` when set (the arena's out part, if any, then holds the object results only)."""

    input: np.ndarray
    keys: tuple[OutputKey, ...]
    layout: list[tuple[tuple[int, ...], np.dtype]]
    in_offset: int
    out_offset: int | None
    out_bytes: int
    objects: ObjectLayout | None = None
    target: OutputTarget | None = None


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future
    in_offset: int
    out_offset: int | None
    out_shapes: Sequence[tuple[tuple[int, ...], np.dtype]]
    objects: ObjectLayout | None = None


class DeviceLink:
    """One front-end's connection to the device process. Construct, then ``await start()`` on the serving loop.

    Args:
        address: the device process's listener (``multiprocessing.connection`` address).
        authkey: its shared secret.
        arena_name: name of this front-end's shared-memory segment (under the server's prefix).
        arena_bytes: its size.
        capacity: frames this front-end may have at the device at once.
        on_lost: called once, on the loop, when the device goes away.
        on_depth: called on the loop with ``in_flight`` whenever it changes (the queue gauge follows it).
    """

    def __init__(self, address: Any, authkey: bytes, arena_name: str, arena_bytes: int, capacity: int,
                 on_lost: Callable[[], None] = lambda: None,
                 on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self.address = address
        self.authkey = authkey
        self.arena_name = arena_name
        self.arena_bytes = arena_bytes
        self.capacity = capacity
        self.on_lost = on_lost
        self.on_depth = on_depth
        self.arena: SharedArena | None = None
        self.slots = SlotAllocator(arena_bytes)
        self._conn: Connection | None = None
        #: the link's socket as a socket object, for passing client regions' descriptors (``share_region``)
        self._fd_socket: socket.socket | None = None
        #: regions passed to the device and not answered yet: what the device says of each (``RegionAnswer``)
        self._region_answers: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[FrontEndMessage] = []
        self._next_rid = 0
        self._shared: set[int] = set()
        self._next_region = 0
        self._credit: asyncio.Semaphore | None = None
        self._space: asyncio.Condition | None = None
        self.lost = False

    @property
    def in_flight(self) -> int:
        """Frames this front-end has at the device now (queued or computing there)."""
        return len(self._pending)

    async def start(self) -> None:
        """Create and share the arena, connect to the device, and start reading its answers."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._credit = asyncio.Semaphore(self.capacity)
        self._space = asyncio.Condition()
        self.arena = SharedArena.create(self.arena_name, self.arena_bytes)
        try:
            conn = await loop.run_in_executor(None, self._connect)
        finally:
            # The device has mapped it (or failed to): the name is no longer needed and must not outlive us.
            self.arena.unlink()
        self._conn = conn
        self._fd_socket = descriptor_socket(conn)
        loop.add_reader(conn.fileno(), self._on_readable)

    def _connect(self) -> Connection:
        conn = Client(self.address, authkey=self.authkey)
        conn.send(Hello(self.arena_name))
        reply = conn.recv()
        if not isinstance(reply, Welcome):
            conn.close()
            raise DeviceUnavailable(f"the device refused this front-end: {reply!r}"[:200])
        return conn

    def close(self) -> None:
        """Stop reading and fail whatever is still waiting (the device ends our frames when the socket closes)."""
        if self._conn is not None and self._loop is not None:
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
            self._conn.close()
            self._conn = None
            if self._fd_socket is not None:
                self._fd_socket.close()
                self._fd_socket = None
        self._fail_all(DeviceUnavailable("front-end is shutting down"))

    async def share_region(self, fd: int, size: int, timeout: float = REGION_ANSWER_S) -> int | None:
        """Pass a stream's checked client region (its memfd ``fd``, ``size`` bytes) to the device, which maps it
        and writes the features of frames that name it (``reserve``'s ``target``) straight into it. Returns the
        region's id for their ``OutputTarget`` once the device says it mapped it; None when it did not (it could
        not map it, or did not answer within ``timeout``), when this front-end already shares
        ``MAX_SHARED_REGIONS``, or when the device is gone: the stream's features then come through the arena and
        are copied into the region, and nothing fails. ``release_region`` an id when its stream ends. The caller
        may close ``fd`` once this returns: the device has its own descriptor."""
        if self.lost or self._conn is None or len(self._shared) >= MAX_SHARED_REGIONS:
            return None
        region = self._next_region
        self._next_region += 1
        self._flush()  # what is queued goes first, then the message and right behind it its descriptor
        try:
            self._conn.send([ShareRegion(region, size)])
            send_descriptor(self._fd_socket, fd)
        except (OSError, ValueError) as err:
            self._lost(err)
            return None
        answer = self._loop.create_future()
        self._region_answers[region] = answer
        self._shared.add(region)
        try:
            refused = await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            refused = f"no answer from the device within {timeout:.0f} s"
        except DeviceUnavailable:
            refused = "the device process went away"
        except asyncio.CancelledError:  # the stream ended meanwhile: the device must not keep its region
            self.release_region(region)
            raise
        finally:
            self._region_answers.pop(region, None)
        if refused:
            log.warning("the device did not map a client's region (%s): its features are copied", refused)
            self.release_region(region)
            return None
        return region

    def release_region(self, region: int) -> None:
        """The stream of a shared region has ended: the device unmaps it (after a write still under way; frames
        naming it afterwards fail)."""
        if region in self._shared:
            self._shared.discard(region)
            if not self.lost and self._conn is not None:
                # sent now, not on the loop's next turn: a late frame must not write into a region whose stream
                # has ended (and whose client may reuse it) any longer than it has to
                self._send(ReleaseRegion(region))
                self._flush()

    async def reserve(self, in_shape: tuple[int, ...], keys: Sequence[OutputKey],
                      out_shapes: Sequence[tuple[int, ...]], objects: ObjectLayout | None = None,
                      target: OutputTarget | None = None) -> "FrameSlot":
        """Room for one frame: its (H,W,3) uint8 input (``slot.input``, to fill) and its outputs, whose shapes
        (``out_shapes``, in ``keys`` order) the caller derives from the model card, plus room for its boxes and
        object vectors when ``objects`` is given. With ``target`` (in a region from ``share_region``, checked by
        the caller) the device writes the outputs there and the arena holds none of them. Waits while the arena
        or the front-end's share of the device queue is full; FrameTooLarge when it could never fit."""
        if self.lost or self._conn is None:
            raise DeviceUnavailable("the device process is not available")
        layout = output_layout(keys, out_shapes)
        in_bytes = math.prod(in_shape)
        out_bytes = layout_bytes(layout) if target is None else 0
        out_bytes += objects.nbytes if objects is not None else 0
        if not self.slots.fits(in_bytes) or not self.slots.fits(out_bytes) or \
                not self.slots.fits(in_bytes + out_bytes):
            raise FrameTooLarge(f"the frame needs {in_bytes + out_bytes:,} bytes of shared memory (input "
                                f"{in_bytes:,}, features {out_bytes:,}), over this server's {self.arena_bytes:,} "
                                f"per front-end (--shm-mb): ask for fewer layers, pooling or a smaller imgsz")
        await self._credit.acquire()
        try:
            in_offset, out_offset = await self._allocate(in_bytes, out_bytes)
        except BaseException:
            self._credit.release()
            raise
        return FrameSlot(self.arena.view(in_offset, tuple(in_shape)), tuple(keys), layout, in_offset, out_offset,
                         out_bytes, objects, target)

    def unreserve(self, slot: "FrameSlot") -> None:
        """Give back a slot that will not be computed (its frame failed before reaching the device)."""
        self._credit.release()
        self._free(slot.in_offset, slot.out_offset)

    def submit(self, slot: "FrameSlot", job: ObjectJob | None = None) -> asyncio.Future:
        """Send a filled slot to the device; the future resolves to its ``Computed`` features (call ``release``
        on them once used) or fails with DeviceFrameError / DeviceUnavailable. ``withdraw`` it if it will not be
        awaited. ``job``: the frame's boxes/vectors work, laid out as the slot was reserved for."""
        if self.lost or self._conn is None:
            self.unreserve(slot)
            raise DeviceUnavailable("the device process is not available")
        rid = self._next_rid
        self._next_rid += 1
        if (job.layout if job is not None else None) != slot.objects:
            self.unreserve(slot)
            raise ValueError("the object job does not match the slot it was reserved with")
        in_arena = slot.layout if slot.target is None else []
        pending = _Pending(self._loop.create_future(), slot.in_offset, slot.out_offset, in_arena, slot.objects)
        pending.future.add_done_callback(_retrieve)
        self._pending[rid] = pending
        self.on_depth(len(self._pending))
        self._send(Run(rid, slot.in_offset, slot.input.shape, slot.out_offset, slot.out_bytes, slot.keys, job,
                       slot.target))
        return pending.future

    def withdraw(self, future: asyncio.Future) -> None:
        """Nobody will use this frame's features: take it off the device queue, or free them when they come."""
        if future.done():
            _release_unused(future)
            return
        future.add_done_callback(_release_unused)
        rid = next((r for r, p in self._pending.items() if p.future is future), None)
        if rid is not None and self._conn is not None:
            self._send(Cancel(rid))

    def _send(self, message: FrontEndMessage) -> None:
        """Queue a control message; everything queued in one turn of the event loop goes out in one write."""
        self._outbox.append(message)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if not messages or self._conn is None:
            return
        try:
            self._conn.send(messages)
        except (OSError, ValueError) as err:
            self._lost(err)

    async def _allocate(self, in_bytes: int, out_bytes: int) -> tuple[int, int | None]:
        """Offsets of the input's range and of the outputs' (None when nothing of them goes into the arena)."""
        async with self._space:
            while True:
                if self.lost:
                    raise DeviceUnavailable("the device process is not available")
                try:
                    in_offset = self.slots.alloc(in_bytes)
                except ArenaFull:
                    await self._space.wait()
                    continue
                if not out_bytes:
                    return in_offset, None
                try:
                    return in_offset, self.slots.alloc(out_bytes)
                except ArenaFull:
                    self.slots.free(in_offset)
                    await self._space.wait()

    def _free(self, *offsets: int | None) -> None:
        for offset in offsets:
            if offset is not None:
                self.slots.free(offset)
        self._loop.create_task(self._notify_space())

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()

    def _on_readable(self) -> None:
        try:
            while self._conn is not None and self._conn.poll():
                message = self._conn.recv()
                if isinstance(message, RegionAnswer):
                    self._answered(message)
                else:
                    self._handle(message)
        except (EOFError, OSError) as err:
            self._lost(err)

    def _answered(self, message: RegionAnswer) -> None:
        answer = self._region_answers.get(message.region)
        if answer is not None and not answer.done():
            answer.set_result(message.refused)

    def _handle(self, message: Results) -> None:
        for frame in message.done:
            pending = self._pending.pop(frame.rid)
            self._credit.release()
            self.slots.free(pending.in_offset)
            arrays, offset = [], pending.out_offset
            for shape, dtype in pending.out_shapes:
                array = self.arena.view(offset, shape, dtype)
                arrays.append(array)
                offset += array.nbytes
            objects = None
            if pending.objects is not None:
                objects = pending.objects.views(self.arena.view(offset, (pending.objects.nbytes,)), frame.boxes)
            released = [False]

            def release(out_offset: int | None = pending.out_offset, flag: list = released) -> None:
                if not flag[0]:
                    flag[0] = True
                    self._free(out_offset)

            pending.future.set_result(Computed(arrays, frame.batch_size, frame.queued_us, frame.compute_us,
                                               frame.fetch_us, release, objects))
        for failure in message.failed:
            pending = self._pending.pop(failure.rid)
            self._credit.release()
            self._free(pending.in_offset, pending.out_offset)
            if not pending.future.done():
                pending.future.set_exception(
                    DeviceUnavailable(f"the device process is stopping ({failure.message})") if failure.unavailable
                    else DeviceFrameError(failure.message or "withdrawn"))
        if message.done or message.failed:
            self.on_depth(len(self._pending))
        if message.done:
            self._loop.create_task(self._notify_space())

    def _lost(self, err: BaseException) -> None:
        if self.lost:
            return
        self.lost = True
        log.error("lost the device process (%s); failing %d frame(s) in flight", type(err).__name__,
                  len(self._pending))
        if self._conn is not None:
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
        self._fail_all(DeviceUnavailable("the device process went away"))
        self.on_lost()

    def _fail_all(self, err: BaseException) -> None:
        self._shared.clear()  # the device's link is gone, and with it every region it mapped for us
        answers, self._region_answers = self._region_answers, {}
        for answer in answers.values():
            if not answer.done():
                answer.set_exception(DeviceUnavailable("the device process went away"))
        pending, self._pending = self._pending, {}
        if pending:
            self.on_depth(0)
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(err)
        if self._space is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.create_task(self._notify_space())


def _release_unused(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a failure as seen: the frame's own caller may have gone (its stream ended) before it came."""
    if not future.cancelled():
        future.exception()
