"""A client's region as every server process sees it: which descriptors may be mapped, and where tensors lie in it.

A region is a client's memfd (``StreamConfig.shared_memory``). The front-end serving the stream checks it when the
client passes it (``frontend.client_shm``) and maps it to read the frames' pixels; the device process maps the same
memfd to write the frames' tensors straight into their output room (``device.regions``). Both run the one check
here, so the device never trusts a descriptor on the front-end's word alone, and both lay tensors out with the one
``packed_spans``, so the offsets the front-end sends the client are where the device wrote the bytes.

Only descriptors that can never make an access through the mapping fault are taken: memfds sealed against
shrinking (the region can never become shorter than a mapping of it), on shmem (hugetlbfs pages come from a fixed
pool, and a write that finds it empty raises SIGBUS), no larger than ``MAX_REGION_BYTES``.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import logging
import mmap
import os
import stat
from typing import Sequence

from yolostream.v1 import vocab

#: Largest region a stream may pass (reported in ModelInfo.shared_memory). The mapping costs address space only:
#: pages are memory only once written, by either side.
MAX_REGION_BYTES = 16 * 1024**3
#: statfs f_type of shmem (tmpfs), where memfds live unless created with MFD_HUGETLB.
TMPFS_MAGIC = 0x01021994
_libc = ctypes.CDLL(None, use_errno=True)

log = logging.getLogger(__name__)


class RegionRefused(ValueError):
    """A descriptor that cannot be a region; the text says why (and never quotes what the client sent)."""


def check_region_fd(fd: int, max_bytes: int = MAX_REGION_BYTES) -> int:
    """The size of the region behind ``fd``, after checking that it can be mapped safely; RegionRefused if not.

    Args:
        fd: the descriptor a client passed.
        max_bytes: the largest region accepted.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RegionRefused("the descriptor is not a sealable memfd (F_GET_SEALS fails): create the region with "
                            "memfd_create(MFD_ALLOW_SEALING)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise RegionRefused("the memfd is not sealed against shrinking: add F_SEAL_SHRINK (fcntl F_ADD_SEALS) before "
                            "passing it, so that it can never become shorter than the server's mapping")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or _filesystem(fd) != TMPFS_MAGIC:
        raise RegionRefused("the descriptor is not a shmem memfd (hugetlbfs memfds are refused: their pages come "
                            "from a fixed pool)")
    if not 0 < info.st_size <= max_bytes:
        raise RegionRefused(f"the region is {info.st_size} bytes: it must be 1 to {max_bytes} bytes")
    return info.st_size


def _filesystem(fd: int) -> int:
    """The statfs magic number of the file system ``fd`` lives on (``fstatfs``' first field, f_type)."""
    buffer = ctypes.create_string_buffer(256)  # larger than struct statfs on every Linux ABI
    if _libc.fstatfs(fd, buffer) != 0:
        raise RegionRefused("the descriptor's file system cannot be read (fstatfs fails)")
    return ctypes.c_long.from_buffer(buffer).value


def map_region(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of a region ``check_region_fd`` passed, shared and read-write (OSError if the kernel
    refuses, e.g. a memfd sealed against writes)."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def unmap_region(mapping: mmap.mmap) -> None:
    """Close a region's mapping. A view still alive somewhere (a traceback holding a frame) is collected first;
    only if one survives that is the mapping left to the garbage collector, and that is logged."""
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        try:
            mapping.close()
        except BufferError:
            log.warning("a client's shared-memory region is still referenced; it is unmapped when released")


def packed_spans(offset: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of tensors of ``sizes`` bytes laid one after the other from ``offset``, each starting at a
    multiple of ``vocab.SHM_ALIGN`` (the first one too), as a client reads them from its region.

    Args:
        offset: where the frame's output room starts.
        sizes: each tensor's bytes, in the reply's order.
    """
    spans, cursor = [], offset
    for size in sizes:
        start = vocab.shm_aligned(cursor)
        spans.append((start, size))
        cursor = start + size
    return spans


def spans_end(offset: int, spans: Sequence[tuple[int, int]]) -> int:
    """Where the last of ``spans`` ends (``offset`` when there are none): the room they take is this less
    ``offset``."""
    return spans[-1][0] + spans[-1][1] if spans else offset
