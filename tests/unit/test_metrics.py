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
