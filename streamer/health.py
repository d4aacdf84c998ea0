"""Liveness and readiness of the workers, served by `streamer.http_api` on /health/live and /health/ready.

A worker is live while none of its loop tasks has died: a task that ended with an
exception, or ended while the worker was not stopping. A worker that is still starting
(no loop task yet) is live.

A worker is ready when every readiness check passes:

- ``running``: start() has finished and stop() has not begun;
- ``partitions_assigned``: its consumer group gave it at least one partition;
- ``model_loaded``: the inference worker serves a snapshot, the updater has its target model;
- ``broker_reachable``: the last Kafka produce or commit succeeded (``streamer_broker_up``),
  or none has failed yet, and a fetch response came from the broker within
  `BROKER_FETCH_MAX_AGE_SECONDS` for one of the assigned partitions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from .metrics import IngestMetrics

# Seconds without a fetch response after which the broker counts as unreachable. A polling
# worker receives one per assigned partition about every 0.1 s (the fetch wait) even when
# no record comes. The updater does not fetch while a micro-batch has run for more than
# 0.5 s (its partitions are paused), so a micro-batch longer than this makes it not ready.
# NOTE: 30 s is a judgement, not tuned against real probe periods or broker failovers.
BROKER_FETCH_MAX_AGE_SECONDS = 30.0


@dataclass(frozen=True)
class Check:
    """Outcome of one health condition, with a detail a person can act on."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """Outcomes of the conditions of one probe, by condition name."""

    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    @property
    def failing(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.ok]

    def to_json(self) -> dict:
        return {
            "status": "ok" if self.ok else "failing",
            "failing": self.failing,
            "checks": {name: {"ok": check.ok, "detail": check.detail} for name, check in self.checks.items()},
        }


def liveness(tasks: Iterable[asyncio.Task], stopping: bool) -> HealthReport:
    """Report whether every loop task runs, or ended only because the worker is stopping."""
    checks = {}
    for task in tasks:
        checks[task.get_name()] = _task_check(task, stopping)
    if not checks:
        checks["loop"] = Check(True, "worker is starting, no loop task yet")
    return HealthReport(checks)


def _task_check(task: asyncio.Task, stopping: bool) -> Check:
    if not task.done():
        return Check(True, "running")
    if task.cancelled():
        return Check(stopping, "cancelled")
    error = task.exception()
    if error is not None:
        return Check(False, f"failed: {error!r}")
    return Check(stopping, "ended" if stopping else "ended while the worker was not stopping")


def readiness(
    *, started: bool, stopping: bool, consumer, model: Check, metrics: IngestMetrics, now_ms: int | None = None
) -> HealthReport:
    """Report the readiness checks of a worker.

    Arguments:
        started: start() has finished.
        stopping: stop() has begun.
        consumer: the worker's group consumer (aiokafka), or None before it exists.
        model: the worker's own model check.
        metrics: the worker's metrics, whose ``broker_up`` and ``broker_errors`` are read.
        now_ms: wall-clock Unix milliseconds, for tests; the current time by default.
    """
    if stopping:
        running = Check(False, "worker is stopping")
    elif not started:
        running = Check(False, "worker is starting")
    else:
        running = Check(True, "started")
    assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition)) if consumer is not None else []
    partitions = (Check(True, f"{len(assigned)} partitions assigned") if assigned
                  else Check(False, "no partition assigned by the consumer group yet"))
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return HealthReport({
        "running": running,
        "partitions_assigned": partitions,
        "model_loaded": model,
        "broker_reachable": broker_check(consumer, assigned, metrics, now),
    })


def broker_check(consumer, assigned: list, metrics: IngestMetrics, now_ms: int) -> Check:
    """Check that the last produce or commit did not fail and that a fetch response is recent."""
    if _sample_sum(metrics.broker_up) == 0 and _sample_sum(metrics.broker_errors) > 0:
        return Check(False, "the last Kafka produce or commit failed and is being retried (streamer_broker_up 0)")
    polled = [consumer.last_poll_timestamp(tp) for tp in assigned]
    polled = [stamp for stamp in polled if stamp is not None]
    if not polled:
        return Check(False, "no fetch response from the broker yet")
    age_seconds = max(0.0, (now_ms - max(polled)) / 1000)
    if age_seconds > BROKER_FETCH_MAX_AGE_SECONDS:
        return Check(False, f"no fetch response from the broker for {age_seconds:.0f} s "
                            f"(limit {BROKER_FETCH_MAX_AGE_SECONDS:.0f} s)")
    return Check(True, f"last fetch response {age_seconds:.1f} s ago")


def _sample_sum(metric: MetricWrapperBase) -> float:
    """Add up the current values of a counter's or gauge's series (``_created`` samples left out)."""
    return sum(
        sample.value
        for family in metric.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    )
