"""Replay of real handbook transactions into Kafka, read back with aiokafka."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer.events import decode_labels, decode_transactions
from streamer.kafka import consumer_kwargs, ensure_topics
from streamer.replay import DAY_MS, ReplayStats, read_transactions, replay
from streamer.settings import Settings

pytestmark = pytest.mark.integration

LIMIT = 3000
PARTITIONS = 4
# Seconds to wait for the expected records when reading them back.
READ_TIMEOUT_SECONDS = 30.0
# Unix ms of 2020-01-01: record timestamps from the producer clock are later than this.
YEAR_2020_MS = 1_577_836_800_000


@dataclass
class Topic:
    """Records of one topic as read back: per partition, in offset order."""

    keys: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    values: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    timestamps: list[int] = field(default_factory=list)

    def all_values(self) -> list[bytes]:
        return [v for partition in sorted(self.values) for v in self.values[partition]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.values.values())


async def read_back(settings: Settings, expected: dict[str, int]) -> dict[str, Topic]:
    """Read every partition of the given topics from the beginning until ``expected`` counts arrive."""
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=None))
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in expected for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        topics = {name: Topic() for name in expected}
        deadline = time.monotonic() + READ_TIMEOUT_SECONDS
        while any(len(topics[t]) < n for t, n in expected.items()) and time.monotonic() < deadline:
            _collect(topics, await consumer.getmany(timeout_ms=500))
        _collect(topics, await consumer.getmany(timeout_ms=500))  # anything beyond the expected count
        return topics
    finally:
        await consumer.stop()


def _collect(topics: dict[str, Topic], batches) -> None:
    for tp, records in batches.items():
        topic = topics[tp.topic]
        for record in records:
            topic.keys[tp.partition].append(record.key)
            topic.values[tp.partition].append(record.value)
            topic.timestamps.append(record.timestamp)


@pytest.fixture(scope="module")
def july_file(handbook_dir):
    return handbook_dir / "transactions-2018-07.csv.gz"


@pytest.fixture(scope="module")
def replayed_settings(settings_factory) -> Settings:
    return settings_factory("replay")


@pytest.fixture(scope="module")
def replayed(replayed_settings: Settings, july_file) -> tuple[ReplayStats, dict[str, Topic]]:
    """Replay LIMIT July transactions into fresh topics and read both topics back, once per module."""
    bootstrap, topics = replayed_settings.kafka_bootstrap, replayed_settings.topics

    async def scenario():
        await ensure_topics(bootstrap, topics, PARTITIONS)
        stats = await replay([july_file], bootstrap=bootstrap, topics=topics, limit=LIMIT, progress=None)
        records = await read_back(replayed_settings, {topics.transactions: LIMIT, topics.labels: LIMIT})
        return stats, records

    return asyncio.run(scenario())


def test_replay_stats_count_transactions(replayed):
    stats, _ = replayed
    assert stats.transactions == LIMIT


def test_replay_stats_count_labels(replayed):
    stats, _ = replayed
    assert stats.labels == LIMIT


def test_replay_transactions_all_arrive(replayed, replayed_settings):
    _, records = replayed
    assert len(records[replayed_settings.topics.transactions]) == LIMIT


def test_replay_labels_all_arrive(replayed, replayed_settings):
    _, records = replayed
    assert len(records[replayed_settings.topics.labels]) == LIMIT


def test_replay_events_decode_without_rejects(replayed, replayed_settings):
    _, records = replayed
    transactions = decode_transactions(records[replayed_settings.topics.transactions].all_values())
    labels = decode_labels(records[replayed_settings.topics.labels].all_values())
    assert transactions.rejected == []
    assert labels.rejected == []


def test_replay_transactions_equal_csv_rows(replayed, replayed_settings, july_file):
    _, records = replayed
    decoded = decode_transactions(records[replayed_settings.topics.transactions].all_values())
    produced = sorted(zip(decoded.transaction_id.tolist(), decoded.event_time_ms.tolist(),
                          decoded.customer_id.tolist(), decoded.terminal_id.tolist(), decoded.amount.tolist()))
    rows = [tx for _, tx in zip(range(LIMIT), read_transactions([july_file]))]
    expected = sorted((tx.transaction_id, tx.event_time_ms, tx.customer_id, tx.terminal_id, tx.amount) for tx in rows)
    assert produced == expected


def test_replay_every_transaction_has_one_label(replayed, replayed_settings):
    _, records = replayed
    transactions = decode_transactions(records[replayed_settings.topics.transactions].all_values())
    labels = decode_labels(records[replayed_settings.topics.labels].all_values())
    label_counts = Counter(labels.transaction_id.tolist())
    assert set(label_counts) == set(transactions.transaction_id.tolist())
    assert set(label_counts.values()) == {1}


def test_replay_label_time_is_transaction_time_plus_delay(replayed, replayed_settings):
    _, records = replayed
    transactions = decode_transactions(records[replayed_settings.topics.transactions].all_values())
    labels = decode_labels(records[replayed_settings.topics.labels].all_values())
    tx_time = dict(zip(transactions.transaction_id.tolist(), transactions.event_time_ms.tolist()))
    wrong = [
        (tx_id, label_time)
        for tx_id, label_time in zip(labels.transaction_id.tolist(), labels.event_time_ms.tolist())
        if label_time != tx_time[tx_id] + 7 * DAY_MS
    ]
    assert wrong == []


def test_replay_labels_equal_csv_fraud_flags(replayed, replayed_settings, july_file):
    _, records = replayed
    labels = decode_labels(records[replayed_settings.topics.labels].all_values())
    expected = {tx.transaction_id: tx.fraud for _, tx in zip(range(LIMIT), read_transactions([july_file]))}
    assert dict(zip(labels.transaction_id.tolist(), labels.label.tolist())) == expected


def test_replay_transaction_keys_are_customer_ids(replayed, replayed_settings):
    _, records = replayed
    topic = records[replayed_settings.topics.transactions]
    for partition, values in topic.values.items():
        decoded = decode_transactions(values)
        expected = [b"%d" % customer for customer in decoded.customer_id.tolist()]
        assert topic.keys[partition] == expected


def test_replay_label_shares_partition_and_key_with_transaction(replayed, replayed_settings):
    _, records = replayed
    placement = {}
    transactions = records[replayed_settings.topics.transactions]
    for partition, values in transactions.values.items():
        ids = decode_transactions(values).transaction_id.tolist()
        placement.update({tx_id: (partition, key) for tx_id, key in zip(ids, transactions.keys[partition])})
    labels = records[replayed_settings.topics.labels]
    misplaced = []
    for partition, values in labels.values.items():
        ids = decode_labels(values).transaction_id.tolist()
        misplaced += [tx_id for tx_id, key in zip(ids, labels.keys[partition]) if placement[tx_id] != (partition, key)]
    assert misplaced == []


def test_replay_partitions_are_in_event_time_order(replayed, replayed_settings):
    _, records = replayed
    for name, decode in ((replayed_settings.topics.transactions, decode_transactions),
                         (replayed_settings.topics.labels, decode_labels)):
        for partition, values in records[name].values.items():
            times = decode(values).event_time_ms.tolist()
            assert times == sorted(times), f"{name} partition {partition}"


def test_replay_record_timestamps_use_producer_clock(replayed, replayed_settings):
    _, records = replayed
    timestamps = records[replayed_settings.topics.transactions].timestamps
    assert min(timestamps) > YEAR_2020_MS


def test_replay_speedup_paces_event_time(kafka_settings, july_file):
    # 20 transactions span several minutes of event time; with a speedup of 2000 the
    # replay must take at least span / 2000 seconds. Only this lower bound is checked.
    speedup = 2000.0
    rows = [tx for _, tx in zip(range(20), read_transactions([july_file]))]
    span_seconds = (rows[-1].event_time_ms - rows[0].event_time_ms) / 1000

    async def scenario():
        await ensure_topics(kafka_settings.kafka_bootstrap, kafka_settings.topics, PARTITIONS)
        return await replay([july_file], bootstrap=kafka_settings.kafka_bootstrap, topics=kafka_settings.topics,
                            limit=20, label_delay_days=0.0, speedup=speedup, progress=None)

    stats = asyncio.run(scenario())
    assert stats.seconds >= 0.9 * span_seconds / speedup
    assert stats.labels == 20
