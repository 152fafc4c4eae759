"""The client regions one front-end shares with the device: features written straight into a client's memory.

A stream on ``--allow-client-shm`` reads its features from its own region (a sealed memfd). Its front-end passes
the region's descriptor on (``ipc.messages.ShareRegion``); the device maps it here and writes each frame's tensors
into the frame's output room (``ipc.messages.OutputTarget``), so the front-end copies nothing and only sends the
offsets. What the device maps is a client's memory, so nothing here trusts the front-end's word alone:

- the descriptor is checked again (``common.memfd.check_region_fd``: sealed against shrinking, shmem, bounded) and
  must hold at least the size the front-end mapped; only that much is mapped, so no write can reach past the end
  of the file and fault;
- every write is checked against the mapping's size before a byte moves; a bad one fails that frame only;
- a front-end has at most ``MAX_SHARED_REGIONS`` regions here; each is unmapped when the front-end releases it (its
  stream ended) or disconnects, after a write still under way, never during one (a lock per region).

numpy and the standard library only: the worker threads write with ``np.copyto``, which drops the GIL for the copy.
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import Sequence

import numpy as np

from ..common.memfd import RegionRefused, check_region_fd, map_region, packed_spans, spans_end, unmap_region
from ..ipc.messages import MAX_SHARED_REGIONS, OutputTarget

log = logging.getLogger(__name__)


class _Mapped:
    """One region mapped read-write; ``lock`` keeps it mapped while a frame's tensors are written."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.map: mmap.mmap | None = map_region(fd, size)

    def close(self) -> None:
        with self.lock:
            if self.map is not None:
                unmap_region(self.map)
                self.map = None


class ClientRegions:
    """The regions one front-end shared with the device, by the id it gave each. Thread-safe: the front-end's
    reader thread shares and releases, the device's worker threads write.

    Args:
        limit: regions held at once; more are refused (their frames fail).
    """

    def __init__(self, limit: int = MAX_SHARED_REGIONS) -> None:
        self.limit = limit
        #: A mapped region, or why it could not be mapped (its frames fail with that reason).
        self._regions: dict[int, _Mapped | str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    def share(self, region: int, fd: int, size: int) -> str | None:
        """Map ``size`` bytes of the memfd ``fd`` (the caller closes it) as ``region``; None when mapped, else why
        not. A refused region is remembered as such, so that frames naming it all the same fail saying why."""
        try:
            held = check_region_fd(fd)
            if held < size:
                raise RegionRefused(f"the region is {held} bytes, the front-end mapped {size}")
            entry: _Mapped | str = _Mapped(fd, size)
        except (RegionRefused, OSError, ValueError) as err:
            entry = f"the device could not map the stream's region: {err}"
        return self._hold(region, entry)

    def refuse(self, region: int, why: str) -> str:
        """Hold ``region`` as refused (it never came, say): the frames naming it fail with ``why``; returns why."""
        return self._hold(region, why) or why

    def _hold(self, region: int, entry: "_Mapped | str") -> str | None:
        """Keep ``entry`` as ``region``; None when it is a mapping now held, else why the region is refused."""
        with self._lock:
            if region not in self._regions and len(self._regions) < self.limit:
                self._regions[region] = entry
                return entry if isinstance(entry, str) else None
        if isinstance(entry, _Mapped):
            entry.close()
        log.error("a front-end shared region %d beyond the %d it may have (or twice): refused", region, self.limit)
        return f"the device holds {self.limit} regions of this front-end already"

    def release(self, region: int) -> None:
        """Unmap ``region`` (once a write under way is done); nothing when it is not held."""
        with self._lock:
            entry = self._regions.pop(region, None)
        if isinstance(entry, _Mapped):
            entry.close()

    def close(self) -> None:
        """Unmap every region (the front-end went away)."""
        with self._lock:
            entries, self._regions = list(self._regions.values()), {}
        for entry in entries:
            if isinstance(entry, _Mapped):
                entry.close()

    def write(self, target: OutputTarget, arrays: Sequence[np.ndarray]) -> str | None:
        """Write a frame's ``arrays`` where ``target`` says, each at its ``packed_spans`` offset; None when done,
        else why not (that frame fails; nothing was written outside the region)."""
        with self._lock:
            entry = self._regions.get(target.region)
        if entry is None:
            return "the stream's shared-memory region is not shared with the device (released, or refused)"
        if isinstance(entry, str):
            return entry
        spans = packed_spans(target.offset, [array.nbytes for array in arrays])
        taken = spans_end(target.offset, spans) - target.offset
        if taken != target.length:
            return f"internal error: the features take {taken} bytes of the region, the front-end expected " \
                   f"{target.length}"
        with entry.lock:
            if entry.map is None:
                return "the stream's shared-memory region was released"
            if target.offset < 0 or target.offset + taken > entry.size:
                return f"the output room (offset {target.offset}, {taken} bytes) reaches past the end of the " \
                       f"stream's shared-memory region ({entry.size} bytes)"
            for (start, _), array in zip(spans, arrays):
                _copy_into(entry.map, start, array)
        return None


def _copy_into(buffer: mmap.mmap, offset: int, array: np.ndarray) -> None:
    """Copy ``array`` into ``buffer`` at ``offset`` through a view that is gone when this returns (an export would
    keep the mapping from closing)."""
    view = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=offset)
    try:
        np.copyto(view, array, casting="no")
    finally:
        del view
