"""Topic creation, end offsets and consumer lag against the session's broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import CollectorRegistry

from streamer.kafka import consumer_kwargs, consumer_lag, end_offsets, ensure_topics, producer_kwargs
from streamer.metrics import IngestMetrics
from streamer.settings import Settings

pytestmark = pytest.mark.integration

RECORDS = 1000


async def describe(bootstrap: str, names: list[str]) -> dict[str, int]:
    """Return the partition count of each topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def cleanup_policy(bootstrap: str, name: str) -> str | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    finally:
        await admin.close()
    for response in responses:
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == "cleanup.policy":
                    return entry["config_value"]
    return None


async def produce(settings: Settings, topic: str, partition: int, count: int) -> None:
    """Produce ``count`` records with the default producer settings, which batch many records."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        futures = [await producer.send(topic, b"record-%d" % i, partition=partition) for i in range(count)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_ensure_topics_creates_partitions(kafka_settings):
    topics = kafka_settings.topics

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, topics, 3)
        return await describe(kafka_settings.kafka_bootstrap, [
            topics.transactions, topics.labels, topics.dead_letter, topics.fraud_scores, topics.model_snapshots,
        ])

    partitions = asyncio.run(scenario())
    assert partitions == {
        topics.transactions: 3, topics.labels: 3, topics.dead_letter: 3, topics.fraud_scores: 3,
        topics.model_snapshots: 1,
    }


def test_ensure_topics_compacts_model_snapshots(kafka_settings):
    topics = kafka_settings.topics

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, topics, 2)
        return await cleanup_policy(kafka_settings.kafka_bootstrap, topics.model_snapshots)

    assert asyncio.run(scenario()) == "compact"


def test_ensure_topics_twice_keeps_existing(kafka_settings, caplog):
    topics = kafka_settings.topics

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, topics, 2)
        await ensure_topics(kafka_settings.kafka_bootstrap, topics, 5)
        return await describe(kafka_settings.kafka_bootstrap, [topics.transactions])

    with caplog.at_level("WARNING", logger="streamer.kafka"):
        partitions = asyncio.run(scenario())
    assert partitions == {topics.transactions: 2}
    assert "topic exists with other partitions" in caplog.text


def test_end_offsets_after_batched_produce(kafka_settings):
    topic = kafka_settings.topics.transactions
    tp = TopicPartition(topic, 1)

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, kafka_settings.topics, 2)
        await produce(kafka_settings, topic, 1, RECORDS)
        return await end_offsets(kafka_settings, [tp, TopicPartition(topic, 0)])

    offsets = asyncio.run(scenario())
    assert offsets == {tp: RECORDS, TopicPartition(topic, 0): 0}


def test_consumer_lag_counts_unread_records(kafka_settings):
    topic = kafka_settings.topics.transactions
    tp = TopicPartition(topic, 0)

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, kafka_settings.topics, 1)
        await produce(kafka_settings, topic, 0, RECORDS)
        consumer = AIOKafkaConsumer(**consumer_kwargs(kafka_settings, group_id=None))
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            read = 0
            while read < 100:
                batches = await consumer.getmany(timeout_ms=1000, max_records=100 - read)
                read += sum(len(records) for records in batches.values())
            return await consumer_lag(consumer)
        finally:
            await consumer.stop()

    assert asyncio.run(scenario()) == {tp: RECORDS - 100}


def test_consumer_lag_metric_follows_reads(kafka_settings):
    topic = kafka_settings.topics.transactions
    tp = TopicPartition(topic, 0)
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    labels = {"topic": topic, "partition": "0"}

    async def read_until(consumer, target: int, read: int) -> int:
        while read < target:
            batches = await consumer.getmany(timeout_ms=1000, max_records=target - read)
            read += sum(len(records) for records in batches.values())
            metrics.set_consumer_lag(await consumer_lag(consumer))
        return read

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, kafka_settings.topics, 1)
        await produce(kafka_settings, topic, 0, RECORDS)
        consumer = AIOKafkaConsumer(**consumer_kwargs(kafka_settings, group_id=None))
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            read = await read_until(consumer, 100, 0)
            behind = registry.get_sample_value("streamer_consumer_lag", labels)
            await read_until(consumer, RECORDS, read)
            caught_up = registry.get_sample_value("streamer_consumer_lag", labels)
            return behind, caught_up
        finally:
            await consumer.stop()

    behind, caught_up = asyncio.run(scenario())
    assert behind == RECORDS - 100
    assert caught_up == 0
