"""Retry with back-off, retained sends, commits and position resets, with fake Kafka clients."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from prometheus_client import CollectorRegistry

from streamer.errors import BrokerError
from streamer.metrics import IngestMetrics
from streamer.retry import RetainedSend, commit, reset_positions_beyond_end, retry


class FailingOperation:
    """An async operation that raises ``error`` on its first ``failures`` calls, then returns "done"."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error if error is not None else KafkaConnectionError("broker unreachable")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


class RecordingSleep:
    """A sleep that records its delays and returns at once."""

    def __init__(self, stop_event: asyncio.Event | None = None, stop_after: int | None = None) -> None:
        self.delays: list[float] = []
        self.stop_event = stop_event
        self.stop_after = stop_after

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.stop_event is not None and len(self.delays) == self.stop_after:
            self.stop_event.set()


def new_metrics() -> tuple[IngestMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return IngestMetrics(registry), registry


def errors(registry: CollectorRegistry, operation: str) -> float:
    return registry.get_sample_value("streamer_broker_errors_total", {"operation": operation}) or 0.0


def broker_up(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("streamer_broker_up")


# -- retry ---------------------------------------------------------------------------------


def test_retry_returns_result_after_failures():
    metrics, _ = new_metrics()
    operation = FailingOperation(3)
    result = asyncio.run(retry("produce", operation, metrics=metrics, sleep=RecordingSleep()))
    assert result == "done"
    assert operation.calls == 4


def test_retry_backoff_doubles_then_caps():
    metrics, _ = new_metrics()
    sleep = RecordingSleep()
    asyncio.run(retry("produce", FailingOperation(7), metrics=metrics, initial=0.5, maximum=10.0, sleep=sleep))
    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_retry_counts_each_failure_by_operation():
    metrics, registry = new_metrics()
    asyncio.run(retry("commit", FailingOperation(2), metrics=metrics, sleep=RecordingSleep()))
    assert errors(registry, "commit") == 2
    assert errors(registry, "produce") == 0


def test_retry_sets_broker_up_after_success():
    metrics, registry = new_metrics()
    asyncio.run(retry("produce", FailingOperation(1), metrics=metrics, sleep=RecordingSleep()))
    assert broker_up(registry) == 1


def test_retry_logs_each_failure(caplog: pytest.LogCaptureFixture):
    metrics, _ = new_metrics()
    with caplog.at_level(logging.WARNING, logger="streamer.retry"):
        asyncio.run(retry("announce", FailingOperation(3), metrics=metrics, sleep=RecordingSleep()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("operation=announce" in message for message in warnings)
    assert all("broker unreachable" in message for message in warnings)


def test_retry_stops_when_stop_event_set():
    async def scenario() -> tuple[FailingOperation, RecordingSleep]:
        stop = asyncio.Event()
        operation = FailingOperation(100)
        sleep = RecordingSleep(stop, stop_after=2)
        metrics, _ = new_metrics()
        with pytest.raises(BrokerError, match="produce failed while the worker is stopping"):
            await retry("produce", operation, metrics=metrics, stop_event=stop, sleep=sleep)
        return operation, sleep

    operation, sleep = asyncio.run(scenario())
    # Two back-offs, the stop event set during the second, then one more failed call.
    assert operation.calls == 3
    assert len(sleep.delays) == 2


def test_retry_stop_event_interrupts_backoff():
    async def never_wakes(seconds: float) -> None:
        await asyncio.Event().wait()

    async def scenario() -> FailingOperation:
        stop = asyncio.Event()
        operation = FailingOperation(100)
        metrics, _ = new_metrics()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        with pytest.raises(BrokerError):
            # The timeout only turns a hang into a failure; the stop event ends the back-off.
            await asyncio.wait_for(
                retry("produce", operation, metrics=metrics, stop_event=stop, sleep=never_wakes), timeout=5
            )
        return operation

    # One failure before the back-off, one after the stop event.
    assert asyncio.run(scenario()).calls == 2


def test_retry_sets_broker_down_when_stopping():
    async def scenario() -> CollectorRegistry:
        stop = asyncio.Event()
        stop.set()
        metrics, registry = new_metrics()
        with pytest.raises(BrokerError):
            await retry("commit", FailingOperation(1), metrics=metrics, stop_event=stop, sleep=RecordingSleep())
        return registry

    assert broker_up(asyncio.run(scenario())) == 0


def test_retry_raises_other_errors_at_once():
    metrics, registry = new_metrics()
    operation = FailingOperation(1, ValueError("a bug, not an outage"))
    with pytest.raises(ValueError):
        asyncio.run(retry("produce", operation, metrics=metrics, sleep=RecordingSleep()))
    assert operation.calls == 1
    assert errors(registry, "produce") == 0


# -- retained sends ------------------------------------------------------------------------


class FakeProducer:
    """Records each send; the futures of the first ``failing_sends`` sends fail with a timeout."""

    def __init__(self, failing_sends: int) -> None:
        self.failing_sends = failing_sends
        self.sent: list[tuple[str, bytes, bytes | None, int | None, list | None]] = []

    async def send(self, topic, value, *, key=None, partition=None, headers=None) -> asyncio.Future:
        self.sent.append((topic, value, key, partition, headers))
        future = asyncio.get_running_loop().create_future()
        if len(self.sent) <= self.failing_sends:
            future.set_exception(KafkaTimeoutError())
        else:
            future.set_result(len(self.sent))
        return future


RECORDS = [(b"k1", b"v1", None), (b"k2", b"v2", [("h", b"1")])]


def test_retained_send_resends_same_records_after_failure():
    async def scenario() -> FakeProducer:
        producer = FakeProducer(failing_sends=1)
        send = RetainedSend("scores", 2, list(RECORDS))
        metrics, _ = new_metrics()
        await retry("produce", lambda: send.acknowledged(producer), metrics=metrics, sleep=RecordingSleep())
        return producer

    producer = asyncio.run(scenario())
    expected = [("scores", value, key, 2, headers) for key, value, headers in RECORDS]
    # The first attempt fails on its first record, so both records go again.
    assert producer.sent == expected + expected


def test_retained_send_awaits_existing_futures_first():
    async def scenario() -> FakeProducer:
        producer = FakeProducer(failing_sends=0)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        send = RetainedSend("scores", 0, list(RECORDS), [done])
        await send.acknowledged(producer)
        return producer

    assert asyncio.run(scenario()).sent == []


def test_retained_send_raises_failed_acknowledgement():
    async def scenario() -> None:
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(KafkaTimeoutError())
        send = RetainedSend("scores", 0, list(RECORDS), [failed])
        await send.acknowledged(FakeProducer(failing_sends=0))

    with pytest.raises(KafkaTimeoutError):
        asyncio.run(scenario())


# -- commit --------------------------------------------------------------------------------


class FakeConsumer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.committed: list = []

    async def commit(self, offsets=None) -> None:
        if self.error is not None:
            raise self.error
        self.committed.append(offsets)


def test_commit_returns_false_on_broker_error():
    metrics, registry = new_metrics()
    accepted = asyncio.run(commit(FakeConsumer(KafkaConnectionError("down")), {"tp": 5}, metrics=metrics))
    assert accepted is False
    assert errors(registry, "commit") == 1
    assert broker_up(registry) == 0


def test_commit_passes_offsets_on_success():
    metrics, registry = new_metrics()
    consumer = FakeConsumer()
    accepted = asyncio.run(commit(consumer, {"tp": 5}, metrics=metrics))
    assert accepted is True
    assert consumer.committed == [{"tp": 5}]
    assert broker_up(registry) == 1


# -- positions beyond the end --------------------------------------------------------------


class PositionedConsumer:
    def __init__(self, positions: dict[TopicPartition, int], highwaters: dict[TopicPartition, int | None]) -> None:
        self.positions = positions
        self.highwaters = highwaters
        self.reset: list[TopicPartition] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters[tp]

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self.reset.extend(partitions)


def test_reset_positions_only_beyond_high_watermark(caplog: pytest.LogCaptureFixture):
    beyond, at_end, behind, unfetched = (TopicPartition("transactions", p) for p in range(4))
    consumer = PositionedConsumer(
        positions={beyond: 77, at_end: 40, behind: 10, unfetched: 5},
        highwaters={beyond: 56, at_end: 40, behind: 30, unfetched: None},
    )
    with caplog.at_level(logging.WARNING, logger="streamer.retry"):
        returned = asyncio.run(reset_positions_beyond_end(consumer))
    assert consumer.reset == [beyond]
    assert returned == [beyond]
    assert "position=77 high_watermark=56" in caplog.text
