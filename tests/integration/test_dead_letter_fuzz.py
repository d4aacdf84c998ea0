"""Fuzz the UpdaterPipeline with invalid events mixed into a valid stream.

No broker is needed: records are plain objects with Kafka's fields. Each generated stream
is a list of operations. `StreamBuilder` turns them into records and remembers which ones
are invalid. Every invalid record must be dead-lettered exactly once, with its bytes, key,
origin and a reason, and no valid record may be. The valid transactions must be counted, and
the model weights must stay finite.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.events import MAX_EVENT_TIME_MS, MAX_MESSAGE_BYTES, MIN_EVENT_TIME_MS, label_event, transaction_event
from streamer.features import FEATURE_NAMES
from streamer.model import FraudMLP, ModelCheckpoint
from streamer.pipeline import UpdaterPipeline
from streamer.settings import Settings

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
START_MS = 1_530_403_200_000  # 2018-07-01T00:00:00Z
STEP_MS = 600_000  # event time between two valid transactions
DEADLINE_DAYS = 2.0
SKEW_DAYS = 30.0
# Valid streams here span well under a year, so these are outside the window in every run.
FUTURE_MIN_MS = START_MS + 400 * DAY_MS
PAST_MAX_MS = START_MS - int(DEADLINE_DAYS * DAY_MS) - DAY_MS
ORPHAN_IDS = 10**12  # ids of labels that never get a transaction
BROKEN_IDS = 2 * 10**12  # ids of events with one broken field
PARTITIONS = 3

# One broken field per entry: (field, value); a value of `MISSING` removes the field.
MISSING = object()
BROKEN_TRANSACTION_FIELDS = [
    ("type", "label"), ("type", "refund"), ("type", None), ("event_id", ""), ("event_id", 7),
    ("event_id", "x" * 200), ("transaction_id", -1), ("transaction_id", "12"), ("transaction_id", 1.5),
    ("transaction_id", True), ("transaction_id", 2**63), ("event_time", 0), ("event_time", 5_000_000_000_000),
    ("event_time", 1.5e12), ("event_time", "2018-07-01"), ("customer_id", -5), ("customer_id", None),
    ("terminal_id", [1]), ("terminal_id", {"id": 1}), ("amount", -0.01), ("amount", 1e7), ("amount", "9.99"),
    ("amount", True), ("amount", None), ("amount", MISSING), ("event_time", MISSING), ("extra", 1),
]
BROKEN_LABEL_FIELDS = [
    ("type", "transaction"), ("event_id", ""), ("transaction_id", -3), ("transaction_id", "5"),
    ("event_time", 10), ("event_time", 4_102_444_800_000), ("label", 2), ("label", -1), ("label", "1"),
    ("label", True), ("label", 0.5), ("label", None), ("label", MISSING), ("amount", 3.0),
]


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class StreamBuilder:
    """Records built from operations, with the set of invalid ones and the valid transaction count."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.invalid: set[tuple[str, int, int]] = set()
        self.valid_transactions = 0
        self.time_ms = START_MS
        self._offsets: Counter = Counter()
        self._transactions: list[tuple[int, int, bytes]] = []  # (id, event time, bytes) of valid ones
        self._unlabelled: list[int] = []  # positions in _transactions
        self._labels: list[tuple[int, int, int, bytes]] = []  # (id, label, event time, bytes) fed so far
        self._orphans = 0
        self._broken = 0

    def apply(self, operation: tuple) -> None:
        getattr(self, operation[0])(*operation[1:])

    def _append(self, topic: str, key: bytes | None, value: bytes | None, invalid: bool) -> None:
        partition = len(self.records) % PARTITIONS
        offset = self._offsets[(topic, partition)]
        self._offsets[(topic, partition)] += 1
        self.records.append(Record(topic, partition, offset, key, value))
        if invalid:
            self.invalid.add((topic, partition, offset))

    # -- valid events ---------------------------------------------------------------------------

    def valid_transaction(self) -> None:
        tx_id = len(self._transactions)
        value = orjson.dumps(transaction_event(tx_id, self.time_ms, tx_id % 13, tx_id % 17, float(tx_id % 300)))
        self._unlabelled.append(len(self._transactions))
        self._transactions.append((tx_id, self.time_ms, value))
        self._append("transactions", str(tx_id).encode(), value, invalid=False)
        self.valid_transactions += 1
        self.time_ms += STEP_MS

    def valid_label(self, choice: int, label: int) -> None:
        # Only transactions of the last day, so that the label comes before the deadline.
        recent = [p for p in self._unlabelled if self._transactions[p][1] >= self.time_ms - DAY_MS]
        if not recent:
            return
        position = recent[choice % len(recent)]
        self._unlabelled.remove(position)
        tx_id, tx_time, _ = self._transactions[position]
        self._add_label(tx_id, label, tx_time + 6 * HOUR_MS, invalid=False)

    def _add_label(self, tx_id: int, label: int, time_ms: int, invalid: bool) -> None:
        value = orjson.dumps(label_event(tx_id, time_ms, label))
        self._labels.append((tx_id, label, time_ms, value))
        self._append("labels", str(tx_id).encode(), value, invalid)

    # -- invalid events -------------------------------------------------------------------------

    def garbage(self, topic: str, value: bytes) -> None:
        self._append(topic, None, value, invalid=True)

    def json_shape(self, topic: str, document) -> None:
        self._append(topic, b"shape", orjson.dumps(document), invalid=True)

    def oversized(self, topic: str) -> None:
        value = orjson.dumps(transaction_event(BROKEN_IDS, self.time_ms, 1, 1, 1.0)) + b" " * MAX_MESSAGE_BYTES
        self._append(topic, b"big", value, invalid=True)

    def tombstone(self, topic: str) -> None:
        self._append(topic, b"gone", None, invalid=True)

    def broken_field(self, topic: str, choice: int) -> None:
        self._broken += 1
        tx_id = BROKEN_IDS + self._broken
        if topic == "transactions":
            event = transaction_event(tx_id, self.time_ms, 1, 2, 10.0)
            name, value = BROKEN_TRANSACTION_FIELDS[choice % len(BROKEN_TRANSACTION_FIELDS)]
        else:
            event = label_event(tx_id, self.time_ms, 1)
            name, value = BROKEN_LABEL_FIELDS[choice % len(BROKEN_LABEL_FIELDS)]
        if value is MISSING:
            del event[name]
        else:
            event[name] = value
        self._append(topic, str(tx_id).encode(), orjson.dumps(event), invalid=True)

    def duplicate_transaction(self, choice: int) -> None:
        if self._transactions:
            tx_id, _, value = self._transactions[choice % len(self._transactions)]
            self._append("transactions", str(tx_id).encode(), value, invalid=True)

    def duplicate_label(self, choice: int) -> None:
        if self._labels:
            tx_id, _, _, value = self._labels[choice % len(self._labels)]
            self._append("labels", str(tx_id).encode(), value, invalid=True)

    def conflicting_label(self, choice: int) -> None:
        if self._labels:
            tx_id, label, time_ms, _ = self._labels[choice % len(self._labels)]
            self._add_label(tx_id, 1 - label, time_ms, invalid=True)

    def orphan_label(self) -> None:
        self._orphans += 1
        self._add_label(ORPHAN_IDS + self._orphans, self._orphans % 2, self.time_ms, invalid=True)

    def future_transaction(self, time_ms: int) -> None:
        self._broken += 1
        tx_id = BROKEN_IDS + self._broken
        value = orjson.dumps(transaction_event(tx_id, time_ms, 1, 2, 10.0))
        self._append("transactions", str(tx_id).encode(), value, invalid=True)

    def past_transaction(self, time_ms: int) -> None:
        self.future_transaction(time_ms)  # the same event, but the time is behind the window

    # -- end of stream --------------------------------------------------------------------------

    def tail(self) -> list[list[Record]]:
        """Batches of valid transactions and labels that move the watermark past every label's deadline.

        Deadlines wait for the slowest partition of either topic, so each day brings a label to
        every labels partition too (records go round-robin, and each pair shifts it by two).
        """
        batches = []
        for _ in range(int(DEADLINE_DAYS) + 2):
            self.time_ms += DAY_MS
            start = len(self.records)
            for _ in range(PARTITIONS):
                self.valid_transaction()
                position = self._unlabelled.pop()
                tx_id, tx_time, _ = self._transactions[position]
                self._add_label(tx_id, 0, tx_time, invalid=False)
            batches.append(self.records[start:])
        return batches


def _pipeline(tmp_path: Path) -> UpdaterPipeline:
    torch.manual_seed(0)
    source = ModelCheckpoint(FraudMLP(len(FEATURE_NAMES), (8, 4)), list(FEATURE_NAMES), {}, "0" * 64)
    settings_ = Settings(
        data_dir=tmp_path, microbatch_size=16, label_release_idle_seconds=3600.0,
        label_deadline_days=DEADLINE_DAYS, max_event_time_skew_days=SKEW_DAYS, dead_letter_duplicate_labels=True,
    )
    return UpdaterPipeline(settings_, source)


def _run(tmp_path: Path, operations: list[tuple], batch_size: int) -> tuple[UpdaterPipeline, StreamBuilder, list]:
    builder = StreamBuilder()
    for _ in range(PARTITIONS):  # records go round-robin: a valid first transaction sets each partition's watermark
        builder.valid_transaction()
    for operation in operations:
        builder.apply(operation)
    body = list(builder.records)
    batches = [body[lo:lo + batch_size] for lo in range(0, len(body), batch_size)] + builder.tail()
    pipeline = _pipeline(tmp_path)
    letters = []
    for batch in batches:
        letters += pipeline.process(batch).dead_letters
    return pipeline, builder, letters


def _check(pipeline: UpdaterPipeline, builder: StreamBuilder, letters: list) -> None:
    by_origin = Counter((letter.topic, letter.partition, letter.offset) for letter in letters)
    assert {origin for origin, n in by_origin.items() if n > 1} == set()
    assert set(by_origin) - builder.invalid == set()  # no valid record dead-lettered
    assert builder.invalid - set(by_origin) == set()  # every invalid record dead-lettered
    records = {(r.topic, r.partition, r.offset): r for r in builder.records}
    for letter in letters:
        record = records[(letter.topic, letter.partition, letter.offset)]
        assert letter.value == record.value
        assert letter.key == record.key
        assert letter.reason.strip() != ""
    assert pipeline.counters["transactions"] == builder.valid_transactions
    assert pipeline.counters["dead_letters"] == len(builder.invalid)
    for name, tensor in pipeline.trainer.model.state_dict().items():
        assert torch.isfinite(tensor).all(), name


TOPICS = st.sampled_from(["transactions", "labels"])
CHOICE = st.integers(0, 10**6)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=8),
    max_leaves=12,
)
OPERATIONS = st.one_of(
    st.tuples(st.just("valid_transaction")),
    st.tuples(st.just("valid_label"), CHOICE, st.integers(0, 1)),
    st.tuples(st.just("garbage"), TOPICS, st.binary(max_size=80)),
    st.tuples(st.just("json_shape"), TOPICS, JSON_VALUES),
    st.tuples(st.just("oversized"), TOPICS),
    st.tuples(st.just("tombstone"), TOPICS),
    st.tuples(st.just("broken_field"), TOPICS, CHOICE),
    st.tuples(st.just("duplicate_transaction"), CHOICE),
    st.tuples(st.just("duplicate_label"), CHOICE),
    st.tuples(st.just("conflicting_label"), CHOICE),
    st.tuples(st.just("orphan_label")),
    st.tuples(st.just("future_transaction"), st.integers(FUTURE_MIN_MS, MAX_EVENT_TIME_MS - 1)),
    st.tuples(st.just("past_transaction"), st.integers(MIN_EVENT_TIME_MS, PAST_MAX_MS)),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(operations=st.lists(OPERATIONS, min_size=1, max_size=120), batch_size=st.integers(1, 60))
def test_pipeline_dead_letters_generated_invalid_events(tmp_path_factory, operations, batch_size):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    torch.set_num_threads(1)

    pipeline, builder, letters = _run(tmp_path, operations, batch_size)

    _check(pipeline, builder, letters)


def _large_operations(rng: random.Random, n: int) -> list[tuple]:
    """Return operations of which about 30 % are valid events and the rest every kind of invalid event."""
    shapes = [[], [1, 2], "text", 42, None, {"type": "transaction"}, {"a": {"b": [1, 2]}}, 1.5, True]
    operations = []
    for _ in range(n):
        topic = rng.choice(["transactions", "labels"])
        kind = rng.randrange(16)
        if kind < 2:
            operations.append(("valid_transaction",))
        elif kind < 4:
            operations.append(("valid_label", rng.randrange(10**6), rng.randrange(2)))
        elif kind == 4:
            operations.append(("garbage", topic, rng.randbytes(rng.randrange(1, 64))))
        elif kind == 5:
            operations.append(("json_shape", topic, rng.choice(shapes)))
        elif kind == 6:
            operations.append(rng.choice([("oversized", topic), ("tombstone", topic)]))
        elif kind in (7, 8):
            operations.append(("broken_field", topic, rng.randrange(10**6)))
        elif kind == 9:
            operations.append(("duplicate_transaction", rng.randrange(10**6)))
        elif kind == 10:
            operations.append(("duplicate_label", rng.randrange(10**6)))
        elif kind == 11:
            operations.append(("conflicting_label", rng.randrange(10**6)))
        elif kind == 12:
            operations.append(("orphan_label",))
        elif kind == 13:
            operations.append(("future_transaction", rng.randrange(FUTURE_MIN_MS, MAX_EVENT_TIME_MS)))
        elif kind == 14:
            operations.append(("past_transaction", rng.randrange(MIN_EVENT_TIME_MS, PAST_MAX_MS)))
        else:
            operations.append(("valid_transaction",))
    return operations


def test_pipeline_dead_letters_large_invalid_batch(tmp_path: Path):
    torch.set_num_threads(1)
    operations = _large_operations(random.Random(20181), 30_000)

    pipeline, builder, letters = _run(tmp_path, operations, batch_size=len(operations) + 1)

    assert len(builder.invalid) >= 20_000
    _check(pipeline, builder, letters)
    assert pipeline.counters["examples"] > 0
