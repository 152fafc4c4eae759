"""What every child process of a server does first, so that none outlives its supervisor."""

from __future__ import annotations

import os
import signal

#: Where a server's front-ends share their metrics: prometheus_client's multiprocess directory, which it reads when
#: it is imported (see ``metrics.py``).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's own cleanup still runs on a normal exit
        pass


def become_child(parent_pid: int, metrics_dir: str | None = None) -> None:
    """Die with the parent, and leave SIGINT (a terminal's Ctrl-C reaches the whole group) to the supervisor.

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
