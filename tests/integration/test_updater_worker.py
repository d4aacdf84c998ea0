"""The updater worker in-process against the session's broker, on real July transactions.

One module-scoped scenario runs the updater twice on the same data folder and consumer
group. The first run consumes invalid events and a replay of July transactions. It holds
back the labels that the transactions' event time has not reached yet and the last
partial micro-batch, so that its final checkpoint carries both. The second run resumes
from that checkpoint, consumes a later replay, a repeated label and a contradicting one,
and releases everything. The tests assert on what the scenario recorded: metrics from a
fresh registry per run, the snapshot store, the model-snapshots and dead-letter topics,
the checkpoints and the committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

import helpers
from exporters import Announcement, SnapshotStore, decode_announcement, resolve_snapshot_bytes
from streamer.checkpoint import CheckpointData, CheckpointStore
from streamer.errors import CheckpointError
from streamer.events import label_event, transaction_event
from streamer.kafka import consumer_kwargs, ensure_topics, producer_kwargs
from streamer.metrics import UpdaterMetrics
from streamer.model import load_feature_state, load_model_checkpoint
from streamer.pipeline import UpdaterPipeline
from streamer.replay import DAY_MS, Transaction, read_transactions, replay
from streamer.settings import Settings
from streamer.updater import Updater

pytestmark = pytest.mark.integration

PARTITIONS = 4
MICROBATCH_SIZE = 64
FIRST_RUN_START = "2018-07-01"
FIRST_RUN_TRANSACTIONS = 2000
# The second run replays a later day, so its transaction ids differ from the first run's.
SECOND_RUN_START = "2018-07-02"
SECOND_RUN_TRANSACTIONS = 1000
# 2.4 hours: the first run's 2,000 transactions span about 5 hours of event time, so
# about half of their labels fall inside that span and the rest after it.
LABEL_DELAY_DAYS = 0.1
# Seconds that never pass during a run: the first run holds back labels beyond the
# watermark and the last partial micro-batch until it stops.
HOLD_BACK_SECONDS = 3600.0
# Seconds the scenario waits for the updater to reach an expected state before it fails.
WAIT_TIMEOUT_SECONDS = 90.0
# Seconds between two reads of the metrics, and between two samples of the commits.
POLL_SECONDS = 0.2

# Keys are customer ids, like the replay's. Each value fails validation for another reason.
INVALID_TRANSACTIONS = [
    (b"17", b"{not json"),
    (b"23", b'{"type": "transaction", "transaction_id": 5, "unexpected": true}'),
    (b"42", b'{"type": "transaction", "event_id": "tx-9", "transaction_id": 9, "event_time": 1530403231000, '
            b'"customer_id": 42, "terminal_id": 7, "amount": -3.5}'),
]
INVALID_LABELS = [
    (b"17", b"[1, 2, 3]"),
    (b"23", b'{"type": "label", "event_id": "lb-5", "transaction_id": 5, "event_time": 1531008031000, '
            b'"label": 2}'),
]
INVALID_EVENTS = len(INVALID_TRANSACTIONS) + len(INVALID_LABELS)


@dataclass(frozen=True)
class Expected:
    """Counts that follow from the replayed CSV rows and the settings."""

    released_in_first_run: int  # labels whose event time the first run's watermark reached
    watermark_ms: int  # newest transaction time of the first run

    @property
    def trained_in_first_run(self) -> int:
        return self.released_in_first_run - self.buffered_at_first_stop

    @property
    def buffered_at_first_stop(self) -> int:
        return self.released_in_first_run % MICROBATCH_SIZE

    @property
    def gated_at_first_stop(self) -> int:
        return FIRST_RUN_TRANSACTIONS - self.released_in_first_run


@dataclass
class ProducedRecord:
    """A record produced by the scenario itself: where it landed, and its bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


@dataclass
class RunResult:
    """What one updater run recorded after it stopped."""

    registry: CollectorRegistry
    counters: dict[str, int]
    checkpoint: CheckpointData
    committed: dict[TopicPartition, int | None]
    exported_versions: list[int]
    start_offsets: dict[str, dict[int, int]]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Return a sample of this run's registry; 0 for a labelled series that never moved."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@dataclass
class Scenario:
    """Everything the tests of this module inspect."""

    settings: Settings
    expected: Expected
    invalid: list[ProducedRecord]
    repeated_label: ProducedRecord
    contradicting_label: ProducedRecord
    first: RunResult
    second: RunResult
    # (committed offset, offset of the newest checkpoint read after it) during the first run.
    commit_samples: list[tuple[TopicPartition, int, int | None]] = field(default_factory=list)
    announcements: list[Announcement] = field(default_factory=list)
    dead_letters: list[ConsumerRecord] = field(default_factory=list)
    record_counts: dict[str, int] = field(default_factory=dict)

    def dead_letter_for(self, produced: ProducedRecord) -> ConsumerRecord:
        origin = (produced.topic, produced.partition, produced.offset)
        matches = [r for r in self.dead_letters if dead_letter_origin(r) == origin]
        assert len(matches) == 1, f"dead letters for {origin}: {len(matches)}"
        return matches[0]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def updater_settings(settings_factory: Callable[[str], Settings], source_path: Path) -> Settings:
    return settings_factory("updater-worker").replace(
        partitions=PARTITIONS,
        source_checkpoint=source_path,
        microbatch_size=MICROBATCH_SIZE,
        microbatch_max_age_seconds=0.5,
        label_release_idle_seconds=0.5,
        checkpoint_interval_seconds=1.0,
        export_every_batches=10,
        export_interval_seconds=1.0,
        # Every version stays in the store, so that each announcement can be checked against its file.
        snapshot_retention=1000,
    )


@pytest.fixture(scope="module")
def scenario(updater_settings: Settings, handbook_dir: Path) -> Scenario:
    return asyncio.run(run_scenario(updater_settings, handbook_dir / "transactions-2018-07.csv.gz"))


# -- scenario ------------------------------------------------------------------------------


def first_run_rows(july: Path) -> list[Transaction]:
    rows = read_transactions([july], start=FIRST_RUN_START)
    return [row for _, row in zip(range(FIRST_RUN_TRANSACTIONS), rows)]


def expected_counts(rows: list[Transaction]) -> Expected:
    watermark = max(row.event_time_ms for row in rows)
    delay_ms = int(LABEL_DELAY_DAYS * DAY_MS)
    released = sum(1 for row in rows if row.event_time_ms + delay_ms <= watermark)
    return Expected(released_in_first_run=released, watermark_ms=watermark)


async def run_scenario(settings: Settings, july: Path) -> Scenario:
    """Run the updater twice on the same data folder; see the module docstring."""
    topics = settings.topics
    rows = first_run_rows(july)
    expected = expected_counts(rows)
    await ensure_topics(settings.kafka_bootstrap, topics, PARTITIONS)

    # Run 1: invalid events first, then valid ones behind them on the same partitions.
    held_back = settings.replace(label_release_idle_seconds=HOLD_BACK_SECONDS,
                                 microbatch_max_age_seconds=HOLD_BACK_SECONDS)
    first, first_registry = new_updater(held_back)
    samples: list[tuple[TopicPartition, int, int | None]] = []
    await first.start()
    sampler = asyncio.create_task(sample_commits(settings, samples))
    try:
        invalid = await produce(settings, [(topics.transactions, k, v) for k, v in INVALID_TRANSACTIONS]
                                + [(topics.labels, k, v) for k, v in INVALID_LABELS])
        await replay([july], bootstrap=settings.kafka_bootstrap, topics=topics, start=FIRST_RUN_START,
                     limit=FIRST_RUN_TRANSACTIONS, label_delay_days=LABEL_DELAY_DAYS, progress=None)
        await wait_for_counts(first_registry, {
            ("streamer_events_consumed_total", topics.transactions): FIRST_RUN_TRANSACTIONS + len(INVALID_TRANSACTIONS),
            ("streamer_events_consumed_total", topics.labels): FIRST_RUN_TRANSACTIONS + len(INVALID_LABELS),
            ("streamer_labels_joined_total", None): expected.released_in_first_run,
            ("streamer_examples_trained_total", None): expected.trained_in_first_run,
            ("streamer_invalid_events_total", topics.transactions): len(INVALID_TRANSACTIONS),
            ("streamer_invalid_events_total", topics.labels): len(INVALID_LABELS),
        })
        # A few more checkpoint intervals, so that the sampler reads commits of the final offsets.
        await asyncio.sleep(3 * settings.checkpoint_interval_seconds)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await first.stop()
    first_result = await collect_run(settings, first, first_registry)

    # Run 2: a new updater on the same data folder and consumer group releases everything.
    second, second_registry = new_updater(settings)
    await second.start()
    second_start_offsets = {t: dict(p) for t, p in second.pipeline.offsets.items()}
    first_label = label_event(rows[0].transaction_id, rows[0].event_time_ms + int(LABEL_DELAY_DAYS * DAY_MS),
                              rows[0].fraud)
    contradicting = dict(first_label, label=1 - rows[0].fraud)
    key = b"%d" % rows[0].customer_id
    try:
        await replay([july], bootstrap=settings.kafka_bootstrap, topics=topics, start=SECOND_RUN_START,
                     limit=SECOND_RUN_TRANSACTIONS, label_delay_days=LABEL_DELAY_DAYS, progress=None)
        repeated_label, contradicting_label = await produce(settings, [
            (topics.labels, key, orjson.dumps(first_label)),
            (topics.labels, key, orjson.dumps(contradicting)),
        ])
        total = FIRST_RUN_TRANSACTIONS + SECOND_RUN_TRANSACTIONS
        await wait_for_counts(second_registry, {
            ("streamer_events_consumed_total", topics.transactions): SECOND_RUN_TRANSACTIONS,
            ("streamer_events_consumed_total", topics.labels): SECOND_RUN_TRANSACTIONS + 2,
            ("streamer_labels_joined_total", None): total - expected.released_in_first_run,
            ("streamer_examples_trained_total", None): total - expected.trained_in_first_run,
            ("streamer_invalid_events_total", topics.labels): 1,
            ("streamer_labels_rejected_total", "duplicate"): 1,
        })
    finally:
        await second.stop()
    second_result = await collect_run(settings, second, second_registry, second_start_offsets)

    snapshot_records = await read_topic(settings, topics.model_snapshots, 1)
    counts = {
        topic: len(await read_topic(settings, topic, PARTITIONS)) for topic in (topics.transactions, topics.labels)
    }
    return Scenario(
        settings=settings, expected=expected, invalid=invalid, repeated_label=repeated_label,
        contradicting_label=contradicting_label, first=first_result, second=second_result, commit_samples=samples,
        announcements=[decode_announcement(r.value, key=r.key) for r in snapshot_records],
        dead_letters=await read_topic(settings, topics.dead_letter, PARTITIONS), record_counts=counts,
    )


def new_updater(settings: Settings) -> tuple[Updater, CollectorRegistry]:
    """Build an updater as `streamer update` does, with a fresh metrics registry."""
    source = load_model_checkpoint(settings.source_checkpoint)
    features = load_feature_state(settings.source_checkpoint, source)
    registry = CollectorRegistry()
    return Updater(settings, source, UpdaterMetrics(registry), features), registry


async def produce(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> list[ProducedRecord]:
    """Produce (topic, key, value) records one by one; return where each landed."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    produced = []
    try:
        for topic, key, value in records:
            metadata = await producer.send_and_wait(topic, value, key=key)
            produced.append(ProducedRecord(topic, metadata.partition, metadata.offset, key, value))
    finally:
        await producer.stop()
    return produced


def registry_sample(registry: CollectorRegistry, name: str, label: str | None) -> float:
    """Return a sample; ``label`` is the value of the metric's one label, None for an unlabelled metric."""
    if label is None:
        labels = {}
    else:
        labels = {"reason": label} if name == "streamer_labels_rejected_total" else {"topic": label}
    return registry.get_sample_value(name, labels) or 0.0


async def wait_for_counts(registry: CollectorRegistry, expected: dict[tuple[str, str | None], int]) -> None:
    """Wait until each (metric, label value) reaches its count; fail with the counts seen so far."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while True:
        seen = {key: registry_sample(registry, *key) for key in expected}
        if all(seen[key] >= count for key, count in expected.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"updater did not reach {expected} within {WAIT_TIMEOUT_SECONDS:.0f} s: {seen}")
        await asyncio.sleep(POLL_SECONDS)


async def sample_commits(settings: Settings, samples: list[tuple[TopicPartition, int, int | None]]) -> None:
    """Until cancelled: read the committed offsets, then the newest checkpoint, and record both.

    The checkpoint is read after the commits, so a commit beyond the checkpoint's offset
    can only mean that the updater committed an offset before its checkpoint was durable.
    """
    store = CheckpointStore(settings.checkpoint_dir)
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=f"{settings.consumer_group_prefix}-updater"))
    await consumer.start()
    try:
        while True:
            committed = {tp: await consumer.committed(tp) for tp in input_partitions(settings)}
            try:
                checkpoint = store.load_latest()
            except CheckpointError:
                checkpoint = None  # pruned between reading LATEST and its folder; the next sample reads again
            if checkpoint is not None:
                samples += [
                    (tp, offset, checkpoint.offsets.get(tp.topic, {}).get(tp.partition))
                    for tp, offset in committed.items()
                    if offset is not None
                ]
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await consumer.stop()


def input_partitions(settings: Settings) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in (settings.topics.transactions, settings.topics.labels)
            for p in range(PARTITIONS)]


async def collect_run(
    settings: Settings, updater: Updater, registry: CollectorRegistry,
    start_offsets: dict[str, dict[int, int]] | None = None,
) -> RunResult:
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, settings.snapshot_retention)
    return RunResult(
        registry=registry, counters=dict(updater.pipeline.counters),
        checkpoint=CheckpointStore(settings.checkpoint_dir).load_latest(),
        committed=await committed_offsets(settings, input_partitions(settings)),
        exported_versions=store.versions(), start_offsets=start_offsets or {},
    )


async def committed_offsets(settings: Settings, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    """Read the updater group's committed offsets, one explicit partition at a time.

    A consumer of the same group that never subscribes does not join the group, so it
    takes no partition from a running updater.
    """
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=f"{settings.consumer_group_prefix}-updater"))
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


async def read_topic(settings: Settings, topic: str, partitions: int) -> list[ConsumerRecord]:
    return await helpers.read_topic(settings, topic, partitions, WAIT_TIMEOUT_SECONDS)


def dead_letter_origin(record: ConsumerRecord) -> tuple[str, int, int]:
    headers = dict(record.headers)
    return (
        headers["streamer.source.topic"].decode(),
        int(headers["streamer.source.partition"]),
        int(headers["streamer.source.offset"]),
    )


def header(record: ConsumerRecord, name: str) -> str:
    return dict(record.headers)[name].decode()


def offset_pairs(result: RunResult) -> list[tuple[TopicPartition, int, int | None]]:
    """(partition, committed offset, checkpoint offset) for every partition with a commit."""
    return [
        (tp, offset, result.checkpoint.offsets.get(tp.topic, {}).get(tp.partition))
        for tp, offset in result.committed.items()
        if offset is not None
    ]


# -- first run: consume, join, train --------------------------------------------------------


def test_updater_consumes_every_transaction(scenario: Scenario):
    topic = scenario.settings.topics.transactions
    consumed = scenario.first.sample("streamer_events_consumed_total", {"topic": topic})
    assert consumed == FIRST_RUN_TRANSACTIONS + len(INVALID_TRANSACTIONS)


def test_updater_consumes_every_label(scenario: Scenario):
    topic = scenario.settings.topics.labels
    consumed = scenario.first.sample("streamer_events_consumed_total", {"topic": topic})
    assert consumed == FIRST_RUN_TRANSACTIONS + len(INVALID_LABELS)


def test_updater_joins_labels_up_to_watermark(scenario: Scenario):
    joined = scenario.first.sample("streamer_labels_joined_total")
    assert joined == scenario.expected.released_in_first_run


def test_updater_holds_labels_beyond_watermark(scenario: Scenario):
    # Each held-back label keeps its transaction waiting in the join.
    assert scenario.first.sample("streamer_pending_labels") == scenario.expected.gated_at_first_stop


def test_updater_rejects_no_replayed_label(scenario: Scenario):
    rejected = [
        scenario.first.sample("streamer_labels_rejected_total", {"reason": reason})
        for reason in ("duplicate", "conflicting", "orphan")
    ]
    assert rejected == [0.0, 0.0, 0.0]


def test_updater_trains_full_microbatches(scenario: Scenario):
    trained = scenario.first.sample("streamer_examples_trained_total")
    assert trained == scenario.expected.trained_in_first_run


def test_updater_counts_applied_microbatches(scenario: Scenario):
    applied = scenario.first.sample("streamer_microbatches_total", {"outcome": "applied"})
    assert applied == scenario.expected.trained_in_first_run // MICROBATCH_SIZE


def test_updater_skips_no_microbatch(scenario: Scenario):
    assert scenario.first.sample("streamer_microbatches_total", {"outcome": "skipped_nonfinite"}) == 0


def test_updater_times_each_microbatch(scenario: Scenario):
    applied = scenario.first.sample("streamer_microbatches_total", {"outcome": "applied"})
    assert scenario.first.sample("streamer_microbatch_duration_seconds_count") == applied


def test_updater_training_loss_is_positive(scenario: Scenario):
    assert scenario.first.sample("streamer_training_loss") > 0


def test_updater_watermark_gauge_is_newest_event_time(scenario: Scenario):
    watermark = scenario.first.sample("streamer_updater_watermark_seconds")
    assert watermark == scenario.expected.watermark_ms / 1000



def test_updater_consumer_lag_set_per_partition(scenario: Scenario):
    topics = scenario.settings.topics
    # The registry, not sample(), which would read a missing series as 0.
    lags = {(topic, p): scenario.second.registry.get_sample_value(
                "streamer_consumer_lag", {"topic": topic, "partition": str(p)})
            for topic in (topics.transactions, topics.labels) for p in range(PARTITIONS)}
    assert lags == {key: 0 for key in lags}

def test_updater_counters_match_replay(scenario: Scenario):
    counters = scenario.first.counters
    assert counters["transactions"] == FIRST_RUN_TRANSACTIONS
    assert counters["labels"] == FIRST_RUN_TRANSACTIONS
    assert counters["examples"] == scenario.expected.trained_in_first_run
    assert counters["dead_letters"] == INVALID_EVENTS


# -- snapshots -------------------------------------------------------------------------------


def test_updater_exports_several_snapshots(scenario: Scenario):
    # The initial target model at start, then exports of the fine-tuned model.
    assert scenario.first.sample("streamer_snapshots_exported_total") >= 2


def test_updater_export_failures_are_zero(scenario: Scenario):
    failures = [r.sample("streamer_export_failures_total") for r in (scenario.first, scenario.second)]
    assert failures == [0.0, 0.0]


def test_updater_times_each_export(scenario: Scenario):
    exported = scenario.first.sample("streamer_snapshots_exported_total")
    assert scenario.first.sample("streamer_export_duration_seconds_count") == exported


def test_updater_version_gauge_is_newest_export(scenario: Scenario):
    assert scenario.first.sample("streamer_updater_model_version") == max(scenario.first.exported_versions)


def test_snapshot_store_holds_one_version_per_export(scenario: Scenario):
    exported = scenario.first.sample("streamer_snapshots_exported_total")
    assert scenario.first.exported_versions == list(range(1, int(exported) + 1))


def test_announcements_cover_every_stored_version(scenario: Scenario):
    announced = {a.manifest.version for a in scenario.announcements}
    assert announced == set(scenario.second.exported_versions)


def test_announcements_never_go_backwards(scenario: Scenario):
    versions = [a.manifest.version for a in scenario.announcements]
    # The second run announces the newest stored version again when it starts.
    assert versions == sorted(versions)


def test_announcements_name_the_model(scenario: Scenario):
    names = {a.manifest.model_name for a in scenario.announcements}
    assert names == {scenario.settings.model_name}


def test_announcements_name_the_source_model(scenario: Scenario):
    source = load_model_checkpoint(scenario.settings.source_checkpoint)
    assert {a.manifest.source_model["sha256"] for a in scenario.announcements} == {source.sha256}


def test_announced_bytes_equal_stored_files(scenario: Scenario):
    store = SnapshotStore(scenario.settings.snapshot_dir, scenario.settings.model_name, 1000)
    for announcement in scenario.announcements:
        version = announcement.manifest.version
        assert resolve_snapshot_bytes(announcement) == store.model_path(version).read_bytes(), f"v{version}"


def test_announcements_travel_inline(scenario: Scenario):
    assert all(a.onnx_bytes is not None for a in scenario.announcements)


def test_announced_offsets_never_go_backwards(scenario: Scenario):
    topic = scenario.settings.topics.labels
    totals = [sum(a.manifest.offsets.get(topic, {}).values()) for a in scenario.announcements]
    assert totals == sorted(totals)


# -- checkpoint and commits -----------------------------------------------------------------


def test_checkpoint_offsets_cover_every_record(scenario: Scenario):
    offsets = scenario.first.checkpoint.offsets
    topics = scenario.settings.topics
    covered = {topic: sum(offsets.get(topic, {}).values()) for topic in (topics.transactions, topics.labels)}
    assert covered == {
        topics.transactions: FIRST_RUN_TRANSACTIONS + len(INVALID_TRANSACTIONS),
        topics.labels: FIRST_RUN_TRANSACTIONS + len(INVALID_LABELS),
    }


def test_checkpoint_records_counters(scenario: Scenario):
    assert scenario.first.checkpoint.meta["counters"] == scenario.first.counters


def test_checkpoint_records_newest_version(scenario: Scenario):
    assert scenario.first.checkpoint.meta["last_exported_version"] == max(scenario.first.exported_versions)


def test_checkpoint_keeps_labels_beyond_watermark(scenario: Scenario):
    assert len(scenario.first.checkpoint.join["gate_label"]) == scenario.expected.gated_at_first_stop


def test_checkpoint_keeps_untrained_examples(scenario: Scenario):
    assert len(scenario.first.checkpoint.join["buffer_labels"]) == scenario.expected.buffered_at_first_stop


def test_checkpoints_written_by_each_run(scenario: Scenario):
    assert scenario.first.sample("streamer_checkpoints_total") >= 1
    assert scenario.second.sample("streamer_checkpoints_total") >= 1


def test_commits_sampled_while_running(scenario: Scenario):
    assert scenario.commit_samples != []


def test_commits_while_running_not_beyond_checkpoint(scenario: Scenario):
    beyond = [(tp, c, k) for tp, c, k in scenario.commit_samples if k is None or c > k]
    assert beyond == []


def test_committed_offsets_exist_for_both_topics(scenario: Scenario):
    committed_topics = {tp.topic for tp, offset in scenario.first.committed.items() if offset is not None}
    assert committed_topics == {scenario.settings.topics.transactions, scenario.settings.topics.labels}


@pytest.mark.parametrize("run", ["first", "second"])
def test_committed_offsets_not_beyond_checkpoint(scenario: Scenario, run: str):
    beyond = [(tp, c, k) for tp, c, k in offset_pairs(getattr(scenario, run)) if k is None or c > k]
    assert beyond == []


@pytest.mark.parametrize("run", ["first", "second"])
def test_committed_offsets_reach_checkpoint_after_stop(scenario: Scenario, run: str):
    behind = [(tp, c, k) for tp, c, k in offset_pairs(getattr(scenario, run)) if c != k]
    assert behind == []


# -- dead letters ----------------------------------------------------------------------------


def test_invalid_events_counted_by_topic(scenario: Scenario):
    topics = scenario.settings.topics
    counted = {
        topic: scenario.first.sample("streamer_invalid_events_total", {"topic": topic})
        for topic in (topics.transactions, topics.labels)
    }
    assert counted == {topics.transactions: len(INVALID_TRANSACTIONS), topics.labels: len(INVALID_LABELS)}


def test_dead_letters_one_per_rejected_event(scenario: Scenario):
    # The invalid events of the first run and the contradicting label of the second.
    assert len(scenario.dead_letters) == INVALID_EVENTS + 1


def test_dead_letters_name_source_records(scenario: Scenario):
    produced = scenario.invalid + [scenario.contradicting_label]
    origins = sorted(dead_letter_origin(r) for r in scenario.dead_letters)
    assert origins == sorted((p.topic, p.partition, p.offset) for p in produced)


def test_dead_letters_keep_original_bytes(scenario: Scenario):
    for produced in scenario.invalid:
        assert scenario.dead_letter_for(produced).value == produced.value, produced


def test_dead_letters_keep_original_keys(scenario: Scenario):
    for produced in scenario.invalid:
        assert scenario.dead_letter_for(produced).key == produced.key, produced


def test_dead_letter_reason_for_invalid_json(scenario: Scenario):
    reason = header(scenario.dead_letter_for(scenario.invalid[0]), "streamer.reason")
    assert "not valid JSON" in reason


def test_dead_letter_reason_for_wrong_fields(scenario: Scenario):
    reason = header(scenario.dead_letter_for(scenario.invalid[1]), "streamer.reason")
    assert "wrong fields" in reason


def test_dead_letter_reason_for_negative_amount(scenario: Scenario):
    reason = header(scenario.dead_letter_for(scenario.invalid[2]), "streamer.reason")
    assert "amount" in reason


def test_dead_letter_reason_for_invalid_label_value(scenario: Scenario):
    reason = header(scenario.dead_letter_for(scenario.invalid[-1]), "streamer.reason")
    assert "label must be 0 or 1" in reason


def test_dead_letters_name_the_updater(scenario: Scenario):
    assert {header(r, "streamer.worker") for r in scenario.dead_letters} == {"updater"}


def test_contradicting_label_counted_as_conflicting(scenario: Scenario):
    assert scenario.second.sample("streamer_labels_rejected_total", {"reason": "conflicting"}) == 1


def test_contradicting_label_reason(scenario: Scenario):
    reason = header(scenario.dead_letter_for(scenario.contradicting_label), "streamer.reason")
    assert "contradicts an earlier label" in reason


def test_contradicting_label_keeps_original_bytes(scenario: Scenario):
    letter = scenario.dead_letter_for(scenario.contradicting_label)
    assert letter.value == scenario.contradicting_label.value


def test_contradicting_label_keeps_original_key(scenario: Scenario):
    letter = scenario.dead_letter_for(scenario.contradicting_label)
    assert letter.key == scenario.contradicting_label.key


def test_repeated_label_counted_as_duplicate(scenario: Scenario):
    assert scenario.second.sample("streamer_labels_rejected_total", {"reason": "duplicate"}) == 1


def test_repeated_label_not_dead_lettered(scenario: Scenario):
    repeated = scenario.repeated_label
    origins = [dead_letter_origin(r) for r in scenario.dead_letters]
    assert (repeated.topic, repeated.partition, repeated.offset) not in origins


# -- restart from the checkpoint ------------------------------------------------------------


def test_restart_seeks_to_checkpoint_offsets(scenario: Scenario):
    assert scenario.second.start_offsets == scenario.first.checkpoint.offsets


def test_restart_consumes_only_new_transactions(scenario: Scenario):
    topic = scenario.settings.topics.transactions
    assert scenario.second.sample("streamer_events_consumed_total", {"topic": topic}) == SECOND_RUN_TRANSACTIONS


def test_restart_consumes_only_new_labels(scenario: Scenario):
    topic = scenario.settings.topics.labels
    consumed = scenario.second.sample("streamer_events_consumed_total", {"topic": topic})
    assert consumed == SECOND_RUN_TRANSACTIONS + 2


def test_restart_sends_no_dead_letter_again(scenario: Scenario):
    assert scenario.second.counters["dead_letters"] == INVALID_EVENTS + 1


def test_restart_counters_continue(scenario: Scenario):
    counters = scenario.second.counters
    total = FIRST_RUN_TRANSACTIONS + SECOND_RUN_TRANSACTIONS
    assert counters["transactions"] == total
    assert counters["labels"] == total + 2
    assert counters["examples"] == total


def test_restart_trains_each_label_once(scenario: Scenario):
    trained = sum(r.sample("streamer_examples_trained_total") for r in (scenario.first, scenario.second))
    joined = sum(r.sample("streamer_labels_joined_total") for r in (scenario.first, scenario.second))
    assert trained == joined


def test_restart_joins_every_label(scenario: Scenario):
    joined = sum(r.sample("streamer_labels_joined_total") for r in (scenario.first, scenario.second))
    assert joined == FIRST_RUN_TRANSACTIONS + SECOND_RUN_TRANSACTIONS


def test_restart_leaves_no_label_waiting(scenario: Scenario):
    checkpoint = scenario.second.checkpoint
    waiting = [len(checkpoint.join["gate_label"]), len(checkpoint.join["buffer_labels"])]
    assert waiting == [0, 0]


def test_restart_checkpoint_covers_every_record(scenario: Scenario):
    offsets = scenario.second.checkpoint.offsets
    covered = {topic: sum(offsets.get(topic, {}).values()) for topic in scenario.record_counts}
    assert covered == scenario.record_counts


def test_restart_exports_newer_versions(scenario: Scenario):
    before = max(scenario.first.exported_versions)
    assert max(scenario.second.exported_versions) > before


# -- the pipeline alone: labels released together, which a broker's batching leaves to chance --


def test_pipeline_dead_letters_only_contradicting_label(updater_settings: Settings):
    pipeline = UpdaterPipeline(updater_settings, load_model_checkpoint(updater_settings.source_checkpoint))
    topics = updater_settings.topics
    time_ms = 1_530_403_231_000
    label = label_event(7, time_ms, 0)
    records = [
        SimpleNamespace(topic=topics.transactions, partition=0, offset=0, key=b"42",
                        value=orjson.dumps(transaction_event(7, time_ms, 42, 3, 10.0))),
        # The label joins, its repetition is a duplicate, and only the third contradicts it.
        SimpleNamespace(topic=topics.labels, partition=0, offset=0, key=b"42", value=orjson.dumps(label)),
        SimpleNamespace(topic=topics.labels, partition=0, offset=1, key=b"42", value=orjson.dumps(label)),
        SimpleNamespace(topic=topics.labels, partition=0, offset=2, key=b"42",
                        value=orjson.dumps(dict(label, label=1))),
    ]
    outcome = pipeline.process(records)
    assert [letter.offset for letter in outcome.dead_letters] == [2]
