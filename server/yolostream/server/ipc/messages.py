"""The typed messages between processes: front-end ⇄ device over the device link, and child → supervisor at
start-up and stop.

Every message is a NamedTuple: it pickles as a tuple (small and fast on the per-batch path), and each side reads
fields by name, so a change to a message is a change to one class here that both sides import. Only offsets, shapes
and a few numbers cross; arrays travel through the shared-memory arena (``ipc.shm``).

Front-end → device: one ``Hello`` after connecting, then lists of ``Run`` and ``Cancel`` (everything queued in one
turn of the front-end's event loop goes out in one write). Device → front-end: ``Welcome`` once, then one
``Results`` per finished batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..common.object_request import ObjectJob

#: A requested output: (layer index, pooling name, dtype name).
OutputKey = tuple[int, str, str]


class Hello(NamedTuple):
    """A front-end's first message: the shared-memory arena the device is to map."""

    arena: str


class Welcome(NamedTuple):
    """The device mapped the arena and takes frames."""


class Run(NamedTuple):
    """Compute one frame: its letterboxed (H, W, 3) uint8 input is in the arena at ``in_offset``; its features (and
    object results, laid out as ``job`` says) go to ``out_offset``, ``out_bytes`` long, in ``keys`` order."""

    rid: int
    in_offset: int
    in_shape: tuple[int, ...]
    out_offset: int
    out_bytes: int
    keys: tuple[OutputKey, ...]
    job: ObjectJob | None = None


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
    """Frame ``rid`` was not computed: ``message`` says why (None: it was withdrawn)."""

    rid: int
    message: str | None


class Results(NamedTuple):
    """One batch's answer to one front-end: its frames that finished, and those that failed or were withdrawn."""

    done: list[FrameDone]
    failed: list[FrameFailed]


#: What a front-end sends after ``Hello``.
FrontEndMessage = Run | Cancel


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
