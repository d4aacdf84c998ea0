"""UpdaterPipeline dead letters for events that decode but do not fit the stream.

Covers transactions far ahead of or behind the transaction watermark, repeated transaction
ids, repeated labels, and labels whose transaction never comes (orphans).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from helpers import Record
from streamer.errors import ConfigurationError
from streamer.events import label_event, transaction_event
from streamer.features import FEATURE_NAMES
from streamer.model import FraudMLP, ModelCheckpoint
from streamer.pipeline import DUPLICATE_LABEL, DUPLICATE_TRANSACTION, ORPHAN_LABEL, UpdaterPipeline
from streamer.settings import Settings

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
START_MS = 1_530_403_200_000  # 2018-07-01T00:00:00Z


class Feed:
    """Records with increasing offsets per topic, for feeding a pipeline by hand."""

    def __init__(self) -> None:
        self.offsets = {"transactions": 0, "labels": 0}

    def record(self, topic: str, event: dict, partition: int = 0) -> Record:
        offset = self.offsets[topic]
        self.offsets[topic] += 1
        return Record(topic, partition, offset, str(event["transaction_id"]).encode(), orjson.dumps(event))

    def transaction(self, tx_id: int, time_ms: int) -> Record:
        return self.record("transactions", transaction_event(tx_id, time_ms, tx_id % 7, tx_id % 11, 25.0))

    def label(self, tx_id: int, time_ms: int, label: int = 0) -> Record:
        return self.record("labels", label_event(tx_id, time_ms, label))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _pipeline(tmp_path: Path, **changes) -> UpdaterPipeline:
    torch.manual_seed(0)
    source = ModelCheckpoint(FraudMLP(len(FEATURE_NAMES), (8, 4)), list(FEATURE_NAMES), {}, "0" * 64)
    defaults = dict(data_dir=tmp_path, microbatch_size=32, label_release_idle_seconds=3600.0,
                    label_deadline_days=2.0, max_event_time_skew_days=30.0,
                    dead_letter_duplicate_labels=True)
    return UpdaterPipeline(Settings(**{**defaults, **changes}), source)


# --- event time relative to the stream -------------------------------------------------------


def test_first_transaction_sets_watermark(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()

    outcome = pipeline.process([feed.transaction(1, START_MS)])

    assert outcome.dead_letters == []
    assert pipeline.watermark_ms == START_MS


def test_future_transaction_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])
    future = feed.transaction(2, START_MS + 31 * DAY_MS)

    outcome = pipeline.process([future])

    assert len(outcome.dead_letters) == 1
    letter = outcome.dead_letters[0]
    assert "ahead of the transaction watermark" in letter.reason
    assert letter.value == future.value
    assert (letter.topic, letter.partition, letter.offset) == ("transactions", 0, 1)
    assert pipeline.watermark_ms == START_MS
    assert pipeline.counters["transactions"] == 1


def test_future_transaction_keeps_pending_labels(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS), feed.transaction(2, START_MS + HOUR_MS)])

    pipeline.process([feed.transaction(3, 4_000_000_000_000)])  # year 2096
    pipeline.process([feed.transaction(4, START_MS + 2 * HOUR_MS)])

    assert pipeline.join.pending == 3


def test_transaction_within_skew_moves_watermark(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])

    outcome = pipeline.process([feed.transaction(2, START_MS + 29 * DAY_MS)])

    assert outcome.dead_letters == []
    assert pipeline.watermark_ms == START_MS + 29 * DAY_MS


def test_old_transaction_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])

    outcome = pipeline.process([feed.transaction(2, START_MS - 3 * DAY_MS)])

    assert len(outcome.dead_letters) == 1
    assert "behind the transaction watermark" in outcome.dead_letters[0].reason
    assert pipeline.join.pending == 1


def test_gap_in_batch_rejects_later_times(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    records = [
        feed.transaction(1, START_MS),
        feed.transaction(2, START_MS + 20 * DAY_MS),
        feed.transaction(3, START_MS + 60 * DAY_MS),
        feed.transaction(4, START_MS + 61 * DAY_MS),
    ]

    outcome = pipeline.process(records)

    assert sorted(letter.offset for letter in outcome.dead_letters) == [2, 3]
    assert pipeline.watermark_ms == START_MS + 20 * DAY_MS


def test_rejected_transaction_leaves_features_unchanged(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])
    before = pipeline.features.state_dict()

    pipeline.process([feed.transaction(2, START_MS + 40 * DAY_MS), feed.transaction(1, START_MS)])

    after = pipeline.features.state_dict()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# --- repeated transactions and labels --------------------------------------------------------


def test_duplicate_pending_transaction_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])

    outcome = pipeline.process([feed.transaction(1, START_MS + 1000)])

    assert [letter.reason for letter in outcome.dead_letters] == [DUPLICATE_TRANSACTION]
    assert outcome.dead_letters[0].offset == 1
    assert pipeline.counters["transactions"] == 1


def test_duplicate_transaction_in_one_batch_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()

    outcome = pipeline.process([feed.transaction(1, START_MS), feed.transaction(1, START_MS)])

    assert [letter.offset for letter in outcome.dead_letters] == [1]
    assert outcome.transactions == 1


def test_duplicate_joined_transaction_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS), feed.label(1, START_MS + HOUR_MS)])
    pipeline.process([feed.transaction(2, START_MS + 2 * HOUR_MS)])  # releases the label
    assert pipeline.join.pending == 1

    outcome = pipeline.process([feed.transaction(1, START_MS + 3 * HOUR_MS)])

    assert [letter.reason for letter in outcome.dead_letters] == [DUPLICATE_TRANSACTION]


def test_dedup_window_comes_from_settings(tmp_path: Path):
    pipeline = _pipeline(tmp_path, dedup_window=1234)

    assert pipeline.join.joined_memory == 1234


def test_duplicate_label_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])
    first = feed.label(1, START_MS + HOUR_MS, label=1)
    again = feed.label(1, START_MS + HOUR_MS, label=1)

    outcome = pipeline.process([first, again, feed.transaction(2, START_MS + 2 * HOUR_MS)])

    assert [letter.reason for letter in outcome.dead_letters] == [DUPLICATE_LABEL]
    letter = outcome.dead_letters[0]
    assert (letter.topic, letter.offset, letter.key, letter.value) == ("labels", 1, b"1", again.value)


def test_conflicting_label_dead_lettered(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])

    outcome = pipeline.process([
        feed.label(1, START_MS + HOUR_MS, label=1),
        feed.label(1, START_MS + HOUR_MS, label=0),
        feed.transaction(2, START_MS + 2 * HOUR_MS),
    ])

    assert [letter.offset for letter in outcome.dead_letters] == [1]
    assert "contradicts" in outcome.dead_letters[0].reason


# --- labels whose transaction never comes ------------------------------------------------------


def test_orphan_label_dead_lettered_after_deadline(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    orphan = feed.record("labels", label_event(99, START_MS + HOUR_MS, 1), partition=3)
    pipeline.process([feed.transaction(1, START_MS), orphan, feed.transaction(2, START_MS + 2 * HOUR_MS)])

    # The label partition must move past the deadline too: deadlines wait for the slowest partition.
    later_label = feed.record("labels", label_event(2, START_MS + 3 * DAY_MS, 0), partition=3)
    outcome = pipeline.process([later_label, feed.transaction(3, START_MS + 3 * DAY_MS)])

    assert [letter.reason for letter in outcome.dead_letters] == [ORPHAN_LABEL]
    letter = outcome.dead_letters[0]
    assert (letter.topic, letter.partition, letter.offset) == ("labels", 3, 0)
    assert letter.key == b"99"
    assert letter.value == orphan.value


def test_orphan_label_origin_survives_restore(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    orphan = feed.label(99, START_MS + HOUR_MS)
    pipeline.process([feed.transaction(1, START_MS), orphan, feed.transaction(2, START_MS + 2 * HOUR_MS)])
    restored = _pipeline(tmp_path)
    restored.restore(pipeline.checkpoint_data({}))

    outcome = restored.process([feed.transaction(3, START_MS + 3 * DAY_MS)])

    assert [letter.value for letter in outcome.dead_letters] == [orphan.value]


def test_early_label_joined_is_not_orphan(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS), feed.label(5, START_MS + HOUR_MS),
                      feed.transaction(2, START_MS + 2 * HOUR_MS)])
    pipeline.process([feed.transaction(5, START_MS + 3 * HOUR_MS)])

    outcome = pipeline.process([feed.transaction(3, START_MS + 3 * DAY_MS)])

    assert outcome.dead_letters == []
    assert len(pipeline.join._early_origin) == 0


# --- settings -------------------------------------------------------------------------------------


def test_settings_read_new_limits_from_env():
    settings = Settings.from_env({
        "STREAMER_MAX_EVENT_TIME_SKEW_DAYS": "7.5", "STREAMER_DEDUP_WINDOW": "1000",
        "STREAMER_DEAD_LETTER_DUPLICATE_LABELS": "true",
    })

    assert settings.max_event_time_skew_days == 7.5
    assert settings.dedup_window == 1000
    assert settings.dead_letter_duplicate_labels is True


@pytest.mark.parametrize("changes", [{"max_event_time_skew_days": 0.0}, {"dedup_window": 0}])
def test_settings_reject_invalid_limit(changes: dict):
    with pytest.raises(ConfigurationError):
        Settings(**changes)


def test_duplicate_label_only_counted_by_default(tmp_path: Path):
    pipeline = _pipeline(tmp_path, dead_letter_duplicate_labels=False)
    feed = Feed()
    pipeline.process([feed.transaction(1, START_MS)])

    outcome = pipeline.process([
        feed.label(1, START_MS + HOUR_MS), feed.label(1, START_MS + HOUR_MS),
        feed.transaction(2, START_MS + 2 * HOUR_MS),
    ])

    assert outcome.dead_letters == []
    assert pipeline.join.pending == 1
