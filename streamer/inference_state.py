"""The inference worker's state and its checkpoints: feature state, label-join memory, offsets.

The features of a transaction depend on every transaction and label consumed before it.
A worker that resumed from its committed offsets with the source model's feature state
would compute later features without the events in between. So the worker saves its
state together with the offsets of the first records that the state does not include,
and a restarted worker restores it and seeks to those offsets. It then computes the same
features as a worker that was never interrupted.

On disk this is the updater's checkpoint layout (`streamer.checkpoint.CheckpointStore`)
without ``trainer.pt``: ``ckpt-NNNNNN/`` contains ``features.npz``, ``join.npz`` (loaded with
``allow_pickle=False``) and ``meta.json``, and ``LATEST`` names the newest one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiokafka import TopicPartition

from .checkpoint import CheckpointData, CheckpointStore
from .features import DAY_MS, FeatureState
from .labeljoin import LabelJoin

logger = logging.getLogger(__name__)

FORMAT = "streamer-inference-checkpoint/1"
# Pruning scans every key: once per event-time day, as in the updater, keeps the state
# within a day of its horizon. Without it the state, and each checkpoint, grows for ever.
PRUNE_EVERY_MS = DAY_MS


@dataclass
class InferenceState:
    """The worker's feature state, label-join memory and offsets. Only its score thread reads or changes them."""

    features: FeatureState
    # Transactions waiting for their label, and the ids already labelled, so that a label
    # updates the terminal fraud features once, with its transaction's time and terminal.
    labels: LabelJoin
    # topic -> partition -> next offset to read: the first record the state does not include.
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    scored: int = 0  # transactions scored from the records before ``offsets``
    # Event time of the last prune; 0 prunes at the first batch, also after a restore.
    pruned_at_ms: int = 0

    def advance(self, records: list) -> None:
        """Record that the state includes ``records`` (consumer records of one poll)."""
        for record in records:
            self.offsets.setdefault(record.topic, {})[record.partition] = record.offset + 1

    def observe_labels(self, labels) -> None:
        """Apply a decoded label batch: each label of a remembered transaction updates the features once."""
        joined, _ = self.labels.add_labels(labels.transaction_id, labels.label, labels.event_time_ms)
        self.features.observe_labels(joined.columns["event_time_ms"], joined.columns["terminal_id"], joined.label)

    def remember_transactions(self, batch, order: np.ndarray) -> None:
        """Keep the time and terminal of scored transactions (``batch`` rows in ``order``) until their label."""
        n = len(order)
        columns = {
            "transaction_id": batch.transaction_id[order], "event_time_ms": batch.event_time_ms[order],
            "customer_id": batch.customer_id[order], "terminal_id": batch.terminal_id[order],
            "live_score": np.zeros(n, np.float32), "source_score": np.zeros(n, np.float32),
            "model_version": np.zeros(n, np.int32),
        }
        joined, _ = self.labels.add_transactions(columns, np.zeros((n, 0), dtype=np.float32))
        if len(joined):
            self.features.observe_labels(joined.columns["event_time_ms"], joined.columns["terminal_id"], joined.label)
        watermark = int(columns["event_time_ms"][-1])
        self.labels.expire(watermark)
        if watermark - self.pruned_at_ms >= PRUNE_EVERY_MS:
            # Like the updater, at the newest event time: a transaction of a partition more
            # than a day behind may miss entries at the far end of its 30-day windows.
            self.features.prune(watermark)
            self.pruned_at_ms = watermark

    def forget(self, partitions: list) -> None:
        """Drop the offsets of partitions whose consumer was reset to their beginning.

        Kept, the old offsets would make a restart seek beyond the records that the
        partition contains now.
        """
        for tp in partitions:
            self.offsets.get(tp.topic, {}).pop(tp.partition, None)

    def copy_offsets(self) -> dict[str, dict[int, int]]:
        return {topic: dict(parts) for topic, parts in self.offsets.items()}

    def checkpoint_data(self, meta: dict) -> CheckpointData:
        return CheckpointData(
            trainer=None, features=self.features.state_dict(), join=self.labels.state_dict(),
            offsets=self.copy_offsets(), meta=dict(meta, scored=self.scored),
        )

    def restore(self, data: CheckpointData) -> None:
        """Replace the state with a checkpoint's; ``labels`` must still be empty.

        Raises:
            CheckpointError: the feature state is inconsistent or was saved with other windows
                than the current state's.
        """
        current = self.features
        self.features = FeatureState.from_state_dict(
            data.features,
            customer_windows_days=[ms / DAY_MS for ms in current.customer_windows_ms],
            terminal_windows_days=[ms / DAY_MS for ms in current.terminal_windows_ms],
            terminal_delay_days=current.terminal_delay_ms / DAY_MS,
        )
        self.labels.load_state_dict(data.join)
        self.offsets = {topic: dict(parts) for topic, parts in data.offsets.items()}
        self.scored = int(data.meta.get("scored", 0))


class InferenceCheckpoints:
    """Writes an `InferenceState` to its folder when it changed, and keeps the offsets it may commit."""

    def __init__(self, directory: Path) -> None:
        self.store = CheckpointStore(directory, checkpoint_format=FORMAT)
        # Offsets of the newest checkpoint written or restored: the only ones safe to commit.
        self.offsets: dict[str, dict[int, int]] = {}

    def restore_latest(self, state: InferenceState) -> bool:
        """Restore ``state`` from the newest checkpoint; return False if there is none.

        Raises:
            CheckpointError: the newest checkpoint is corrupt, of another format, or saved
                with other feature windows.
        """
        data = self.store.load_latest()
        if data is None:
            return False
        state.restore(data)
        self.offsets = state.copy_offsets()
        logger.info("inference state restored directory=%s offsets=%s scored=%d served_version=%s",
                    self.store.directory, data.offsets, state.scored, data.meta.get("served_version"))
        return True

    def save_if_changed(self, state: InferenceState, meta: dict) -> bool:
        """Write a checkpoint unless the state has consumed nothing since the last; return whether one was written.

        Call it in the thread that owns ``state``. The caller must have had every output of
        the included records acknowledged, because a restart resumes after them.
        """
        # Every change to the state comes with records, so equal offsets mean an equal state.
        # NOTE: each checkpoint writes the whole feature state (30 days of events), not the
        # change since the last one, and scoring waits for it.
        if state.offsets == self.offsets:
            return False
        data = state.checkpoint_data(meta)
        self.store.save(data)
        self.offsets = data.offsets
        return True


def assigned_offsets(offsets: dict[str, dict[int, int]], assignment: set) -> dict[TopicPartition, int]:
    """Return the offsets of the partitions in ``assignment``, keyed for ``AIOKafkaConsumer.commit``."""
    return {
        TopicPartition(topic, partition): offset
        for topic, parts in offsets.items() for partition, offset in parts.items()
        if TopicPartition(topic, partition) in assignment
    }
