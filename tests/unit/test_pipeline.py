"""UpdaterPipeline without a broker: label gating in event time, and checkpoint/restore equivalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from helpers import Record
from streamer.checkpoint import CheckpointStore
from streamer.events import label_event, transaction_event
from streamer.features import FEATURE_NAMES
from streamer.model import FraudMLP, ModelCheckpoint
from streamer.pipeline import UpdaterPipeline
from streamer.settings import Settings

DAY_MS = 86_400_000
START_MS = 1_530_403_200_000  # 2018-07-01T00:00:00Z


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _source() -> ModelCheckpoint:
    torch.manual_seed(0)
    return ModelCheckpoint(FraudMLP(len(FEATURE_NAMES), (8, 4)), list(FEATURE_NAMES), {}, "0" * 64)


def _settings(tmp_path: Path, **changes) -> Settings:
    # A long idle time: these tests release labels only through the watermark unless they set it lower.
    defaults = dict(data_dir=tmp_path, microbatch_size=32, label_release_idle_seconds=3600.0)
    return Settings(**{**defaults, **changes})


def _stream(n: int, seed: int = 1) -> list[Record]:
    """n transactions, one every 10 minutes, and their labels 7 days later, merged in event time."""
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        t = START_MS + i * 600_000
        fraud = int(rng.random() < 0.1)
        amount = float(round(rng.uniform(1, 300) * (3 if fraud else 1), 2))
        tx = transaction_event(i, t, int(rng.integers(0, 40)), int(rng.integers(0, 60)), amount)
        events.append((t, 1, "transactions", tx))
        events.append((t + 7 * DAY_MS, 0, "labels", label_event(i, t + 7 * DAY_MS, fraud)))
    events.sort(key=lambda e: (e[0], e[1]))
    offsets = {"transactions": 0, "labels": 0}
    records = []
    for _, _, topic, event in events:
        records.append(Record(topic, 0, offsets[topic], str(event["transaction_id"]).encode(), orjson.dumps(event)))
        offsets[topic] += 1
    return records


def _labels_first(records: list[Record]) -> list[Record]:
    """The same events with every label read before any transaction, as a lagging consumer might."""
    return [r for r in records if r.topic == "labels"] + [r for r in records if r.topic == "transactions"]


def test_labels_wait_for_transaction_watermark(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path), _source())
    records = _labels_first(_stream(300))
    pipeline.process(records[:300])  # all labels, no transaction yet
    assert len(pipeline.gate) == 300
    assert pipeline.join.pending == 0
    pipeline.process(records[300:])  # transactions up to about 2 days: no label time reached
    assert len(pipeline.gate) == 300
    assert pipeline.counters["examples"] == 0


def test_labels_released_as_watermark_passes(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path), _source())
    records = _stream(2000)  # about 14 days of transactions
    pipeline.process(records)
    released = 2000 - len(pipeline.gate)
    last_tx_ms = START_MS + 1999 * 600_000
    expected = sum(1 for i in range(2000) if START_MS + i * 600_000 + 7 * DAY_MS <= last_tx_ms)
    assert released == expected


def test_label_delay_metric_reads_event_time_delay(tmp_path: Path):
    from prometheus_client import CollectorRegistry

    from streamer.metrics import UpdaterMetrics

    registry = CollectorRegistry()
    pipeline = UpdaterPipeline(_settings(tmp_path), _source(), UpdaterMetrics(registry))
    pipeline.process(_stream(1100))  # every label comes 7 days after its transaction

    median = registry.get_sample_value("streamer_label_delay_seconds", {"quantile": "0.5"})
    assert median == 7 * 86_400


def test_idle_transactions_release_every_label(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path, label_release_idle_seconds=0.0), _source())
    pipeline.process(_stream(200))
    pipeline.on_idle()
    assert len(pipeline.gate) == 0
    assert len(pipeline.log) == 200


def _run(settings: Settings, batches: list[list[Record]], restore_after: int | None, store: CheckpointStore):
    pipeline = UpdaterPipeline(settings, _source())
    for i, batch in enumerate(batches):
        pipeline.process(batch)
        if restore_after is not None and i == restore_after:
            store.save(pipeline.checkpoint_data({}))
            pipeline = UpdaterPipeline(settings, _source())
            pipeline.restore(store.load_latest())
    return pipeline


def test_restore_continues_like_uninterrupted_run(tmp_path: Path):
    records = _stream(1500)
    batches = [records[lo:lo + 137] for lo in range(0, len(records), 137)]
    uninterrupted = _run(_settings(tmp_path / "a"), batches, None, CheckpointStore(tmp_path / "a" / "ckpt"))
    resumed = _run(_settings(tmp_path / "b"), batches, 11, CheckpointStore(tmp_path / "b" / "ckpt"))
    assert resumed.counters["examples"] == uninterrupted.counters["examples"]
    assert resumed.offsets == uninterrupted.offsets
    assert len(resumed.gate) == len(uninterrupted.gate)
    for name, tensor in uninterrupted.trainer.model.state_dict().items():
        assert torch.equal(resumed.trainer.model.state_dict()[name], tensor), name


def test_checkpoint_keeps_partial_microbatch(tmp_path: Path):
    settings = _settings(tmp_path, label_release_idle_seconds=0.0, microbatch_size=10_000)
    pipeline = UpdaterPipeline(settings, _source())
    pipeline.process(_stream(100))
    pipeline.on_idle()  # joins every label; far fewer than one micro-batch
    data = pipeline.checkpoint_data({})
    assert len(data.join["buffer_labels"]) == 100
    restored = UpdaterPipeline(settings, _source())
    restored.restore(data)
    assert restored._buffered == 100


# -- label deadlines wait for partitions that are behind ------------------------------------------


def _transactions(partition: int, first_id: int, count: int, start_ms: int) -> list[Record]:
    """``count`` transactions of one partition, one every hour from ``start_ms``, without labels."""
    return [
        Record("transactions", partition, i, str(first_id + i).encode(),
               orjson.dumps(transaction_event(first_id + i, start_ms + i * 3_600_000, 1, 2, 10.0)))
        for i in range(count)
    ]


def test_deadline_held_by_partition_not_read_yet(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path, label_deadline_days=1.0), _source())
    pipeline.partitions_behind = {("transactions", 0), ("transactions", 1)}

    pipeline.process(_transactions(0, 0, 96, START_MS))  # four days; partition 1 not read at all

    assert pipeline.join.pending == 96


def test_deadline_held_at_lagging_partition_time(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path, label_deadline_days=1.0), _source())
    pipeline.partitions_behind = {("transactions", 0), ("transactions", 1)}
    pipeline.process(_transactions(1, 1000, 2, START_MS))  # partition 1 stops at hour 1

    pipeline.process(_transactions(0, 0, 96, START_MS))

    assert pipeline.join.pending == 98


def test_deadline_moves_once_partition_caught_up(tmp_path: Path):
    pipeline = UpdaterPipeline(_settings(tmp_path, label_deadline_days=1.0), _source())
    pipeline.partitions_behind = {("transactions", 0), ("transactions", 1)}
    pipeline.process(_transactions(1, 1000, 2, START_MS))
    pipeline.process(_transactions(0, 0, 96, START_MS))

    pipeline.partitions_behind = {("transactions", 0)}  # partition 1 has nothing more to read
    pipeline.process(_transactions(0, 96, 2, START_MS + 96 * 3_600_000)[-1:])

    assert pipeline.join.pending < 98
