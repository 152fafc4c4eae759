"""What every child process of a server does first, so that none outlives its supervisor."""

from __future__ import annotations

import os
import signal


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's own cleanup still runs on a normal exit
        pass


def become_child(parent_pid: int) -> None:
    """Die with the parent, and leave SIGINT (a terminal's Ctrl-C reaches the whole group) to the supervisor.

    Args:
        parent_pid: the supervisor's pid; if it is already gone, exit at once.
    """
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
