"""Liveness and readiness reports (streamer.health), with fake loop tasks and a fake consumer."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamer.health import BROKER_FETCH_MAX_AGE_SECONDS, Check, liveness, readiness
from streamer.metrics import IngestMetrics

NOW_MS = 1_764_881_234_567
PARTITION = TopicPartition("transactions", 0)
MODEL_OK = Check(True, "serving snapshot version 1")


class FakeConsumer:
    """The two aiokafka consumer methods that readiness reads."""

    def __init__(self, polled_ms: dict[TopicPartition, int | None]) -> None:
        self.polled_ms = polled_ms

    def assignment(self) -> set[TopicPartition]:
        return set(self.polled_ms)

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.polled_ms[tp]


def ready_report(consumer=None, *, started=True, stopping=False, model=MODEL_OK, metrics=None):
    if consumer is None:
        consumer = FakeConsumer({PARTITION: NOW_MS - 100})
    return readiness(started=started, stopping=stopping, consumer=consumer, model=model,
                     metrics=metrics or IngestMetrics(CollectorRegistry()), now_ms=NOW_MS)


# -- liveness ------------------------------------------------------------------------------


async def _forever() -> None:
    await asyncio.Event().wait()


async def _fail() -> None:
    raise ValueError("boom")


async def _return() -> None:
    return None


async def _task_liveness(coroutine, *, stopping: bool = False, cancel: bool = False):
    task = asyncio.create_task(coroutine(), name="inference-loop")
    await asyncio.sleep(0)
    if cancel:
        task.cancel()
    await asyncio.sleep(0)
    report = liveness([task], stopping)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return report


def test_liveness_before_start_is_ok():
    assert liveness([], stopping=False).ok


def test_liveness_running_task_ok():
    assert asyncio.run(_task_liveness(_forever)).ok


def test_liveness_failed_task_failing():
    report = asyncio.run(_task_liveness(_fail))
    assert report.failing == ["inference-loop"]
    assert report.checks["inference-loop"].detail == "failed: ValueError('boom')"


def test_liveness_failed_task_failing_while_stopping():
    assert not asyncio.run(_task_liveness(_fail, stopping=True)).ok


def test_liveness_task_ended_without_stop_failing():
    assert not asyncio.run(_task_liveness(_return)).ok


def test_liveness_task_ended_by_stop_ok():
    assert asyncio.run(_task_liveness(_return, stopping=True)).ok


def test_liveness_task_cancelled_without_stop_failing():
    assert not asyncio.run(_task_liveness(_forever, cancel=True)).ok


# -- readiness -----------------------------------------------------------------------------


def test_readiness_all_conditions_ok():
    report = ready_report()
    assert report.ok
    assert report.to_json()["failing"] == []


def test_readiness_lists_every_condition():
    assert list(ready_report().to_json()["checks"]) == ["running", "partitions_assigned", "model_loaded",
                                                         "broker_reachable"]


def test_readiness_before_start_not_running():
    assert ready_report(started=False).failing == ["running"]


def test_readiness_while_stopping_not_running():
    report = ready_report(stopping=True)
    assert report.failing == ["running"]
    assert report.checks["running"].detail == "worker is stopping"


def test_readiness_without_consumer_fails_partitions_and_broker():
    report = readiness(started=False, stopping=False, consumer=None, model=MODEL_OK,
                       metrics=IngestMetrics(CollectorRegistry()), now_ms=NOW_MS)
    assert report.failing == ["running", "partitions_assigned", "broker_reachable"]


def test_readiness_without_partitions_fails():
    assert ready_report(FakeConsumer({})).failing == ["partitions_assigned", "broker_reachable"]


def test_readiness_without_model_fails():
    report = ready_report(model=Check(False, "no snapshot served yet"))
    assert report.failing == ["model_loaded"]
    assert report.to_json()["checks"]["model_loaded"] == {"ok": False, "detail": "no snapshot served yet"}


def test_readiness_before_first_fetch_fails():
    report = ready_report(FakeConsumer({PARTITION: None}))
    assert report.failing == ["broker_reachable"]
    assert report.checks["broker_reachable"].detail == "no fetch response from the broker yet"


def test_readiness_stale_fetch_fails():
    stale = NOW_MS - int((BROKER_FETCH_MAX_AGE_SECONDS + 1) * 1000)
    report = ready_report(FakeConsumer({PARTITION: stale}))
    assert report.failing == ["broker_reachable"]
    assert report.checks["broker_reachable"].detail.startswith("no fetch response from the broker for 31 s")


def test_readiness_newest_fetch_of_any_partition_counts():
    stale = NOW_MS - int((BROKER_FETCH_MAX_AGE_SECONDS + 1) * 1000)
    consumer = FakeConsumer({PARTITION: stale, TopicPartition("labels", 0): NOW_MS - 50})
    assert ready_report(consumer).ok


def test_readiness_failed_produce_fails():
    metrics = IngestMetrics(CollectorRegistry())
    metrics.broker_errors.labels("produce").inc()
    metrics.broker_up.set(0)
    assert ready_report(metrics=metrics).failing == ["broker_reachable"]


@pytest.mark.parametrize("broker_up", [1, 0])
def test_readiness_broker_up_after_errors(broker_up):
    metrics = IngestMetrics(CollectorRegistry())
    metrics.broker_errors.labels("commit").inc()
    metrics.broker_up.set(broker_up)
    assert ready_report(metrics=metrics).ok == bool(broker_up)


def test_readiness_no_produce_yet_ok():
    # streamer_broker_up starts at 0 before any produce or commit; only a failure counts.
    metrics = IngestMetrics(CollectorRegistry())
    assert ready_report(metrics=metrics).ok
