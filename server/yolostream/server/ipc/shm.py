"""Shared memory between a front-end and the device process: one arena per front-end, slots reused.

A front-end creates its arena (a file in /dev/shm, reserved with ``posix_fallocate`` so that running out of shared
memory is a clear error at start-up, never a SIGBUS mid-stream), the device process maps it, and the front-end
then unlinks the name: the memory lives exactly as long as the two mappings, so no crash, not even a SIGKILL of
every process, can leave a segment behind. Names carry the supervising server's pid (``yolostream-<pid>-…``) and
a start-up sweep removes any whose server is gone, which covers the instant between creating and unlinking.

Only offsets cross processes. ``SlotAllocator`` hands out byte ranges of the arena: a frame's letterboxed input and
the room for its features (none when the device writes them into a client's region instead), both freed when the
device has answered.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import UserError
from ..common.lifecycle import process_alive

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
PREFIX = "yolostream-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
#: Slot offsets are aligned for any dtype and for cache lines.
ALIGN = 64


def segment_prefix(server_pid: int | None = None) -> str:
    """The name prefix of every segment of the server whose supervising process is ``server_pid``."""
    return f"{PREFIX}{server_pid or os.getpid()}-"


def sweep_stale(directory: Path = SHM_DIR) -> list[str]:
    """Remove segments left by servers that no longer run; returns their names."""
    removed = []
    for path in directory.glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match and not process_alive(int(match.group(1))):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def leftover_segments(prefix: str, directory: Path = SHM_DIR) -> list[str]:
    """Names under ``prefix`` still present (a test and the supervisor's exit check use this)."""
    return sorted(p.name for p in directory.glob(f"{prefix}*"))


class SharedArena:
    """A fixed-size shared-memory file mapped into this process. Create it with ``create``, map it with ``attach``."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.size = size
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, name: str, size: int, directory: Path = SHM_DIR) -> "SharedArena":
        """A new arena of ``size`` bytes, its memory reserved now. UserError when shared memory is too small."""
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise UserError(f"cannot reserve {size // (1024 * 1024)} MiB of shared memory in {directory} "
                            f"({err.strerror}): lower --shm-mb or give the container more (docker --shm-size)") from err
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, size)

    @classmethod
    def attach(cls, name: str, directory: Path = SHM_DIR) -> "SharedArena":
        """Map an arena another process created (before it unlinks the name)."""
        path = directory / name
        fd = os.open(path, os.O_RDWR)
        return cls(path, fd, os.fstat(fd).st_size)

    def unlink(self) -> None:
        """Remove the name; the memory stays until every process has unmapped it."""
        self.path.unlink(missing_ok=True)

    def view(self, offset: int, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """A numpy array over the arena's bytes at ``offset`` (no copy)."""
        return np.ndarray(shape, dtype=dtype, buffer=self._map, offset=offset)


class ArenaFull(Exception):
    """No free range is large enough right now (the caller waits for a free)."""


class SlotAllocator:
    """First-fit allocation of byte ranges in ``[0, size)``, coalescing on free. One thread uses it.

    In-flight frames finish roughly in order and are of a few sizes per stream, so a free list stays short.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]
        self._used: dict[int, int] = {}

    def fits(self, nbytes: int) -> bool:
        """Whether a request of ``nbytes`` could ever be served (when everything else is free)."""
        return _aligned(nbytes) <= self.size

    def alloc(self, nbytes: int) -> int:
        """Offset of a new range of at least ``nbytes``; ArenaFull when no free range is large enough."""
        need = _aligned(max(1, nbytes))
        for k, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[k]
                else:
                    self._free[k] = (start + need, length - need)
                self._used[start] = need
                return start
        raise ArenaFull(nbytes)

    def free(self, offset: int) -> None:
        length = self._used.pop(offset)
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < offset:
                lo = mid + 1
            else:
                hi = mid
        free.insert(lo, (offset, length))
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (free[lo][0], free[lo][1] + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def arena_name(prefix: str, frontend: int, generation: int) -> str:
    """The shared-memory name of front-end ``frontend``'s arena (a replaced front-end gets a new generation)."""
    return f"{prefix}fe{frontend}-{generation}-{os.getpid()}"
