"""Unit tests of the inference worker's state and its checkpoint round trip, on real July transactions.

A stream of transactions and their labels (two hours of event time later) is processed in
batches the way the inference worker processes a poll. A checkpoint is written in the
middle, restored into a fresh state, and the rest of the stream is processed again. The
terminal delay is 0 days here, so that a label changes the features of the next
transactions at its terminal, and a lost label-join memory would show in the features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

import helpers
from helpers import Record
from streamer.checkpoint import CheckpointData, CheckpointStore
from streamer.errors import CheckpointError, ConfigurationError
from streamer.events import decode_labels, decode_transactions, label_event, transaction_event
from streamer.features import DAY_MS, FeatureState
from streamer.inference_state import FORMAT, InferenceCheckpoints, InferenceState, assigned_offsets
from streamer.labeljoin import LabelJoin
from streamer.settings import Settings

TRANSACTIONS = "transactions"
LABELS = "labels"
PARTITIONS = 2
STREAM_TRANSACTIONS = 6000
LABEL_DELAY_MS = 2 * 3_600_000
BATCH_RECORDS = 500
CHECKPOINT_AFTER_BATCHES = 12  # of 24 batches
FRAUD_RATE_COLUMNS = ("terminal_fraud_rate_1d", "terminal_fraud_rate_7d", "terminal_fraud_rate_30d")


def make_stream() -> list[Record]:
    """July transactions and their labels in event-time order, keyed by customer into two partitions."""
    data = helpers.read_handbook_transactions(("2018-07",), "2018-07-04")
    events = []
    for i in range(STREAM_TRANSACTIONS):
        tx, time_ms, customer = int(data.transaction_id[i]), int(data.event_time_ms[i]), int(data.customer_id[i])
        events.append((time_ms, 1, TRANSACTIONS, customer, transaction_event(
            tx, time_ms, customer, int(data.terminal_id[i]), float(data.amount[i]))))
        events.append((time_ms + LABEL_DELAY_MS, 0, LABELS, customer,
                       label_event(tx, time_ms + LABEL_DELAY_MS, int(data.fraud[i]))))
    # Labels before transactions of equal time, as the replay produces them.
    events.sort(key=lambda event: (event[0], event[1]))
    offsets: dict[tuple[str, int], int] = {}
    records = []
    for _, _, topic, customer, event in events:
        partition = customer % PARTITIONS
        offset = offsets.get((topic, partition), 0)
        offsets[topic, partition] = offset + 1
        records.append(Record(topic, partition, offset, str(customer).encode(), orjson.dumps(event)))
    return records


def new_state() -> InferenceState:
    # The same label join as the worker's, with a terminal delay of 0 days (see the module docstring).
    return InferenceState(FeatureState(terminal_delay_days=0),
                          LabelJoin(0, deadline_days=14, policy="drop", joined_memory=100_000))


def process(state: InferenceState, records: list[Record]) -> np.ndarray:
    """Apply one poll as the worker does (labels, then transactions in event-time order); return the features."""
    state.advance(records)
    label_records = [r for r in records if r.topic == LABELS]
    if label_records:
        state.observe_labels(decode_labels([r.value for r in label_records]))
    batch = decode_transactions([r.value for r in records if r.topic == TRANSACTIONS])
    if not len(batch):
        return np.zeros((0, len(state.features.feature_names)), dtype=np.float32)
    order = np.argsort(batch.event_time_ms, kind="stable")
    features = state.features.transform_transactions(
        batch.event_time_ms[order], batch.customer_id[order], batch.terminal_id[order], batch.amount[order]
    )
    state.remember_transactions(batch, order)
    state.scored += len(order)
    return features


def batches_of(records: list[Record]) -> list[list[Record]]:
    return [records[i:i + BATCH_RECORDS] for i in range(0, len(records), BATCH_RECORDS)]


@dataclass
class RoundTrip:
    """The state at the checkpoint, what was restored from it, and the features of the batches after it."""

    uninterrupted: np.ndarray
    resumed: np.ndarray
    before: InferenceState
    restored_offsets: dict[str, dict[int, int]]
    restored_scored: int
    restored_pending: int
    folder: Path


@pytest.fixture(scope="module")
def stream() -> list[list[Record]]:
    return batches_of(make_stream())


def run_round_trip(stream: list[list[Record]], directory: Path, restore_labels: bool = True) -> RoundTrip:
    uninterrupted_state, before = new_state(), new_state()
    for batch in stream[:CHECKPOINT_AFTER_BATCHES]:
        process(uninterrupted_state, batch)
        process(before, batch)
    checkpoints = InferenceCheckpoints(directory)
    checkpoints.save_if_changed(before, {"worker_id": "test"})

    restored = new_state()
    if restore_labels:
        InferenceCheckpoints(directory).restore_latest(restored)
    else:
        data = CheckpointStore(directory, checkpoint_format=FORMAT).load_latest()
        restored.features = FeatureState.from_state_dict(data.features, terminal_delay_days=0)
        restored.offsets = data.offsets
    restored_offsets, restored_scored, restored_pending = restored.copy_offsets(), restored.scored, restored.labels.pending
    rest = stream[CHECKPOINT_AFTER_BATCHES:]
    uninterrupted = np.concatenate([process(uninterrupted_state, batch) for batch in rest])
    resumed = np.concatenate([process(restored, batch) for batch in rest])
    return RoundTrip(uninterrupted, resumed, before, restored_offsets, restored_scored, restored_pending,
                     directory / "ckpt-000001")


@pytest.fixture(scope="module")
def round_trip(stream: list[list[Record]], tmp_path_factory: pytest.TempPathFactory) -> RoundTrip:
    return run_round_trip(stream, tmp_path_factory.mktemp("inference-checkpoints"))


def fraud_rate_columns(state: InferenceState) -> list[int]:
    return [state.features.feature_names.index(name) for name in FRAUD_RATE_COLUMNS]


# -- round trip -----------------------------------------------------------------------------


def test_round_trip_restores_offsets(round_trip: RoundTrip):
    assert round_trip.restored_offsets == round_trip.before.offsets


def test_round_trip_offsets_cover_both_topics(round_trip: RoundTrip):
    assert sorted(round_trip.restored_offsets) == [LABELS, TRANSACTIONS]


def test_round_trip_restores_scored_count(round_trip: RoundTrip):
    assert round_trip.restored_scored == round_trip.before.scored


def test_round_trip_restores_pending_transactions(round_trip: RoundTrip):
    assert round_trip.restored_pending == round_trip.before.labels.pending


def test_resumed_features_equal_uninterrupted(round_trip: RoundTrip):
    np.testing.assert_array_equal(round_trip.resumed, round_trip.uninterrupted)


def test_labels_after_restore_change_fraud_rates(round_trip: RoundTrip):
    # Without a fraud label joined after the restore, the test above could not see a lost join memory.
    columns = fraud_rate_columns(round_trip.before)
    assert (round_trip.uninterrupted[:, columns] > 0).any()


def test_restore_without_join_memory_changes_features(stream: list[list[Record]], tmp_path: Path):
    broken = run_round_trip(stream, tmp_path, restore_labels=False)
    assert not np.array_equal(broken.resumed, broken.uninterrupted)


# -- files ----------------------------------------------------------------------------------


def test_checkpoint_folder_has_no_trainer_file(round_trip: RoundTrip):
    assert sorted(p.name for p in round_trip.folder.iterdir()) == ["features.npz", "join.npz", "meta.json"]


@pytest.mark.parametrize("name", ["features.npz", "join.npz"])
def test_checkpoint_arrays_load_without_pickle(round_trip: RoundTrip, name: str):
    with np.load(round_trip.folder / name, allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)


def test_checkpoint_meta_records_worker_and_count(round_trip: RoundTrip):
    meta = json.loads((round_trip.folder / "meta.json").read_text())
    assert meta["meta"] == {"worker_id": "test", "scored": round_trip.before.scored}


def test_save_if_changed_skips_unchanged_state(round_trip: RoundTrip, tmp_path: Path):
    checkpoints = InferenceCheckpoints(tmp_path)
    checkpoints.save_if_changed(round_trip.before, {})
    assert checkpoints.save_if_changed(round_trip.before, {}) is False


def test_save_if_changed_keeps_offsets_to_commit(round_trip: RoundTrip, tmp_path: Path):
    checkpoints = InferenceCheckpoints(tmp_path)
    checkpoints.save_if_changed(round_trip.before, {})
    assert checkpoints.offsets == round_trip.before.offsets


def test_restore_latest_keeps_offsets_to_commit(round_trip: RoundTrip):
    checkpoints = InferenceCheckpoints(round_trip.folder.parent)
    checkpoints.restore_latest(new_state())
    assert checkpoints.offsets == round_trip.before.offsets


def test_save_if_changed_skips_empty_state(tmp_path: Path):
    assert InferenceCheckpoints(tmp_path).save_if_changed(new_state(), {}) is False


def test_restore_after_restore_skips_unchanged_state(round_trip: RoundTrip):
    checkpoints = InferenceCheckpoints(round_trip.folder.parent)
    state = new_state()
    checkpoints.restore_latest(state)
    assert checkpoints.save_if_changed(state, {}) is False


def test_restore_latest_without_checkpoint_keeps_state(tmp_path: Path):
    state = new_state()
    assert InferenceCheckpoints(tmp_path / "missing").restore_latest(state) is False
    assert state.offsets == {}


def test_restore_rejects_updater_checkpoint(tmp_path: Path):
    state = new_state()
    CheckpointStore(tmp_path).save(CheckpointData(
        trainer=None, features=state.features.state_dict(), join=state.labels.state_dict(), offsets={}
    ))
    with pytest.raises(CheckpointError, match="format"):
        InferenceCheckpoints(tmp_path).restore_latest(new_state())


def test_restore_rejects_other_feature_windows(round_trip: RoundTrip):
    state = InferenceState(FeatureState(), LabelJoin(0))  # terminal delay 7 days, not 0
    with pytest.raises(CheckpointError, match="terminal_delay_ms"):
        InferenceCheckpoints(round_trip.folder.parent).restore_latest(state)


# -- offsets --------------------------------------------------------------------------------


def test_advance_keeps_next_offset_per_partition():
    state = new_state()
    state.advance([Record(TRANSACTIONS, 0, 4, b"", b""), Record(TRANSACTIONS, 0, 5, b"", b""),
                   Record(LABELS, 1, 9, b"", b"")])
    assert state.offsets == {TRANSACTIONS: {0: 6}, LABELS: {1: 10}}


def test_forget_drops_reset_partition():
    state = new_state()
    state.offsets = {TRANSACTIONS: {0: 6, 1: 3}}
    state.forget([TopicPartition(TRANSACTIONS, 0)])
    assert state.offsets == {TRANSACTIONS: {1: 3}}


def test_assigned_offsets_keep_assigned_partitions():
    offsets = {TRANSACTIONS: {0: 6, 1: 3}, LABELS: {0: 2}}
    assigned = {TopicPartition(TRANSACTIONS, 1), TopicPartition(LABELS, 0)}
    assert assigned_offsets(offsets, assigned) == {TopicPartition(TRANSACTIONS, 1): 3, TopicPartition(LABELS, 0): 2}


# -- settings -------------------------------------------------------------------------------


def test_checkpoint_interval_read_from_environment():
    settings = Settings.from_env({"STREAMER_INFERENCE_CHECKPOINT_INTERVAL_SECONDS": "0.5"})
    assert settings.inference_checkpoint_interval_seconds == 0.5


def test_negative_checkpoint_interval_rejected():
    with pytest.raises(ConfigurationError, match="inference_checkpoint_interval_seconds"):
        Settings(inference_checkpoint_interval_seconds=-1)


def test_checkpoint_dir_named_by_model_and_worker():
    settings = Settings(data_dir=Path("data"), model_name="fraud")
    assert settings.inference_checkpoint_dir("inference-1") == Path("data/inference-checkpoints/fraud/inference-1")


def _transaction_record(tx_id: int, time_ms: int, customer: int) -> Record:
    event = transaction_event(tx_id, time_ms, customer, customer, 10.0)
    return Record(TRANSACTIONS, 0, tx_id, str(customer).encode(), orjson.dumps(event))


def test_state_pruned_past_every_window():
    state = new_state()
    start_ms = 1_530_403_200_000  # 2018-07-01
    process(state, [_transaction_record(0, start_ms, 1)])

    process(state, [_transaction_record(1, start_ms + 45 * DAY_MS, 2)])

    assert state.features.state_dict()["customer_keys"].tolist() == [2]


def test_state_not_pruned_within_a_day():
    state = new_state()
    start_ms = 1_530_403_200_000
    process(state, [_transaction_record(0, start_ms, 1)])  # the first batch prunes at its time
    process(state, [_transaction_record(1, start_ms + 31 * DAY_MS, 2)])

    process(state, [_transaction_record(2, start_ms + 31 * DAY_MS + 3_600_000, 3)])

    assert state.pruned_at_ms == start_ms + 31 * DAY_MS
