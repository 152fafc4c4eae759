"""What every child process of a server does first: die with its supervisor, and give freed heap back."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Callable

#: Where a server's front-ends share their metrics: prometheus_client's multiprocess directory, which it reads when
#: it is imported (see ``metrics.py``).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's own cleanup still runs on a normal exit
        pass


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``); False where there is no glibc.

    Why: glibc keeps what a process frees. Once a big buffer (a raw frame, a batch's activations) has been freed,
    it raises its mmap threshold to that size, so later big buffers come from its malloc arenas, where small live
    allocations in between keep the freed pages from going back. ``bench/abuse_memory.py`` measured a front-end
    holding over 1 GB that way after raw-frame floods had ended, and the device over 100 MB (BENCHMARKS.md). The
    trim ``madvise``s every free page of every arena away: about 0.2 ms per MB returned, 0.1 ms when there is
    nothing to return; ctypes releases the GIL for the call. Measured and not kept: ``MALLOC_ARENA_MAX=2`` did not
    bound the growth; a fixed mmap threshold (``M_MMAP_THRESHOLD``) did, but every big buffer is then a fresh
    mapping that page-faults on first touch: 14 times the CPU of parsing and decoding a raw 720p frame.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


#: Seconds between two looks at a child's CPU time; the share of one core under which it counts as quiet; and
#: the fall from its busiest period that counts as quiet too (a device still serving a camera after a flood).
QUIET_PERIOD_S, QUIET_CPU, QUIET_DROP = 2.0, 0.05, 0.25


class QuietAfterWork:
    """Tells, from the CPU time a process used in each period, when it has gone quiet after work: once per quiet
    spell, a period under ``quiet_cpu`` of a core or under ``drop`` times the busiest period since the last quiet
    spell, following one over ``quiet_cpu``; not again until it has worked again."""

    def __init__(self, period_s: float = QUIET_PERIOD_S, quiet_cpu: float = QUIET_CPU,
                 drop: float = QUIET_DROP) -> None:
        self.limit = quiet_cpu * period_s
        self.drop = drop
        self.busiest = 0.0

    def quiet_again(self, cpu_s: float) -> bool:
        """Whether the process has just gone quiet, given the CPU seconds (all threads) of the last period."""
        if self.busiest > self.limit and (cpu_s <= self.limit or cpu_s < self.drop * self.busiest):
            self.busiest = 0.0
            return True
        self.busiest = max(self.busiest, cpu_s)
        return False


def trim_when_quiet(period_s: float = QUIET_PERIOD_S, quiet_cpu: float = QUIET_CPU,
                    drop: float = QUIET_DROP) -> threading.Thread:
    """Start a daemon thread that calls ``malloc_trim`` each time the process goes quiet after work
    (``QuietAfterWork``, looking every ``period_s``).

    Why quiet: trimming a busy process only returns pages its next frames or batches fault back in, and the trim
    holds each malloc arena's lock while it runs. A process whose burst of work is over keeps its peak heap
    otherwise, though nothing uses it: the device after a flood's full batches (measured: over 100 MB, while a
    camera's stream still kept it busy), a front-end after floods.
    """

    def watch() -> None:
        detector = QuietAfterWork(period_s, quiet_cpu, drop)
        last = time.process_time()
        while True:
            time.sleep(period_s)
            now = time.process_time()
            if detector.quiet_again(now - last):
                malloc_trim()
            last = now

    thread = threading.Thread(target=watch, name="yolostream-heap-trim", daemon=True)
    thread.start()
    return thread


def become_child(parent_pid: int, metrics_dir: str | None = None) -> None:
    """Die with the parent, leave SIGINT (a terminal's Ctrl-C reaches the whole group) to the supervisor, and give
    freed heap back whenever the process goes quiet (``trim_when_quiet``).

    Args:
        parent_pid: the supervisor's pid; if it is already gone, exit at once.
        metrics_dir: the server's shared metrics directory, set for prometheus_client before anything imports it.
    """
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if metrics_dir is not None:
        os.environ[METRICS_DIR_ENV] = metrics_dir
    if _MALLOC_TRIM is not None:
        trim_when_quiet()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (leftovers of a server whose pid is gone are swept at start-up)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
