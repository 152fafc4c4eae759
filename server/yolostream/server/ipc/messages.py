"""The typed messages between processes: front-end ⇄ device over the device link, and child → supervisor at
start-up and stop.

Every message is a NamedTuple: it pickles as a tuple (small and fast on the per-batch path), and each side reads
fields by name, so a change to a message is a change to one class here that both sides import. Only offsets, shapes
and a few numbers cross; arrays travel through the shared-memory arena (``ipc.shm``).

Front-end → device: one ``Hello`` after connecting, then lists of ``Run``, ``Cancel``, ``ShareRegion`` and
``ReleaseRegion`` (everything queued in one turn of the front-end's event loop goes out in one write; a
``ShareRegion``'s descriptor follows its list on the socket, ``send_descriptor``). Device → front-end: ``Welcome``
once, then one ``Results`` per finished batch.
"""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ..common.object_request import ObjectJob

#: A requested output: (layer index, pooling name, dtype name).
OutputKey = tuple[int, str, str]


class Hello(NamedTuple):
    """A front-end's first message: the shared-memory arena the device is to map."""

    arena: str


class Welcome(NamedTuple):
    """The device mapped the arena and takes frames."""


#: Client regions one front-end may have shared with the device at once: each is a mapping of up to
#: ``common.memfd.MAX_REGION_BYTES`` of address space there. A front-end's streams beyond it take the path that
#: copies (the device writes into the arena, the front-end copies into the region).
MAX_SHARED_REGIONS = 256


class OutputTarget(NamedTuple):
    """Where a frame's features go instead of the arena: ``length`` bytes from ``offset`` of the client region the
    front-end shared as ``region`` (``ShareRegion``), each tensor where ``common.memfd.packed_spans`` puts it.
    ``length`` is exactly what the frame's tensors take there (the device checks its tensors against it)."""

    region: int
    offset: int
    length: int


class Run(NamedTuple):
    """Compute one frame: its letterboxed (H, W, 3) uint8 input is in the arena at ``in_offset``; its features go
    to ``target`` when set, else to the arena from ``out_offset``, in ``keys`` order, followed there by its object
    results (laid out as ``job`` says); ``out_bytes`` is what the arena holds from ``out_offset`` (``out_offset``
    is None when that is nothing)."""

    rid: int
    in_offset: int
    in_shape: tuple[int, ...]
    out_offset: int | None
    out_bytes: int
    keys: tuple[OutputKey, ...]
    job: ObjectJob | None = None
    target: OutputTarget | None = None


class Cancel(NamedTuple):
    """Withdraw frame ``rid`` if it is still queued (the device answers it as failed with no message)."""

    rid: int


class FrameDone(NamedTuple):
    """Frame ``rid``'s outputs are in its slot. ``boxes``: how many object rows were written (-1: none asked)."""

    rid: int
    batch_size: int
    queued_us: int
    compute_us: int
    fetch_us: int
    boxes: int = -1


class FrameFailed(NamedTuple):
    """Frame ``rid`` was not computed: ``message`` says why (None: it was withdrawn). ``unavailable``: because the
    device is stopping (its batcher takes or keeps no work), not because of the frame: the front-end ends the
    frame's stream with UNAVAILABLE, so that its client sends the frame again to a replica that runs, instead of
    answering it with a frame error."""

    rid: int
    message: str | None
    unavailable: bool = False


class Results(NamedTuple):
    """One batch's answer to one front-end: its frames that finished, and those that failed or were withdrawn."""

    done: list[FrameDone]
    failed: list[FrameFailed]


class ShareRegion(NamedTuple):
    """A stream's client region (already checked by the front-end), for the device to map as ``region``: ``size``
    bytes of the memfd whose descriptor follows the message list (one per ShareRegion, in order)."""

    region: int
    size: int


class RegionAnswer(NamedTuple):
    """Device → front-end, for each ``ShareRegion``: whether the device mapped ``region`` (``refused`` empty) or not,
    and why. The front-end waits for it before a stream's first frame, so a region the device could not map sends
    its features the copying way instead of failing them."""

    region: int
    refused: str


class ReleaseRegion(NamedTuple):
    """The stream of shared region ``region`` has ended: the device unmaps it (after a write still under way)."""

    region: int


#: What a front-end sends after ``Hello``.
FrontEndMessage = Run | Cancel | ShareRegion | ReleaseRegion


def descriptor_socket(conn: Connection) -> socket.socket:
    """A socket object on the link's own Unix socket, for passing descriptors (``send_descriptor``,
    ``receive_descriptor``). Made once per link, when it connects: it duplicates a descriptor, which could fail
    (EMFILE) if it were made for each region, after the ``ShareRegion`` had already gone out. The caller closes it
    with the link."""
    return socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)


def send_descriptor(sock: socket.socket, fd: int) -> None:
    """Pass ``fd`` over the link's Unix socket (SCM_RIGHTS; ``sock`` from ``descriptor_socket``) right after the
    message list that holds its ``ShareRegion``: one byte carries it, read by ``receive_descriptor`` before the next
    message. The socket of a ``multiprocessing`` connection reads and writes whole messages, so the byte can never
    be taken for one."""
    socket.send_fds(sock, [b"\x01"], [fd])


def receive_descriptor(sock: socket.socket) -> int | None:
    """The descriptor ``send_descriptor`` passed (close-on-exec; the caller closes it), or None when its byte came
    without it (this process is out of descriptors: the kernel drops them and truncates): the byte is read either
    way, so the link stays in step. EOFError when the link closed first."""
    data, fds, flags, _ = socket.recv_fds(sock, 1, 1, socket.MSG_CMSG_CLOEXEC)
    if not data:
        raise EOFError("the link closed before the region's descriptor came")
    if len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0]


class Ready(NamedTuple):
    """Device → supervisor: loaded and warmed up. ``card`` is ``ModelCard.to_dict()``; front-ends connect to
    ``address`` with ``authkey``."""

    card: dict[str, Any]
    batching: Any
    address: Any
    authkey: bytes


class FrontEndReady(NamedTuple):
    """Front-end → supervisor: serving on ``port`` (and metrics on ``metrics_port`` when it serves them)."""

    port: int
    metrics_port: int | None


class StartFailed(NamedTuple):
    """Child → supervisor: it could not start; ``line`` is the one-line reason the supervisor prints."""

    line: str


class Stop(NamedTuple):
    """Supervisor → device: finish what is queued (up to ``grace`` seconds) and exit."""

    grace: float


class Stopped(NamedTuple):
    """Device → supervisor: drained and stopping."""
