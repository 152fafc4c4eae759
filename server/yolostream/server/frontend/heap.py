"""A front-end gives its freed heap back to the system soon after calls end (``lifecycle.malloc_trim``).

Why here as well as when the process goes quiet (``lifecycle.trim_when_quiet``, every child): a front-end that
serves steady streams is never quiet, yet a call that ends frees what it held (its request messages, gRPC's
receive buffers, reply bytes: 2.7 MB per raw 720p frame), and glibc keeps it. ``bench/abuse_memory.py``
measured it (BENCHMARKS.md). A trim runs ``delay_s`` after a call ends, at most one at a time (the calls ending
meanwhile share it), on a thread, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ..common.lifecycle import malloc_trim

log = logging.getLogger(__name__)

#: Seconds between a call's end and the trim (further calls ending meanwhile share that trim).
TRIM_DELAY_S = 1.0


class HeapTrimmer:
    """Runs ``trim`` on a thread ``delay_s`` after a call ends (see the module's docstring for why).

    Args:
        delay_s: seconds to wait after a call ends; calls ending meanwhile share the trim.
        trim: what gives the heap back (glibc's ``malloc_trim(0)``).
    """

    def __init__(self, delay_s: float = TRIM_DELAY_S, trim: Callable[[], bool] = malloc_trim) -> None:
        self.delay_s = delay_s
        self._trim = trim
        self._scheduled = False
        self.trims = 0

    def call_ended(self) -> None:
        """Note that a call has ended (on the event loop): a trim follows within ``delay_s``."""
        if self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay_s, lambda: loop.create_task(self._run()))

    async def _run(self) -> None:
        self._scheduled = False  # a call ending while this trim runs schedules the next one
        start = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self._trim)
        self.trims += 1
        log.debug("heap trim took %.1f ms", (time.perf_counter() - start) * 1e3)
