"""The metrics objects of the workers, on a fresh registry per test."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamer.metrics import IngestMetrics, UpdaterMetrics


def lag_sample(registry: CollectorRegistry, topic: str, partition: int) -> float | None:
    return registry.get_sample_value("streamer_consumer_lag", {"topic": topic, "partition": str(partition)})


def test_set_consumer_lag_sets_each_partition():
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)

    metrics.set_consumer_lag({TopicPartition("transactions", 0): 12, TopicPartition("labels", 3): 0})

    assert lag_sample(registry, "transactions", 0) == 12
    assert lag_sample(registry, "labels", 3) == 0


def test_set_consumer_lag_drops_revoked_partition():
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    metrics.set_consumer_lag({TopicPartition("transactions", 0): 12, TopicPartition("transactions", 1): 5})

    metrics.set_consumer_lag({TopicPartition("transactions", 1): 2})

    assert lag_sample(registry, "transactions", 0) is None
    assert lag_sample(registry, "transactions", 1) == 2


@pytest.mark.parametrize("outcome", ["applied", "skipped_nonfinite"])
def test_microbatch_outcomes_exported_at_zero(outcome):
    registry = CollectorRegistry()
    UpdaterMetrics(registry)

    assert registry.get_sample_value("streamer_microbatches_total", {"outcome": outcome}) == 0


@pytest.mark.parametrize("operation", ["produce", "commit"])
def test_broker_errors_exported_at_zero(operation):
    registry = CollectorRegistry()
    IngestMetrics(registry)

    assert registry.get_sample_value("streamer_broker_errors_total", {"operation": operation}) == 0


def test_updater_announce_errors_exported_at_zero():
    registry = CollectorRegistry()
    UpdaterMetrics(registry)

    assert registry.get_sample_value("streamer_broker_errors_total", {"operation": "announce"}) == 0


@pytest.mark.parametrize("policy", ["genuine", "drop"])
def test_labels_expired_exported_at_zero(policy):
    registry = CollectorRegistry()
    UpdaterMetrics(registry)

    assert registry.get_sample_value("streamer_labels_expired_total", {"policy": policy}) == 0


def test_count_consumed_exports_invalid_events_at_zero():
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)

    metrics.count_consumed({TopicPartition("transactions", 0): [object(), object()]})

    assert registry.get_sample_value("streamer_invalid_events_total", {"topic": "transactions"}) == 0


def test_count_consumed_keeps_invalid_count():
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    metrics.invalid_events.labels("transactions").inc(3)

    metrics.count_consumed({TopicPartition("transactions", 0): [object()]})

    assert registry.get_sample_value("streamer_invalid_events_total", {"topic": "transactions"}) == 3
