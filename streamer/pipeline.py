"""The updater's per-batch processing: decode, features, label join, prequential scoring, training.

`UpdaterPipeline` is synchronous and uses nothing of Kafka beyond record fields, so it
runs in one worker thread (keeping the event loop free) and in benchmarks and tests
without a broker. Every method is called from that one thread.

Order inside a batch: labels first (they join older transactions and update the terminal
fraud counts), then transactions in event-time order (features, then scores of the live
and the frozen source model, then into the join). See `streamer.features` for why labels
go first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import CheckpointData
from .deadletter import DeadLetter, dead_letter_from
from .drift import LossDriftDetector
from .evaluation import PrequentialLog, RollingPrequential
from .events import TransactionBatch, decode_labels, decode_transactions
from .faults import crash_point
from .features import FEATURE_NAMES, FeatureState
from .ledger import TrainingLedger
from .labeljoin import DAY_MS, Joined, JoinCounts, LabelGate, LabelJoin, LabelOrigin
from .metrics import UpdaterMetrics
from .model import FraudMLP, ModelCheckpoint
from .settings import Settings
from .trainer import MicroBatchTrainer, StepResult, score_with
from .transfer import build_target

logger = logging.getLogger(__name__)

# Expiring overdue labels scans the whole join: once per event-time hour is enough for a
# deadline measured in days. Pruning feature state scans every key: once per event-time day
# keeps the state within one day of its 37-day horizon.
EXPIRE_EVERY_MS = 3_600_000
PRUNE_EVERY_MS = 86_400_000
LABEL_DELAY_QUANTILES = (0.5, 0.9, 0.99)

DUPLICATE_TRANSACTION = "duplicate transaction id"
DUPLICATE_LABEL = "duplicate label"
CONFLICTING_LABEL = "label contradicts an earlier label for this transaction"
ORPHAN_LABEL = "label for unknown transaction"


@dataclass
class BatchOutcome:
    """Result of one `process` call: the dead letters to produce and the micro-batches trained."""

    transactions: int = 0
    labels: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)


class UpdaterPipeline:
    """Feature state, label join, trainer and prequential evaluation of one target model."""

    def __init__(
        self,
        settings: Settings,
        source: ModelCheckpoint,
        metrics: UpdaterMetrics | None = None,
        initial_features: FeatureState | None = None,
    ) -> None:
        if list(source.feature_names) != list(FEATURE_NAMES):
            raise ValueError(
                f"source model features {source.feature_names} differ from this version's {list(FEATURE_NAMES)}; "
                "re-run `streamer pretrain`"
            )
        self.settings = settings
        self.metrics = metrics
        self.source = source
        self.source_model: FraudMLP = source.model.eval()
        for param in self.source_model.parameters():
            param.requires_grad_(False)
        transfer = build_target(source.model, reset_head=settings.reset_head)
        self.transferred = transfer.transferred
        self.trainer = MicroBatchTrainer(
            transfer,
            learning_rate=settings.learning_rate,
            l2sp_lambda=settings.l2sp_lambda,
            freeze_updates=settings.freeze_updates,
        )
        self.features = initial_features if initial_features is not None else FeatureState()
        self.join = self._new_join()
        self.gate = LabelGate()
        self._last_transaction_at = time.monotonic()
        self.rolling_live = RollingPrequential()
        self.rolling_source = RollingPrequential()
        self.log = PrequentialLog()
        self.drift = LossDriftDetector(settings.drift_delta, model="live", metrics=metrics)
        self.offsets: dict[str, dict[int, int]] = {}
        self.watermark_ms = 0  # newest transaction event time of any partition
        self.partition_watermarks: dict[tuple[str, int], int] = {}  # (topic, partition) -> newest event time
        self._partition_active_at: dict[tuple[str, int], float] = {}
        # Assigned (topic, partition) pairs with records not yet consumed, or with an unknown
        # end, set by the updater after each poll; None without a consumer (tests, benchmarks).
        self.partitions_behind: set[tuple[str, int]] | None = None
        self._deadline_ms = 0  # the deadline watermark never goes backwards
        self._accepted_partitions = np.zeros(0, dtype=np.int64)  # partitions of the screened transactions
        self._last_expire_ms = 0
        self._last_prune_ms = 0
        self._buffer_x: list[np.ndarray] = []
        self._buffer_y: list[np.ndarray] = []
        self._buffer_ids: list[np.ndarray] = []
        self._buffered = 0
        self._buffer_since = time.monotonic()
        self.recent_features = np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
        self.served_version = 0  # newest exported snapshot version; recorded with each score
        self.batches_since_export = 0
        self.counters = {"transactions": 0, "labels": 0, "examples": 0, "microbatches": 0, "dead_letters": 0}
        self.ledger = (
            TrainingLedger(settings.data_dir / "ledger" / f"{settings.model_name}.ids")
            if settings.training_ledger else None
        )

    def _new_join(self) -> LabelJoin:
        return LabelJoin(len(FEATURE_NAMES), deadline_days=self.settings.label_deadline_days,
                         policy=self.settings.label_deadline_policy, joined_memory=self.settings.dedup_window)

    # -- processing ---------------------------------------------------------------------------

    def process(self, records: list, next_offsets: dict[tuple[str, int], int] | None = None) -> BatchOutcome:
        """Process consumer records (objects with topic, partition, offset, key, value) of both topics.

        ``next_offsets`` maps (topic, partition) to the offset after the last record of this
        batch. The consumer has it per partition, which saves a pass over the records.
        """
        outcome = BatchOutcome()
        topics = self.settings.topics
        tx_records = [r for r in records if r.topic == topics.transactions]
        label_records = [r for r in records if r.topic == topics.labels]
        if label_records:
            self._process_labels(label_records, outcome)
        if tx_records:
            self._process_transactions(tx_records, outcome)
            self._last_transaction_at = time.monotonic()
        self._release_labels(outcome, self._label_release_watermark())
        if self.watermark_ms - self._last_expire_ms >= EXPIRE_EVERY_MS:
            self._expire(outcome)
        self._train_full_batches(outcome)
        self._advance_offsets(records, next_offsets)
        self.counters["dead_letters"] += len(outcome.dead_letters)
        if self.metrics is not None:
            self.metrics.pending_labels.set(self.join.pending)
        return outcome

    def _process_labels(self, records: list, outcome: BatchOutcome) -> None:
        # NOTE: label times are not checked against the watermark, because a label consumer may
        # legitimately run far ahead. A label dated years ahead waits in the gate until an idle
        # release, and then never expires as an orphan.
        batch = decode_labels([r.value for r in records])
        outcome.dead_letters += [dead_letter_from(records[bad.index], bad.reason) for bad in batch.rejected]
        outcome.labels = len(batch)
        self.counters["labels"] += len(batch)
        if not len(batch):
            return
        valid = [records[i] for i in batch.index.tolist()]
        partitions = np.fromiter((r.partition for r in valid), np.int64, len(valid))
        self._track_partitions(self.settings.topics.labels, partitions, batch.event_time_ms)
        self.gate.add(
            {
                "transaction_id": batch.transaction_id, "label": batch.label, "event_time_ms": batch.event_time_ms,
                "partition": partitions,
                "offset": np.fromiter((r.offset for r in valid), np.int64, len(valid)),
            },
            [r.value for r in valid],
            [r.key for r in valid],
        )

    def _release_labels(self, outcome: BatchOutcome, watermark_ms: int | None) -> None:
        """Join the labels whose event time the transactions have reached (all of them for None)."""
        columns, values, keys = self.gate.release(watermark_ms)
        if not len(values):
            return

        def origin_at(i: int) -> LabelOrigin:
            return LabelOrigin(int(columns["partition"][i]), int(columns["offset"][i]), keys[i], bytes(values[i]))

        joined, counts = self.join.add_labels(
            columns["transaction_id"], columns["label"], columns["event_time_ms"], origin_at
        )
        rejected = [(i, CONFLICTING_LABEL) for i in counts.conflicting_positions]
        if self.settings.dead_letter_duplicate_labels:
            rejected += [(i, DUPLICATE_LABEL) for i in counts.duplicate_label_positions]
        for i, reason in sorted(rejected):
            outcome.dead_letters.append(self._label_dead_letter(origin_at(i), reason))
        self._count_join(counts)
        self._observe_label_delay(joined, columns)
        self._accept_joined(joined)

    def _label_dead_letter(self, origin: LabelOrigin, reason: str) -> DeadLetter:
        return DeadLetter(self.settings.topics.labels, origin.partition, origin.offset, origin.key, origin.value, reason)

    def _label_release_watermark(self) -> int | None:
        """Labels up to the transaction watermark; every label once transactions have been idle."""
        if time.monotonic() - self._last_transaction_at >= self.settings.label_release_idle_seconds:
            return None
        return self.watermark_ms

    def _process_transactions(self, records: list, outcome: BatchOutcome) -> None:
        batch = decode_transactions([r.value for r in records])
        outcome.dead_letters += [dead_letter_from(records[bad.index], bad.reason) for bad in batch.rejected]
        if not len(batch):
            return
        # Several partitions interleave in one poll: restore event-time order (stable, so each
        # partition keeps its own order for equal times).
        order = np.argsort(batch.event_time_ms, kind="stable")
        order = self._screen_transactions(records, batch, order, outcome)
        outcome.transactions = len(order)
        self.counters["transactions"] += len(order)
        if not len(order):
            return
        columns = {
            "transaction_id": batch.transaction_id[order],
            "event_time_ms": batch.event_time_ms[order],
            "customer_id": batch.customer_id[order],
            "terminal_id": batch.terminal_id[order],
        }
        features = self.features.transform_transactions(
            columns["event_time_ms"], columns["customer_id"], columns["terminal_id"], batch.amount[order]
        )
        self.recent_features = features
        columns["live_score"] = self.trainer.score(features)
        columns["source_score"] = score_with(self.source_model, features)
        columns["model_version"] = np.full(len(order), self.served_version, dtype=np.int32)
        joined, counts = self.join.add_transactions(columns, features)
        self._count_join(counts)
        self._watermark(int(columns["event_time_ms"][-1]))
        self._track_partitions(self.settings.topics.transactions, self._accepted_partitions, columns["event_time_ms"])
        self._accept_joined(joined)

    def _screen_transactions(
        self, records: list, batch: TransactionBatch, order: np.ndarray, outcome: BatchOutcome
    ) -> np.ndarray:
        """Dead-letter transactions outside the event-time window or seen before; return the order of the rest.

        Both run before the features, so a rejected transaction changes no state.
        """
        # Each partition is judged against its own watermark, because partitions are consumed
        # at different paces. In a fast replay one ran 14 event-time days ahead of another, so
        # a valid transaction may lag the newest time of the whole stream by more than any limit.
        # NOTE: the first transaction of a partition sets its watermark, so a corrupt but
        # in-range time there makes later valid ones of that partition look too old.
        times = batch.event_time_ms[order]
        partitions = np.fromiter((records[i].partition for i in batch.index[order].tolist()), np.int64, len(order))
        reasons, topic = [], self.settings.topics.transactions
        for partition in np.unique(partitions).tolist():
            positions = np.flatnonzero(partitions == partition)
            first_in_input = positions[int(np.argmin(order[positions]))]
            watermark_ms = self.partition_watermarks.get((topic, partition)) or int(times[first_in_input])
            found = _event_time_reasons(
                times[positions], watermark_ms, int(self.settings.max_event_time_skew_days * DAY_MS),
                self.join.deadline_ms,
            )
            reasons += [(int(positions[i]), reason) for i, reason in found]
        keep = np.ones(len(order), dtype=bool)
        for position, reason in reasons:
            keep[position] = False
            outcome.dead_letters.append(dead_letter_from(records[batch.index[order[position]]], reason))
        order = order[keep]
        self._accepted_partitions = partitions[keep]
        seen = self.join.seen(batch.transaction_id[order])
        for i in order[seen].tolist():
            outcome.dead_letters.append(dead_letter_from(records[batch.index[i]], DUPLICATE_TRANSACTION))
        self._accepted_partitions = self._accepted_partitions[~seen]
        return order[~seen]

    def _accept_joined(self, joined: Joined) -> None:
        """Feed joined examples to the terminal fraud counts, the evaluation and the training buffer."""
        if not len(joined):
            return
        cols = joined.columns
        self.features.observe_labels(cols["event_time_ms"], cols["terminal_id"], joined.label)
        if not joined.expired:
            self.rolling_live.update(joined.label, cols["live_score"])
            self.rolling_source.update(joined.label, cols["source_score"])
            self.log.append(
                transaction_id=cols["transaction_id"], event_time_ms=cols["event_time_ms"],
                customer_id=cols["customer_id"], label=joined.label, live_score=cols["live_score"],
                source_score=cols["source_score"], model_version=cols["model_version"],
            )
            self.drift.update(joined.label, cols["live_score"], cols["event_time_ms"], self.watermark_ms)
        if self._buffered == 0:
            self._buffer_since = time.monotonic()
        self._buffer_x.append(joined.features)
        self._buffer_y.append(joined.label)
        self._buffer_ids.append(cols["transaction_id"])
        self._buffered += len(joined)

    def _observe_label_delay(self, joined: Joined, labels: dict[str, np.ndarray]) -> None:
        """Set the label-delay quantiles: label event time minus transaction event time, per joined pair.

        Only labels joined to a waiting transaction count. A label that came before its
        transaction (held as early) is left out, because the join does not return its time.
        """
        if self.metrics is None or not len(joined):
            return
        order = np.argsort(labels["transaction_id"], kind="stable")
        sorted_ids = labels["transaction_id"][order]
        found = np.minimum(np.searchsorted(sorted_ids, joined.columns["transaction_id"]), len(sorted_ids) - 1)
        label_time_ms = labels["event_time_ms"][order][found]
        delays = np.maximum(label_time_ms - joined.columns["event_time_ms"], 0) / 1000.0
        for quantile, value in zip(LABEL_DELAY_QUANTILES, np.quantile(delays, LABEL_DELAY_QUANTILES).tolist()):
            self.metrics.label_delay.labels(str(quantile)).set(value)

    def _count_join(self, counts: JoinCounts) -> None:
        m = self.metrics
        if m is None:
            return
        m.labels_joined.inc(counts.joined)
        if counts.expired:
            m.labels_expired.labels(self.join.policy).inc(counts.expired)
        for reason in ("duplicate_labels", "conflicting_labels", "orphan_labels"):
            value = getattr(counts, reason)
            if value:
                m.labels_rejected.labels(reason.removesuffix("_labels")).inc(value)

    def _watermark(self, event_time_ms: int) -> None:
        if event_time_ms > self.watermark_ms:
            self.watermark_ms = event_time_ms
            if self._last_expire_ms == 0:
                self._last_expire_ms = event_time_ms

    def _track_partitions(self, topic: str, partitions: np.ndarray, times: np.ndarray) -> None:
        now = time.monotonic()
        for partition in np.unique(partitions).tolist():
            newest = int(times[partitions == partition].max())
            key = (topic, partition)
            self.partition_watermarks[key] = max(newest, self.partition_watermarks.get(key, 0))
            self._partition_active_at[key] = now

    def deadline_watermark(self) -> int:
        """Event time at which label deadlines are judged: the slowest partition not yet caught up.

        Partitions of both topics are consumed at different paces: in a fast replay one ran 14
        event-time days ahead of another. Judged by the newest time of the whole stream, a
        deadline would expire transactions whose labels are still unread in a lagging
        partition. So every partition with records still to read keeps the deadline at its
        newest event time, and one whose time is not known yet (nothing read from it) keeps
        it where it is. A caught-up partition does not count, because it has no records left.
        """
        behind = self.partitions_behind
        if behind is None:
            deadline = self._deadline_from_activity()
        elif any(p not in self.partition_watermarks for p in behind):
            deadline = self._deadline_ms
        else:
            deadline = min((self.partition_watermarks[p] for p in behind), default=self.watermark_ms)
        self._deadline_ms = max(self._deadline_ms, deadline)
        return self._deadline_ms

    def _deadline_from_activity(self) -> int:
        # Without consumer positions: a partition that delivered within the last
        # label_release_idle_seconds counts as behind.
        # NOTE: a partition that has delivered nothing yet, or that a starved process did not
        # fetch for that long, does not hold the deadline back here.
        now = time.monotonic()
        idle = self.settings.label_release_idle_seconds
        active = [w for p, w in self.partition_watermarks.items() if now - self._partition_active_at.get(p, 0) < idle]
        return min(active) if active else self.watermark_ms

    def _expire(self, outcome: BatchOutcome) -> None:
        self._last_expire_ms = self.watermark_ms
        joined, counts = self.join.expire(self.deadline_watermark())
        for tx_id, origin in counts.orphans:
            if origin is None:  # held before a restore from a checkpoint without label origins
                logger.warning("orphan label dropped without a dead letter transaction_id=%d", tx_id)
                continue
            outcome.dead_letters.append(self._label_dead_letter(origin, ORPHAN_LABEL))
        self._count_join(counts)
        self._accept_joined(joined)
        if self.watermark_ms - self._last_prune_ms >= PRUNE_EVERY_MS:
            self._last_prune_ms = self.watermark_ms
            self.features.prune(self.watermark_ms)

    def _advance_offsets(self, records: list, next_offsets: dict[tuple[str, int], int] | None) -> None:
        if next_offsets is None:
            next_offsets = {}
            for r in records:
                next_offsets[(r.topic, r.partition)] = max(r.offset + 1, next_offsets.get((r.topic, r.partition), 0))
        for (topic, partition), offset in next_offsets.items():
            parts = self.offsets.setdefault(topic, {})
            if offset > parts.get(partition, 0):
                parts[partition] = offset

    # -- training -----------------------------------------------------------------------------

    def _train_full_batches(self, outcome: BatchOutcome) -> None:
        size = self.settings.microbatch_size
        if self._buffered < size:
            return
        x, y, ids = self._take_buffer()
        start = 0
        while len(y) - start >= size:
            outcome.steps.append(self._train(x[start:start + size], y[start:start + size], ids[start:start + size]))
            start += size
        self._buffer_x, self._buffer_y, self._buffer_ids = [x[start:]], [y[start:]], [ids[start:]]
        self._buffered = len(y) - start
        self._buffer_since = time.monotonic()

    def _buffer_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the joined, not yet trained examples as (features, labels, transaction ids)."""
        x = np.concatenate(self._buffer_x) if self._buffer_x else np.zeros((0, len(FEATURE_NAMES)), np.float32)
        y = np.concatenate(self._buffer_y) if self._buffer_y else np.zeros(0, np.int8)
        ids = np.concatenate(self._buffer_ids) if self._buffer_ids else np.zeros(0, np.int64)
        return x.astype(np.float32, copy=False), y.astype(np.int8, copy=False), ids.astype(np.int64, copy=False)

    def _take_buffer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = self._buffer_arrays()
        self._buffer_x, self._buffer_y, self._buffer_ids, self._buffered = [], [], [], 0
        return arrays

    def on_idle(self) -> BatchOutcome:
        """Called when a poll returned nothing: release idle labels, train a stale micro-batch."""
        outcome = BatchOutcome()
        if len(self.gate):
            self._release_labels(outcome, self._label_release_watermark())
            self._train_full_batches(outcome)
        outcome.steps += self.train_if_stale()
        self.counters["dead_letters"] += len(outcome.dead_letters)
        if self.metrics is not None:
            self.metrics.pending_labels.set(self.join.pending)
        return outcome

    def train_if_stale(self) -> list[StepResult]:
        """Train a partial micro-batch once it is older than the configured maximum age."""
        if self._buffered == 0 or time.monotonic() - self._buffer_since < self.settings.microbatch_max_age_seconds:
            return []
        return [self._train(*self._take_buffer())]

    def _train(self, x: np.ndarray, y: np.ndarray, transaction_ids: np.ndarray) -> StepResult:
        result = self.trainer.step(x, y)
        crash_point("microbatch.trained")
        self.counters["microbatches"] += 1
        if result.applied and self.ledger is not None:
            self.ledger.append(transaction_ids)
        if not result.applied:
            # The examples came from labels read up to these offsets; the model is unchanged.
            logger.warning("non-finite micro-batch not applied examples=%d input_offsets=%s",
                           result.examples, self.offsets)
        if result.applied:
            self.counters["examples"] += result.examples
            self.batches_since_export += 1
        m = self.metrics
        if m is not None:
            m.microbatches.labels("applied" if result.applied else "skipped_nonfinite").inc()
            m.microbatch_duration.observe(result.seconds)
            if result.applied:
                m.examples_trained.inc(result.examples)
                m.training_loss.set(result.loss)
        return result

    # -- evaluation, export and checkpoint ------------------------------------------------------

    def prequential_metrics(self) -> dict[str, float]:
        values = {
            "live_auc": self.rolling_live.auc(), "live_average_precision": self.rolling_live.average_precision(),
            "source_auc": self.rolling_source.auc(),
            "source_average_precision": self.rolling_source.average_precision(),
            "judged": float(self.rolling_live.count),
        }
        if self.metrics is not None:
            for model, rolling in (("live", self.rolling_live), ("source", self.rolling_source)):
                auc, ap = rolling.auc(), rolling.average_precision()
                if np.isfinite(auc):
                    self.metrics.prequential_auc.labels(model).set(auc)
                if np.isfinite(ap):
                    self.metrics.prequential_ap.labels(model).set(ap)
        return values

    def checkpoint_data(self, extra_meta: dict) -> CheckpointData:
        meta = {
            "model_name": self.settings.model_name, "watermark_ms": self.watermark_ms,
            "partition_watermarks": [[t, p, w] for (t, p), w in self.partition_watermarks.items()],
            "served_version": self.served_version, "counters": dict(self.counters),
            "source_sha256": self.source.sha256, **extra_meta,
        }
        join = self.join.state_dict()
        # Joined but not yet trained examples: their labels' offsets are already in this checkpoint.
        join["buffer_features"], join["buffer_labels"], join["buffer_transaction_ids"] = self._buffer_arrays()
        if self.ledger is not None:
            meta["ledger_ids"] = self.ledger.sync()
        join.update(self.gate.state_dict())
        return CheckpointData(
            trainer=self.trainer.state_dict(), features=self.features.state_dict(), join=join,
            offsets={t: dict(p) for t, p in self.offsets.items()}, meta=meta,
        )

    def restore(self, data: CheckpointData) -> None:
        """Continue from a checkpoint: model, optimiser, features, join, offsets and counters."""
        if data.meta.get("source_sha256") != self.source.sha256:
            logger.warning(
                "checkpoint was trained from source sha256=%s, now configured source sha256=%s; "
                "continuing from the checkpoint", str(data.meta.get("source_sha256"))[:12], self.source.sha256[:12],
            )
        self.trainer.load_state_dict(data.trainer)
        self.features = FeatureState.from_state_dict(data.features)
        self.join = self._new_join()
        self.join.load_state_dict(data.join)
        self.gate = LabelGate()
        self.gate.load_state_dict(data.join)
        self._buffer_x = [np.asarray(data.join["buffer_features"], dtype=np.float32).reshape(-1, len(FEATURE_NAMES))]
        self._buffer_y = [np.asarray(data.join["buffer_labels"], dtype=np.int8)]
        self._buffered = len(self._buffer_y[0])
        # Checkpoints written before ids were kept: -1 marks an unknown id in the ledger.
        ids = data.join.get("buffer_transaction_ids", np.full(self._buffered, -1, dtype=np.int64))
        self._buffer_ids = [np.asarray(ids, dtype=np.int64)]
        self._buffer_since = time.monotonic()
        if self.ledger is not None and "ledger_ids" in data.meta:
            self.ledger.truncate(int(data.meta["ledger_ids"]))
        self.offsets = {t: dict(p) for t, p in data.offsets.items()}
        self.watermark_ms = int(data.meta.get("watermark_ms", 0))
        self.partition_watermarks = {(str(t), int(p)): int(w) for t, p, w in data.meta.get("partition_watermarks", [])}
        self._last_expire_ms = self.watermark_ms
        self.served_version = int(data.meta.get("served_version", 0))
        self.counters.update(data.meta.get("counters", {}))

    def set_threads(self) -> None:
        """Limit torch to one intra-op thread in the calling thread's process (call once, in the pipeline thread)."""
        torch.set_num_threads(1)


def _event_time_reasons(
    times: np.ndarray, watermark_ms: int, max_ahead_ms: int, max_behind_ms: int
) -> list[tuple[int, str]]:
    """Return (position, reason) of the sorted event times too far ahead of or behind the watermark.

    Each accepted time moves the watermark, so a time is judged against the newest accepted
    time before it. After the first gap of more than ``max_ahead_ms``, every later time is
    rejected too, because rejected times do not move the watermark.
    """
    newest_before = np.maximum(watermark_ms, np.concatenate(([watermark_ms], times[:-1])))
    ahead = np.logical_or.accumulate(times > newest_before + max_ahead_ms)
    behind = times < watermark_ms - max_behind_ms
    reasons = []
    for position in np.flatnonzero(behind).tolist():
        reasons.append((position, (
            f"event_time {int(times[position])} is {(watermark_ms - int(times[position])) / DAY_MS:.1f} days "
            f"behind the transaction watermark {watermark_ms}, beyond the label deadline of "
            f"{max_behind_ms / DAY_MS:g} days (STREAMER_LABEL_DEADLINE_DAYS)"
        )))
    if ahead.any():
        accepted_ms = int(newest_before[int(np.argmax(ahead))])
        for position in np.flatnonzero(ahead).tolist():
            reasons.append((position, (
                f"event_time {int(times[position])} is {(int(times[position]) - accepted_ms) / DAY_MS:.1f} days "
                f"ahead of the transaction watermark {accepted_ms}, beyond the limit of "
                f"{max_ahead_ms / DAY_MS:g} days (STREAMER_MAX_EVENT_TIME_SKEW_DAYS)"
            )))
    return reasons
