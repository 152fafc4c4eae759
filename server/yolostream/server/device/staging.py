"""The staged (CUDA) hot path's machinery: a bounded pool of host blocks, copy streams ordered with events, and the
cuDNN tuning policy. ``DeviceRunner`` drives it from a few call sites; everything here also runs on CPU (no
streams, host events, pageable blocks) so tests exercise the same code.

**Pinned memory that is really bounded.** PyTorch's caching host allocator (``torch.empty(..., pin_memory=True)``)
rounds every pinned block up to a power of two and, when a tensor is freed, keeps its block pinned in a cache
until ``torch.accelerator.empty_host_cache()``. Counting requested bytes and dropping tensors therefore bounds
nothing. ``HostPool`` counts the rounded size of every block it holds, asks for exactly that size (a power of two
wastes nothing, and one block serves every request up to it), and when it must give blocks up to stay within its
budget it drops them and empties the host cache, which unpins them. A block over half the budget, or one that
cannot be had within it while the other blocks are in use, is pageable instead: CUDA copies from and to pageable
memory are correct but synchronous with the host, so the bound costs speed, never correctness.

**Copies overlap compute.** Uploads, the forward and downloads run on three streams, ordered by events
(``Stream.wait_event``); a tensor made on one stream and used on another is marked with ``record_stream`` so the
caching device allocator does not hand its memory out again too early. Batch k's download then runs while batch
k+1 computes. Events are created with ``blocking=True``: waiting for one sleeps the thread instead of spinning a
core.

**No cuDNN tuning mid-serving.** ``TuningPolicy`` turns ``cudnn.benchmark`` on only for the (input shape, batch
bucket) pairs that warm-up tuned; every other pair runs with cuDNN's heuristics, so a new aspect ratio never stalls
the device worker for a tuning run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch

from ..model.placement import HOST_DTYPES

log = logging.getLogger(__name__)

#: Default bytes of host memory the pool may pin, over every block (``--pinned-mb``).
DEFAULT_PINNED_BUDGET = 1024 * 1024 * 1024

#: Host numpy dtype of each output dtype (bfloat16 travels as its raw uint16 bit patterns).


def pinned_size(nbytes: int) -> int:
    """The bytes the caching host allocator really pins for a request of ``nbytes``: the next power of two.

    Args:
        nbytes: requested bytes (at least 1).
    """
    if nbytes < 1:
        raise ValueError(f"a host block needs at least 1 byte, got {nbytes}")
    return 1 << (nbytes - 1).bit_length()


class HostEvent:
    """The slice of ``torch.cuda.Event`` the staged path uses, for running (and testing) that path on CPU, where
    every operation has finished when it returns."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = time.perf_counter()

    def record(self, stream: object = None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.at - self.at) * 1000.0


def make_event(device: torch.device, timing: bool = False) -> Any:
    """A blocking CUDA event on CUDA (``synchronize`` sleeps until the device reaches it, it does not spin a core),
    a ``HostEvent`` on CPU.

    Args:
        device: the runner's device.
        timing: the event can measure elapsed time.
    """
    if device.type == "cuda":
        return torch.cuda.Event(enable_timing=timing, blocking=True)
    return HostEvent(timing)


@dataclass(eq=False)
class HostBlock:
    """A flat uint8 host buffer of ``capacity`` bytes; ``gate`` is the event after which the device no longer uses it.

    ``pooled`` blocks belong to a ``HostPool`` and count against its budget; a pageable fallback block does not.
    """

    tensor: torch.Tensor
    pinned: bool
    pooled: bool
    gate: Any = None

    @property
    def capacity(self) -> int:
        return self.tensor.numel()

    def view(self, shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The block's first bytes as a tensor of ``shape`` and ``dtype``."""
        count = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return self.tensor[:count].view(dtype).view(tuple(shape))


class _HostArrays:
    """Exposes a block's first bytes to numpy; every array made from it keeps it (and so the block) alive.

    numpy collapses a view's ``base`` to the first object that is not an array, so this object is what every host
    array of a batch references: when the last one is gone it is collected, and the pool gets the block back.
    """

    def __init__(self, block: HostBlock, nbytes: int) -> None:
        self.block = block
        self.__array_interface__ = {"data": (block.tensor.data_ptr(), False), "shape": (nbytes,),
                                    "typestr": "|u1", "version": 3}


@dataclass
class PoolStats:
    """What a pool did: blocks allocated and released, pageable fallbacks, waits for a block's device work."""

    allocated: int = 0
    released: int = 0
    pageable: int = 0
    waits: int = 0
    cache_empties: int = 0


class HostPool:
    """Host blocks for uploads and downloads, pinned (on CUDA) within ``budget`` bytes as the allocator counts them.

    Blocks are kept per size class (a power of two). ``acquire`` prefers an idle block of the class whose device
    work is done, allocates another when the class has fewer than ``depth`` blocks (double buffering: one is
    filled while the other is copied), evicts idle blocks of other classes (oldest first) to make room, and falls
    back to a pageable block rather than exceed the budget.

    Args:
        budget: bytes of host memory the pool may hold (rounded sizes); no single block is over half of it.
        pin: pin blocks (CUDA). On CPU the blocks are plain memory, counted the same way.
        allocate: ``(bytes, pin) -> flat uint8 tensor``; default ``torch.empty(..., pin_memory=pin)``.
        empty_cache: releases the allocator's cached free blocks; default ``torch.accelerator.empty_host_cache``
            when pinning, nothing otherwise.
        depth: blocks per size class before ``acquire`` waits for one instead of allocating.
    """

    def __init__(self, budget: int = DEFAULT_PINNED_BUDGET, *, pin: bool = False,
                 allocate: Callable[[int, bool], torch.Tensor] | None = None,
                 empty_cache: Callable[[], None] | None = None, depth: int = 2) -> None:
        if budget < 1:
            raise ValueError(f"the host pool budget must be positive, got {budget}")
        self.budget = int(budget)
        self.pin = pin
        self.depth = max(1, depth)
        self._allocate = allocate or _allocate_host
        self._empty_cache = empty_cache or (torch.accelerator.empty_host_cache if pin else _nothing)
        self._idle: list[HostBlock] = []
        self._classes: dict[int, int] = {}
        self._returned: deque[HostBlock] = deque()
        self._lock = threading.Lock()
        self.held_bytes = 0
        self.stats = PoolStats()

    @property
    def max_block(self) -> int:
        """The largest block the pool pins: half the budget, so that two of them (double buffering) fit."""
        return self.budget // 2

    def acquire(self, nbytes: int) -> HostBlock:
        """A block of at least ``nbytes``, exclusively the caller's until ``give_back`` or ``lend``.

        Args:
            nbytes: bytes needed.
        """
        size = pinned_size(nbytes)
        if size > self.max_block:
            return self._pageable(nbytes)
        with self._lock:
            self._take_returned()
            same = [b for b in self._idle if b.tensor.numel() == size]
            for block in same:
                if block.gate is None or block.gate.query():
                    return self._take(block)
            if same and self._classes.get(size, 0) >= self.depth:
                return self._take(self._wait(same[0]))
            if self.held_bytes + size <= self.budget or self._evict(size):
                return self._new(size)
            if same:
                return self._take(self._wait(same[0]))
        return self._pageable(nbytes)

    def give_back(self, block: HostBlock, gate: Any = None) -> None:
        """Return ``block``; it is reused once ``gate`` (an event, or None) has been reached.

        Args:
            block: a block from ``acquire``.
            gate: the event after which the device is done with the block.
        """
        if not block.pooled:
            return
        block.gate = gate
        with self._lock:
            self._idle.append(block)

    def lend(self, block: HostBlock, nbytes: int) -> np.ndarray:
        """The block's first ``nbytes`` as a numpy array; the block comes back to the pool when that array and
        every view of it are gone (so results handed to callers are never overwritten).

        Args:
            block: a block from ``acquire`` whose device work is done.
            nbytes: bytes to expose.
        """
        holder = _HostArrays(block, nbytes)
        if block.pooled:
            weakref.finalize(holder, self._returned.append, block)
        return np.asarray(holder)

    def release_idle(self) -> None:
        """Free every idle block and unpin it (the allocator's cache is emptied too)."""
        with self._lock:
            self._take_returned()
            self._drop([b for b in self._idle])

    def _take_returned(self) -> None:
        while self._returned:
            self._idle.append(self._returned.popleft())

    def _take(self, block: HostBlock) -> HostBlock:
        self._idle.remove(block)
        block.gate = None
        return block

    def _wait(self, block: HostBlock) -> HostBlock:
        self.stats.waits += 1
        if block.gate is not None:
            block.gate.synchronize()
        return block

    def _new(self, size: int) -> HostBlock:
        block = HostBlock(self._allocate(size, self.pin), pinned=self.pin, pooled=True)
        self._classes[size] = self._classes.get(size, 0) + 1
        self.held_bytes += size
        self.stats.allocated += 1
        return block

    def _evict(self, size: int) -> bool:
        """Drop idle blocks of other classes, oldest first, until ``size`` more bytes fit; True if they do."""
        victims, freed = [], 0
        for block in self._idle:
            if self.held_bytes - freed + size <= self.budget:
                break
            if block.tensor.numel() != size:
                victims.append(block)
                freed += block.tensor.numel()
        if self.held_bytes - freed + size > self.budget:
            return False
        self._drop(victims)
        return True

    def _drop(self, victims: list[HostBlock]) -> None:
        if not victims:
            return
        for block in victims:
            self._wait(block)
            self._idle.remove(block)
            size = block.tensor.numel()
            self._classes[size] -= 1
            self.held_bytes -= size
            self.stats.released += 1
            block.tensor = torch.empty(0, dtype=torch.uint8)
        # The dropped tensors went back to the caching host allocator, still pinned: empty its cache to unpin them.
        self._empty_cache()
        self.stats.cache_empties += 1

    def _pageable(self, nbytes: int) -> HostBlock:
        self.stats.pageable += 1
        return HostBlock(torch.empty(nbytes, dtype=torch.uint8), pinned=False, pooled=False)


def _allocate_host(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _nothing() -> None:
    return None


_CUDNN_FLAG = threading.Lock()


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` for the calls inside only, then restore it.

    cuDNN reads the flag when a convolution is dispatched (on the host), so it only has to hold while the forward
    is launched. The flag is process-wide, so concurrent device workers take turns (``torch.backends.cudnn.flags``
    would also reset ``enabled`` and the other flags to its own defaults).
    """
    with _CUDNN_FLAG:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = on
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before


def _untuned(on: bool) -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass
class TuningPolicy:
    """Which (input shape, batch bucket) pairs run with ``cudnn.benchmark``: exactly those warm-up tuned.

    With ``cudnn.benchmark`` every new pair makes cuDNN time every algorithm of every convolution, on the single
    device worker (hundreds of ms to seconds), and letterbox ``auto`` yields as many input shapes as clients have
    aspect ratios. So tuning happens at warm-up for the warmed set; any other pair runs with the heuristics'
    algorithms, a little slower per batch but never stalling. The letterbox a client asked for is never changed.

    Args:
        apply: ``(benchmark) -> context manager`` that sets the flag around a forward (``cudnn_benchmark`` on CUDA;
            nothing on CPU; a recorder in tests).
    """

    apply: Callable[[bool], ContextManager[None]] = _untuned
    warmed: set[tuple[tuple[int, int], int]] = field(default_factory=set)
    untuned: set[tuple[tuple[int, int], int]] = field(default_factory=set)

    def allow(self, hw: tuple[int, int], bucket: int) -> None:
        """Let this pair tune (warm-up calls this before running it)."""
        self.warmed.add((tuple(hw), int(bucket)))

    def scope(self, hw: tuple[int, int], bucket: int) -> ContextManager[None]:
        """The flag for one forward of ``bucket`` frames of ``hw``: on for a warmed pair only."""
        pair = (tuple(hw), int(bucket))
        tuned = pair in self.warmed
        if not tuned and pair not in self.untuned:
            self.untuned.add(pair)
            log.info("input %sx%s at batch %d was not warmed up: it runs without cudnn tuning", *pair[0], pair[1])
        return self.apply(tuned)


class Streams:
    """The upload, compute and download streams of a CUDA device (all None on CPU, where work is eager)."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.upload = torch.cuda.Stream(device) if cuda else None
        self.compute = torch.cuda.Stream(device) if cuda else None
        self.download = torch.cuda.Stream(device) if cuda else None

    @staticmethod
    def on(stream: Any) -> ContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


@dataclass
class Download:
    """One batch's outputs on their way to the host: the block, where each output lies in it, and its events."""

    block: HostBlock
    nbytes: int
    layout: list[tuple[Any, tuple[int, ...], Any, int]]
    start: Any
    computed: Any
    copied: Any


class StagedCopies:
    """Moves batches between host and device on their own streams, through ``HostPool`` blocks.

    Args:
        device: the runner's device.
        pool: where host blocks come from.
    """

    def __init__(self, device: torch.device, pool: HostPool) -> None:
        self.device = device
        self.pool = pool
        self.streams = Streams(device)

    def upload(self, images: Sequence[np.ndarray], rows: int) -> torch.Tensor:
        """``images`` (equal HWC uint8 shapes) as a (``rows``, H, W, C) uint8 device tensor that the compute stream
        may use; rows past ``len(images)`` are padding whose content is unspecified.

        The host block holds ``rows`` frames, so one block per shape serves every batch of its bucket.
        """
        shape = (rows, *images[0].shape)
        block = self.pool.acquire(int(np.prod(shape)))
        staged = block.view(shape)
        host = staged.numpy()
        for i, image in enumerate(images):
            host[i] = image
        with Streams.on(self.streams.upload):
            x = staged.to(self.device, non_blocking=True)
            uploaded = make_event(self.device)
            uploaded.record(self.streams.upload)
        if x.data_ptr() == staged.data_ptr():  # CPU: .to() returned the block itself, which is reused
            x = x.clone()
        self.pool.give_back(block, uploaded)
        if self.streams.compute is not None:
            self.streams.compute.wait_event(uploaded)
            x.record_stream(self.streams.compute)
        return x

    def download(self, parts: Sequence[tuple[Any, torch.Tensor, torch.dtype]], rows: int, n: int, start: Any) -> Download:
        """Pack ``parts`` ((key, output of n frames, dtype to send) each) into one device buffer, cast and laid out
        contiguously in one copy per part, and queue one copy of it into a host block sized for ``rows`` frames.

        Called on the compute stream after the forward; ``start`` is the event recorded before it.
        """
        ordered = sorted(parts, key=lambda p: -torch.empty((), dtype=p[2]).element_size())
        layout, offset = [], 0
        for key, t, dtype in ordered:
            nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
            layout.append((key, tuple(t.shape), dtype, offset))
            offset += nbytes
        packed = torch.empty(offset, dtype=torch.uint8, device=self.device)
        for (key, shape, dtype, at), (_, t, _) in zip(layout, ordered):
            size = int(np.prod(shape))
            packed[at:at + size * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape).copy_(t)
        computed = make_event(self.device, True)
        computed.record(self.streams.compute)
        per_frame = -(-offset // max(1, n))
        block = self.pool.acquire(max(1, per_frame * max(rows, n)))
        with Streams.on(self.streams.download):
            if self.streams.download is not None:
                self.streams.download.wait_event(computed)
                packed.record_stream(self.streams.download)
            block.tensor[:offset].copy_(packed, non_blocking=True)
            copied = make_event(self.device, True)
            copied.record(self.streams.download)
        return Download(block, offset, layout, start, computed, copied)

    def fetch(self, download: Download) -> dict[Any, np.ndarray]:
        """Wait (sleeping) for ``download`` and return its outputs as host arrays viewing its block; the block goes
        back to the pool once the caller has dropped every one of them."""
        download.copied.synchronize()
        flat = self.pool.lend(download.block, download.nbytes)
        host = {}
        for key, shape, dtype, offset in download.layout:
            size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            host[key] = flat[offset:offset + size].view(HOST_DTYPES[dtype]).reshape(shape)
        return host
