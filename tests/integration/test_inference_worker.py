"""The inference worker in-process against the session's broker, on real July transactions.

One module-scoped scenario announces snapshot v1, starts the worker, and replays three
chunks of July transactions. v1 scores the first chunk. v2 is announced before the
second chunk, and corrupt announcements of v3 before the third, which v2 must still score.
The tests assert on the fraud-scores and dead-letter topics and on the worker's metrics
from a fresh registry.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

import helpers
from helpers import build_model, offline_features
from exporters import Manifest, SnapshotStore, encode_announcement, export_onnx
from streamer.events import decode_transactions
from streamer.features import FEATURE_NAMES
from streamer.inference import InferenceWorker
from streamer.kafka import ensure_topics, producer_kwargs
from streamer.metrics import InferenceMetrics
from streamer.model import ScoreModule
from streamer.replay import Transaction, read_transactions, replay
from streamer.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 4
# Three chunks on three days, so that transaction ids never repeat across chunks.
CHUNKS = (("2018-07-01", 3000), ("2018-07-02", 500), ("2018-07-03", 500))
SCORE_FIELDS = {"transaction_id", "score", "model_version", "scored_at"}
# Largest difference between a score from the worker and the same snapshot run offline
# on the same features: both are onnxruntime on CPU, so only batch-dependent kernel
# order can make them differ, by a few float32 epsilons.
OFFLINE_SCORE_ATOL = 1e-6
# Seconds the scenario waits for the worker to reach an expected state before it fails.
WAIT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.1

INVALID_TRANSACTIONS = [
    (b"17", b"\xff\xfe not UTF-8"),
    (b"23", b'{"type": "label", "event_id": "lb-1", "transaction_id": 1, "event_time": 1530403231000, "label": 0}'),
]


@dataclass(frozen=True)
class Snapshot:
    """A published snapshot: its manifest, model bytes and announcement record."""

    manifest: Manifest
    onnx_bytes: bytes
    key: bytes
    value: bytes


@dataclass
class Scenario:
    """Everything the tests of this module inspect."""

    settings: Settings
    chunks: list[list[Transaction]]
    snapshots: list[Snapshot]
    registry: CollectorRegistry
    # Metric values read while the scenario ran, by the step after which they were read.
    checkpoints: dict[str, dict[str, float]]
    scores: list[ConsumerRecord]
    transactions: list[ConsumerRecord]
    dead_letters: list[ConsumerRecord]
    invalid: list[tuple[str, int, int]] = field(default_factory=list)
    started_ms: int = 0
    finished_ms: int = 0

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def decoded_scores(self) -> list[dict]:
        return [orjson.loads(record.value) for record in self.scores]

    def versions_of(self, chunk: int) -> Counter:
        ids = {row.transaction_id for row in self.chunks[chunk]}
        return Counter(s["model_version"] for s in self.decoded_scores() if s["transaction_id"] in ids)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def july(handbook_dir: Path) -> Path:
    return handbook_dir / "transactions-2018-07.csv.gz"


@pytest.fixture(scope="module")
def chunks(july: Path) -> list[list[Transaction]]:
    return [[row for _, row in zip(range(limit), read_transactions([july], start=start))] for start, limit in CHUNKS]


@pytest.fixture(scope="module")
def inference_settings(settings_factory: Callable[[str], Settings]) -> Settings:
    return settings_factory("inference-worker").replace(partitions=PARTITIONS)


@pytest.fixture(scope="module")
def scenario(inference_settings: Settings, july: Path, chunks: list[list[Transaction]]) -> Scenario:
    return asyncio.run(run_scenario(inference_settings, july, chunks))


# -- snapshots -----------------------------------------------------------------------------


def publish_snapshot(store: SnapshotStore, model: ScoreModule, probe: np.ndarray) -> Snapshot:
    result = export_onnx(model, probe)
    manifest = store.publish(result, feature_names=list(FEATURE_NAMES), source_model={"name": "untrained"},
                             offsets={}, metrics={})
    key, value = encode_announcement(manifest, result.onnx_bytes, store_path=str(store.model_path(manifest.version)))
    return Snapshot(manifest, result.onnx_bytes, key, value)


def corrupt_announcements(snapshot: Snapshot) -> list[tuple[str, bytes]]:
    """(rejection reason, announcement value) of v3 made invalid in several ways."""
    data = json.loads(snapshot.value)
    truncated = dict(data, onnx_base64=base64.b64encode(snapshot.onnx_bytes[:-16]).decode())
    flipped_bytes = bytearray(snapshot.onnx_bytes)
    flipped_bytes[len(flipped_bytes) // 2] ^= 0xFF
    flipped = dict(data, onnx_base64=base64.b64encode(bytes(flipped_bytes)).decode())
    missing_file = dict(data, onnx_base64=None, store_path=str(Path(data["store_path"]).with_name("missing.onnx")))
    # Intact bytes under a wrong digest: only the SHA-256 check can reject this one.
    wrong_digest = dict(data, manifest=dict(data["manifest"], sha256="0" * 64))
    return [
        ("invalid_snapshot", json.dumps(truncated).encode()),
        ("invalid_snapshot", json.dumps(flipped).encode()),
        ("invalid_snapshot", json.dumps(wrong_digest).encode()),
        ("invalid_snapshot", json.dumps(missing_file).encode()),
        ("invalid_announcement", b'{"manifest": {"version": 3}}'),
    ]


# -- scenario ------------------------------------------------------------------------------


async def run_scenario(settings: Settings, july: Path, chunks: list[list[Transaction]]) -> Scenario:
    """Announce v1, score chunk 0, announce v2, score chunk 1, announce corrupt v3s, score chunk 2."""
    topics = settings.topics
    await ensure_topics(settings.kafka_bootstrap, topics, PARTITIONS)
    probe = offline_features(chunks[0])[:256]
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=10)
    snapshots = [publish_snapshot(store, build_model(seed, probe), probe) for seed in (1, 2, 3)]
    registry = CollectorRegistry()
    snapshot_topic = topics.model_snapshots
    readings: dict[str, dict[str, float]] = {}
    started_ms = int(time.time() * 1000)

    # v1 is on the topic before the worker starts, as after an updater restart.
    await produce(settings, [(snapshot_topic, snapshots[0].key, snapshots[0].value)])
    worker = InferenceWorker(settings, InferenceMetrics(registry))
    await worker.start()
    try:
        invalid = await produce(settings, [(topics.transactions, k, v) for k, v in INVALID_TRANSACTIONS])
        await replay_chunk(settings, july, 0)
        await wait_for(registry, "streamer_scored_transactions_total", {}, len(chunks[0]))
        readings["chunk 0"] = read_metrics(registry, settings)

        await produce(settings, [(snapshot_topic, snapshots[1].key, snapshots[1].value)])
        await wait_for(registry, "streamer_inference_model_version", {}, 2)
        await replay_chunk(settings, july, 1)
        await wait_for(registry, "streamer_scored_transactions_total", {}, len(chunks[0]) + len(chunks[1]))
        readings["chunk 1"] = read_metrics(registry, settings)

        # One at a time: the worker considers only the newest announcement of each fetch.
        rejected = Counter()
        for reason, value in corrupt_announcements(snapshots[2]):
            await produce(settings, [(snapshot_topic, snapshots[2].key, value)])
            rejected[reason] += 1
            await wait_for(registry, "streamer_snapshots_rejected_total", {"reason": reason}, rejected[reason])
        await replay_chunk(settings, july, 2)
        await wait_for(registry, "streamer_scored_transactions_total", {}, sum(len(c) for c in chunks))
        readings["chunk 2"] = read_metrics(registry, settings)
    finally:
        await worker.stop()
    finished_ms = int(time.time() * 1000)

    return Scenario(
        settings=settings, chunks=chunks, snapshots=snapshots, registry=registry, checkpoints=readings,
        scores=await read_topic(settings, topics.fraud_scores, PARTITIONS),
        transactions=await read_topic(settings, topics.transactions, PARTITIONS),
        dead_letters=await read_topic(settings, topics.dead_letter, PARTITIONS),
        invalid=invalid, started_ms=started_ms, finished_ms=finished_ms,
    )


async def replay_chunk(settings: Settings, july: Path, chunk: int) -> None:
    start, limit = CHUNKS[chunk]
    await replay([july], bootstrap=settings.kafka_bootstrap, topics=settings.topics, start=start, limit=limit,
                 progress=None)


def read_metrics(registry: CollectorRegistry, settings: Settings) -> dict[str, float]:
    names = ("streamer_inference_model_version", "streamer_snapshots_loaded_total",
             "streamer_scored_transactions_total")
    return {name: registry.get_sample_value(name) or 0.0 for name in names}


async def produce(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> list[tuple[str, int, int]]:
    """Produce (topic, key, value) records one by one; return (topic, partition, offset) of each."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    placed = []
    try:
        for topic, key, value in records:
            metadata = await producer.send_and_wait(topic, value, key=key)
            placed.append((topic, metadata.partition, metadata.offset))
    finally:
        await producer.stop()
    return placed


async def wait_for(registry: CollectorRegistry, name: str, labels: dict[str, str], value: float) -> None:
    """Wait until a sample reaches ``value``; fail with the value seen."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while (registry.get_sample_value(name, labels) or 0.0) < value:
        if time.monotonic() > deadline:
            seen = registry.get_sample_value(name, labels)
            raise TimeoutError(f"{name}{labels} stayed at {seen} for {WAIT_TIMEOUT_SECONDS:.0f} s, expected {value}")
        await asyncio.sleep(POLL_SECONDS)


async def read_topic(settings: Settings, topic: str, partitions: int) -> list[ConsumerRecord]:
    return await helpers.read_topic(settings, topic, partitions, WAIT_TIMEOUT_SECONDS)


def offline_scores(snapshot: Snapshot, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(snapshot.onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: features})[0].reshape(-1)


# -- scores ----------------------------------------------------------------------------------


def test_every_transaction_scored_once(scenario: Scenario):
    counts = Counter(s["transaction_id"] for s in scenario.decoded_scores())
    expected = Counter(row.transaction_id for chunk in scenario.chunks for row in chunk)
    assert counts == expected


def test_scores_have_documented_fields(scenario: Scenario):
    field_sets = {frozenset(s) for s in scenario.decoded_scores()}
    assert field_sets == {frozenset(SCORE_FIELDS)}


def test_scores_are_probabilities(scenario: Scenario):
    scores = np.array([s["score"] for s in scenario.decoded_scores()])
    assert scores.min() >= 0
    assert scores.max() <= 1


def test_scores_vary_between_transactions(scenario: Scenario):
    assert len({s["score"] for s in scenario.decoded_scores()}) > 100


def test_scored_at_is_wall_clock_milliseconds(scenario: Scenario):
    times = [s["scored_at"] for s in scenario.decoded_scores()]
    assert min(times) >= scenario.started_ms
    assert max(times) <= scenario.finished_ms


def test_scores_keyed_and_placed_like_transactions(scenario: Scenario):
    placement = {}
    for record in scenario.transactions:
        decoded = decode_transactions([record.value])
        if len(decoded):
            placement[int(decoded.transaction_id[0])] = (record.partition, record.key)
    misplaced = [
        record.offset for record in scenario.scores
        if placement[orjson.loads(record.value)["transaction_id"]] != (record.partition, record.key)
    ]
    assert misplaced == []


def test_first_chunk_scored_by_version_1(scenario: Scenario):
    assert scenario.versions_of(0) == Counter({1: len(scenario.chunks[0])})


def test_first_chunk_scores_equal_offline_scoring(scenario: Scenario):
    by_id = {s["transaction_id"]: s["score"] for s in scenario.decoded_scores()}
    rows = scenario.chunks[0]
    served = np.array([by_id[row.transaction_id] for row in rows])
    expected = offline_scores(scenario.snapshots[0], offline_features(rows))
    assert np.max(np.abs(served - expected)) <= OFFLINE_SCORE_ATOL


def test_scored_metric_counts_scores(scenario: Scenario):
    assert scenario.sample("streamer_scored_transactions_total") == len(scenario.scores)


def test_latency_observed_per_batch(scenario: Scenario):
    assert scenario.sample("streamer_inference_latency_seconds_count") >= 1


def test_consumed_metric_counts_transactions(scenario: Scenario):
    topic = scenario.settings.topics.transactions
    expected = sum(len(c) for c in scenario.chunks) + len(INVALID_TRANSACTIONS)
    assert scenario.sample("streamer_events_consumed_total", {"topic": topic}) == expected



def test_consumer_lag_set_per_partition(scenario: Scenario):
    topic = scenario.settings.topics.transactions
    # The registry, not sample(), which would read a missing series as 0.
    lags = [scenario.registry.get_sample_value("streamer_consumer_lag", {"topic": topic, "partition": str(p)})
            for p in range(PARTITIONS)]
    assert lags == [0] * PARTITIONS

# -- snapshot swaps --------------------------------------------------------------------------


def test_worker_serves_version_1_first(scenario: Scenario):
    assert scenario.checkpoints["chunk 0"]["streamer_inference_model_version"] == 1


def test_worker_switches_to_version_2(scenario: Scenario):
    assert scenario.checkpoints["chunk 1"]["streamer_inference_model_version"] == 2


def test_second_chunk_scored_by_version_2(scenario: Scenario):
    assert scenario.versions_of(1) == Counter({2: len(scenario.chunks[1])})


def test_update_to_serving_delay_observed_per_swap(scenario: Scenario):
    assert scenario.sample("streamer_update_to_serving_delay_seconds_count") == 2


def test_snapshots_loaded_counts_swaps(scenario: Scenario):
    assert scenario.sample("streamer_snapshots_loaded_total") == 2


# -- corrupt snapshots -----------------------------------------------------------------------


def test_corrupt_snapshots_rejected(scenario: Scenario):
    expected = sum(1 for reason, _ in corrupt_announcements(scenario.snapshots[2]) if reason == "invalid_snapshot")
    assert scenario.sample("streamer_snapshots_rejected_total", {"reason": "invalid_snapshot"}) == expected


def test_invalid_announcement_rejected(scenario: Scenario):
    assert scenario.sample("streamer_snapshots_rejected_total", {"reason": "invalid_announcement"}) == 1


def test_version_2_keeps_serving_after_rejections(scenario: Scenario):
    assert scenario.checkpoints["chunk 2"]["streamer_inference_model_version"] == 2


def test_third_chunk_scored_by_version_2(scenario: Scenario):
    assert scenario.versions_of(2) == Counter({2: len(scenario.chunks[2])})


def test_rejections_load_no_snapshot(scenario: Scenario):
    assert scenario.checkpoints["chunk 2"]["streamer_snapshots_loaded_total"] == 2


# -- invalid transactions --------------------------------------------------------------------


def test_invalid_transactions_dead_lettered(scenario: Scenario):
    origins = sorted(
        (
            dict(r.headers)["streamer.source.topic"].decode(),
            int(dict(r.headers)["streamer.source.partition"]),
            int(dict(r.headers)["streamer.source.offset"]),
        )
        for r in scenario.dead_letters
    )
    assert origins == sorted(scenario.invalid)


def test_dead_letters_keep_original_bytes(scenario: Scenario):
    assert sorted(r.value for r in scenario.dead_letters) == sorted(v for _, v in INVALID_TRANSACTIONS)


def test_dead_letters_name_the_inference_worker(scenario: Scenario):
    assert {dict(r.headers)["streamer.worker"] for r in scenario.dead_letters} == {b"inference"}


def test_invalid_transactions_counted(scenario: Scenario):
    topic = scenario.settings.topics.transactions
    assert scenario.sample("streamer_invalid_events_total", {"topic": topic}) == len(INVALID_TRANSACTIONS)

