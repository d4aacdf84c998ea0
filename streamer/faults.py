"""Crash points for fault-injection tests: the process kills itself at a named point.

``STREAMER_CRASH_AT=checkpoint.written:2`` sends SIGKILL to the worker's own process the
second time it reaches the point ``checkpoint.written``. A kill from outside lands at a
random moment. A crash point lands inside the step a test wants to break, for example
between writing a checkpoint's files and making it visible. Points are listed in
`CRASH_POINTS`. Unset (the default), a crash point costs one attribute lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from .errors import ConfigurationError

logger = logging.getLogger(__name__)

ENV = "STREAMER_CRASH_AT"
CRASH_POINTS = (
    "microbatch.trained",  # after an optimiser step, before the ledger and counters record it
    "checkpoint.written",  # checkpoint files written and synced, not yet renamed into place
    "checkpoint.renamed",  # checkpoint folder renamed into place, LATEST not yet pointing at it
    "export.converted",  # ONNX bytes built, nothing published
    "export.published",  # snapshot in the store, not yet announced
)


class _CrashPlan:
    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.remaining = 0
        self._lock = threading.Lock()
        if spec:
            point, _, count = spec.partition(":")
            if point not in CRASH_POINTS or not count.isdigit() or int(count) < 1:
                raise ConfigurationError(
                    f"{ENV}={spec!r} must be POINT:COUNT with COUNT >= 1 and POINT one of {', '.join(CRASH_POINTS)}"
                )
            self.point, self.remaining = point, int(count)

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self.remaining -= 1
            if self.remaining:
                return
        logger.warning("crash point reached point=%s: killing this process (%s)", point, ENV)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


_plan = _CrashPlan(os.environ.get(ENV))


def crash_point(point: str) -> None:
    """Kill this process with SIGKILL if ``STREAMER_CRASH_AT`` names this point and its count is reached."""
    if _plan.point is not None:
        _plan.reached(point)
