"""TrainingLedger: appended ids, truncation back to a checkpoint, torn writes, and the pipeline's use of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from streamer.errors import CheckpointError, ConfigurationError
from streamer.events import label_event, transaction_event
from streamer.faults import _CrashPlan
from streamer.features import FEATURE_NAMES
from streamer.ledger import TrainingLedger, read_ledger
from streamer.model import FraudMLP, ModelCheckpoint
from streamer.pipeline import UpdaterPipeline
from streamer.settings import Settings


def test_ledger_appends_ids_in_order(tmp_path: Path):
    ledger = TrainingLedger(tmp_path / "m.ids")
    ledger.append(np.array([5, 3]))
    ledger.append(np.array([9]))
    ledger.sync()
    assert read_ledger(tmp_path / "m.ids").tolist() == [5, 3, 9]


def test_ledger_reopened_continues_at_its_length(tmp_path: Path):
    first = TrainingLedger(tmp_path / "m.ids")
    first.append(np.array([1, 2]))
    first.close()
    assert TrainingLedger(tmp_path / "m.ids").length == 2


def test_ledger_truncate_drops_ids_after_checkpoint(tmp_path: Path):
    ledger = TrainingLedger(tmp_path / "m.ids")
    ledger.append(np.array([1, 2, 3, 4]))
    ledger.truncate(2)
    ledger.append(np.array([7]))
    ledger.sync()
    assert read_ledger(tmp_path / "m.ids").tolist() == [1, 2, 7]


def test_ledger_truncate_removes_torn_last_id(tmp_path: Path):
    path = tmp_path / "m.ids"
    path.write_bytes(np.array([1, 2], dtype="<i8").tobytes() + b"\x01\x02\x03")
    ledger = TrainingLedger(path)
    ledger.truncate(2)
    assert path.stat().st_size == 16


def test_read_ledger_ignores_torn_last_id(tmp_path: Path):
    path = tmp_path / "m.ids"
    path.write_bytes(np.array([4], dtype="<i8").tobytes() + b"\x01")
    assert read_ledger(path).tolist() == [4]


def test_ledger_shorter_than_checkpoint_rejected(tmp_path: Path):
    ledger = TrainingLedger(tmp_path / "m.ids")
    ledger.append(np.array([1]))
    with pytest.raises(CheckpointError, match="ledger"):
        ledger.truncate(5)


@pytest.mark.parametrize("spec", ["nowhere:1", "checkpoint.written", "checkpoint.written:0", "export.published:x"])
def test_crash_plan_rejects_invalid_spec(spec: str):
    with pytest.raises(ConfigurationError, match="STREAMER_CRASH_AT"):
        _CrashPlan(spec)


def test_crash_plan_ignores_other_points():
    plan = _CrashPlan("export.published:1")
    plan.reached("checkpoint.written")  # would kill the test run if it matched
    assert plan.remaining == 1


def test_crash_plan_counts_down_before_the_crash():
    plan = _CrashPlan("checkpoint.written:3")
    plan.reached("checkpoint.written")
    plan.reached("checkpoint.written")
    assert plan.remaining == 1


# --- the pipeline writes the ledger and restores it with its checkpoints --------------------------


class _Record:
    def __init__(self, topic: str, offset: int, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, 0, offset, None, value


def _pipeline(tmp_path: Path) -> UpdaterPipeline:
    torch.manual_seed(0)
    source = ModelCheckpoint(FraudMLP(len(FEATURE_NAMES), (8, 4)), list(FEATURE_NAMES), {}, "0" * 64)
    settings = Settings(data_dir=tmp_path, microbatch_size=4, training_ledger=True, label_release_idle_seconds=3600.0)
    return UpdaterPipeline(settings, source)


def _records(first_id: int, count: int, start_offset: int) -> list[_Record]:
    start_ms = 1_530_403_200_000 + first_id * 60_000
    records = []
    for i in range(count):
        tx_id, when = first_id + i, start_ms + i * 60_000
        records.append(_Record("transactions", start_offset + i, orjson.dumps(transaction_event(tx_id, when, 1, 2, 10.0))))
        records.append(_Record("labels", start_offset + i, orjson.dumps(label_event(tx_id, when, tx_id % 2))))
    return records


def test_pipeline_ledger_lists_trained_ids(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    pipeline.process(_records(0, 9, 0))
    pipeline.ledger.sync()
    assert sorted(read_ledger(pipeline.ledger.path).tolist()) == list(range(8))


def test_pipeline_restore_truncates_ledger_to_checkpoint(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    pipeline.process(_records(0, 5, 0))
    data = pipeline.checkpoint_data({})
    pipeline.process(_records(5, 8, 5))  # trained after the checkpoint, then "lost" in a crash
    pipeline.ledger.close()

    resumed = _pipeline(tmp_path)
    resumed.restore(data)
    resumed.process(_records(5, 8, 5))
    resumed.ledger.sync()
    ids = read_ledger(resumed.ledger.path).tolist()
    assert sorted(ids) == list(range(12))


def test_pipeline_checkpoint_keeps_untrained_ids(tmp_path: Path):
    pipeline = _pipeline(tmp_path)
    pipeline.process(_records(0, 6, 0))
    data = pipeline.checkpoint_data({})
    assert sorted(data.join["buffer_transaction_ids"].tolist()) == [4, 5]
