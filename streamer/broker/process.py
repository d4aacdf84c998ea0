"""Process hygiene for child processes: a parent-death signal and SIGTERM as an exception.

A broker or worker child must never outlive the process that started it, even when that
process is killed with SIGKILL and runs no cleanup. And a SIGTERM to the parent should
unwind its stack like Ctrl-C does, so that ``finally`` blocks and context managers stop
the children in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1

# The pid of the process that last forked, recorded by the at-fork hook below. A child
# compares it with its own parent pid to detect a parent that died before prctl ran.
_forking_pid: int | None = None


def _record_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


os.register_at_fork(before=_record_forking_pid)

# libc is loaded here, in the parent, so that the child between fork and exec only calls
# into an already loaded library.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def parent_death_signal() -> None:
    """Make the calling child receive SIGKILL when its parent dies (Linux only).

    Use as ``subprocess.Popen(..., preexec_fn=parent_death_signal)``. It does nothing on
    other platforms. If the parent has already died between fork and this call, the
    child exits at once.

    NOTE: Linux sends the signal when the parent *thread* that forked the child exits,
    not only when the whole process exits. Start long-lived children from the main
    thread or from a thread that lives as long as they should.
    """
    if _libc is None:
        return
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)  # runs in the forked child: no Python cleanup, no exception
    if _forking_pid is not None and os.getppid() != _forking_pid:
        os._exit(127)


def die_with_parent(parent_pid: int) -> None:
    """Like `parent_death_signal`, for a child that runs Python code of its own.

    A spawned child (multiprocessing "spawn", a pool initializer) runs no at-fork hook,
    so its parent's pid is passed in. Without this, an updater killed with SIGKILL left its
    export process running (seen in tests/e2e/test_updater_crash.py).
    """
    if _libc is None:
        return
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(127)  # the parent died before prctl ran


def _raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def graceful_signals(signals: Iterable[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """Turn the given signals into ``SystemExit(128 + signal)`` in the main thread.

    Inside the block a SIGTERM unwinds the stack like KeyboardInterrupt does for SIGINT,
    so ``finally`` blocks and context managers (an EmbeddedBroker, child workers) run.
    The previous handlers are restored on exit. Python delivers signals to the main
    thread only, so outside it this context manager changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.debug("graceful_signals outside the main thread: signal handlers unchanged")
        yield
        return
    previous = {signum: signal.signal(signum, _raise_system_exit) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
