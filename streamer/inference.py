"""The inference worker: scores every transaction with the newest announced snapshot.

It consumes `transactions` (to score) and `labels` (only to keep the terminal fraud-rate
features current, exactly as the updater computes them), and `model-snapshots` without a
consumer group, so that every worker receives every announcement. Scores go to
`fraud-scores` in the partition of their transaction, keyed by customer id.

A snapshot is verified (SHA-256, feature schema, probe batch) and swapped in between two
batches; a bad one is rejected and logged while the previous one keeps serving. Pins and
unpins on the same topic override "newest" (`streamer.snapshot_follower`). No transaction
is scored before the snapshot to serve at start is loaded.

The feature state is checkpointed with the offsets it includes (`streamer.inference_state`)
every ``inference_checkpoint_interval_seconds``, and only then are those offsets committed.
A restarted worker restores the newest checkpoint and seeks to its offsets, so that every
transaction is scored at least once, with the features an uninterrupted worker computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from . import health
from .deadletter import DeadLetter, dead_letter_from
from .errors import BrokerError, CheckpointError
from .events import decode_labels, decode_transactions
from .features import FeatureState
from .health import Check, HealthReport
from .inference_state import InferenceCheckpoints, InferenceState, assigned_offsets
from .kafka import consumer_kwargs, consumer_lag, producer_kwargs
from .labeljoin import LabelJoin
from .metrics import InferenceMetrics
from .retry import RetainedSend, commit, reset_positions_beyond_end, retry
from .scoring import ServedModel, score
from .settings import Settings
from .snapshot_follower import SnapshotFollower

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
MAX_RECORDS_PER_POLL = 4000
# Produce requests (score batches and dead letters) allowed in flight before waiting for acks.
MAX_INFLIGHT_SENDS = 64


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "InferenceWorker") -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        pass  # the offsets of the last checkpoint are committed already, or at the next one

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.seek_assigned(assigned)


class InferenceWorker:
    """Consumes, featurises, scores and publishes; follows snapshot announcements."""

    def __init__(
        self, settings: Settings, metrics: InferenceMetrics, worker_id: str = "inference",
        initial_features: FeatureState | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.worker_id = worker_id
        # A checkpoint, when there is one, replaces the initial features in start().
        self.state = InferenceState(
            initial_features if initial_features is not None else FeatureState(),
            # Only the transaction time and terminal are needed when a label comes.
            LabelJoin(0, deadline_days=settings.label_deadline_days, policy="drop", joined_memory=100_000),
        )
        self.checkpoints = InferenceCheckpoints(settings.inference_checkpoint_dir(worker_id))
        self._score_thread = ThreadPoolExecutor(1, thread_name_prefix="score")
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="snapshot-load")
        self.snapshot_follower = SnapshotFollower(settings.model_name, metrics, self._load_thread)
        self._consumer: AIOKafkaConsumer | None = None
        self._snapshots: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._model_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_checkpoint = time.monotonic()
        # Sent but not yet acknowledged, kept with their records so that they can be sent again.
        self._inflight: list[RetainedSend] = []

    @property
    def served(self) -> ServedModel | None:
        """The snapshot being served, None before the first one is loaded."""
        return self.snapshot_follower.served

    @served.setter
    def served(self, served: ServedModel | None) -> None:
        self.snapshot_follower.served = served

    @property
    def features(self) -> FeatureState:
        return self.state.features

    @property
    def scored(self) -> int:
        """Transactions scored; a restarted worker counts on from its checkpoint."""
        return self.state.scored

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the newest checkpoint, connect, and start following snapshots and scoring.

        Raises:
            CheckpointError: the newest checkpoint is corrupt or of another kind.
        """
        s = self.settings
        await self._in_score_thread(self.checkpoints.restore_latest, self.state)
        self._producer = AIOKafkaProducer(**producer_kwargs(s))
        await self._producer.start()
        snapshot_kwargs = consumer_kwargs(s, group_id=None)
        self._snapshots = AIOKafkaConsumer(**snapshot_kwargs)
        await self._snapshots.start()
        tp = TopicPartition(s.topics.model_snapshots, 0)
        self._snapshots.assign([tp])
        await self._snapshots.seek_to_beginning(tp)
        self._consumer = AIOKafkaConsumer(**consumer_kwargs(s, group_id=f"{s.consumer_group_prefix}-inference"))
        await self._consumer.start()
        self._consumer.subscribe([s.topics.transactions, s.topics.labels], listener=_Rebalance(self))
        self._tasks = [
            asyncio.create_task(self._follow_snapshots(), name="snapshot-follower"),
            asyncio.create_task(self._run(), name="inference-loop"),
        ]
        logger.info("inference worker started id=%s group=%s-inference", self.worker_id, s.consumer_group_prefix)

    async def stop(self) -> None:
        """Stop scoring, write a final checkpoint, commit its offsets and disconnect."""
        self._stopping.set()
        self._model_ready.set()  # release a loop still waiting for its first snapshot
        outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        if any(isinstance(outcome, BaseException) for outcome in outcomes):
            # A batch may be in the state without its scores sent: keep the last good checkpoint.
            logger.error("inference loop had failed or was cancelled; stopping without a final checkpoint")
        elif self._consumer is not None:
            await self.checkpoint()
        for client in (self._consumer, self._snapshots, self._producer):
            if client is not None:
                await client.stop()
        self._score_thread.shutdown()
        self._load_thread.shutdown()
        logger.info("inference worker stopped id=%s scored=%d", self.worker_id, self.scored)

    async def seek_assigned(self, assigned) -> None:
        """Seek newly assigned partitions to the offsets that the feature state includes.

        The offsets are read in the score thread, after the batch it may be processing, so
        that no record is applied to the state twice.

        NOTE: one state covers every partition this worker consumed. With several workers in
        the group, a partition that moves to another worker resumes with that worker's state.
        """
        offsets = await self._in_score_thread(self.state.copy_offsets)
        for tp in assigned:
            offset = offsets.get(tp.topic, {}).get(tp.partition)
            if offset is not None:
                self._consumer.seek(tp, offset)
        logger.info("partitions assigned %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

    async def _in_score_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._score_thread, fn, *args)

    # -- health and HTTP scoring ----------------------------------------------------------------

    def liveness(self) -> HealthReport:
        """Report whether the snapshot follower and the scoring loop run (see `streamer.health`)."""
        return health.liveness(self._tasks, self._stopping.is_set())

    def readiness(self) -> HealthReport:
        """Report whether the worker scores: started, partitions assigned, a snapshot served, broker reachable."""
        served = self.served
        model = (Check(True, f"serving snapshot version {served.version}") if served is not None
                 else Check(False, "no snapshot served yet"))
        return health.readiness(started=bool(self._tasks), stopping=self._stopping.is_set(),
                                consumer=self._consumer, model=model, metrics=self.metrics)

    async def peek_features(self, event_time_ms: int, customer_id: int, terminal_id: int, amount: float) -> np.ndarray:
        """Compute one transaction's features from the current state without adding it (one float32 row).

        It runs in the score thread, between two batches, because only that thread reads or
        changes the state.

        Raises:
            RuntimeError: the worker has stopped, so its score thread is shut down.
        """
        return await self._in_score_thread(
            lambda: self.features.peek_transaction(event_time_ms, customer_id, terminal_id, amount)
        )

    # -- snapshots ----------------------------------------------------------------------------

    async def _follow_snapshots(self) -> None:
        while not self._stopping.is_set():
            batches = await self._snapshots.getmany(timeout_ms=POLL_TIMEOUT_MS)
            await self.snapshot_follower.follow([r for part in batches.values() for r in part])
            if not batches:
                await reset_positions_beyond_end(self._snapshots)
            if self.served is not None and not self._model_ready.is_set() and await self._read_to_end():
                self._model_ready.set()

    async def _read_to_end(self) -> bool:
        # The high watermark comes with each fetch response and, unlike end_offsets(), is
        # exact on the embedded broker.
        tp = TopicPartition(self.settings.topics.model_snapshots, 0)
        highwater = self._snapshots.highwater(tp)
        return highwater is not None and await self._snapshots.position(tp) >= highwater

    # -- scoring loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._model_ready.is_set():
            try:
                await asyncio.wait_for(self._model_ready.wait(), timeout=10)
            except asyncio.TimeoutError:
                logger.info("waiting for the first snapshot on topic=%s", self.settings.topics.model_snapshots)
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL)
            self.metrics.set_consumer_lag(await consumer_lag(self._consumer))
            records = [r for part in batches.values() for r in part]
            if records:
                polled = time.perf_counter()
                scored, letters = await self._in_score_thread(self._process, records)
                await self._publish(scored, letters)
                self.metrics.batch_duration.observe(time.perf_counter() - polled)
                self.metrics.count_consumed(batches)
            else:
                reset = await reset_positions_beyond_end(self._consumer)
                if reset:
                    await self._in_score_thread(self.state.forget, reset)
            if time.monotonic() - self._last_checkpoint >= self.settings.inference_checkpoint_interval_seconds:
                await self.checkpoint()

    def _process(self, records: list) -> tuple[list[tuple[int, bytes, bytes]], list[DeadLetter]]:
        """Labels then transactions of one poll; return (partition, key, value) score records."""
        topics = self.settings.topics
        letters: list[DeadLetter] = []
        self.state.advance(records)
        label_records = [r for r in records if r.topic == topics.labels]
        # NOTE: labels apply at once, without the updater's event-time gate. The features still
        # match the updater's for label delays up to the 7-day terminal delay, because a
        # terminal window never reaches a label that recent. A longer delay can differ.
        if label_records:
            labels = decode_labels([r.value for r in label_records])
            letters += [dead_letter_from(label_records[b.index], b.reason) for b in labels.rejected]
            self.state.observe_labels(labels)
        tx_records = [r for r in records if r.topic == topics.transactions]
        if not tx_records:
            return [], letters
        batch = decode_transactions([r.value for r in tx_records])
        letters += [dead_letter_from(tx_records[b.index], b.reason) for b in batch.rejected]
        if not len(batch):
            return [], letters
        order = np.argsort(batch.event_time_ms, kind="stable")
        started = time.perf_counter()
        features = self.features.transform_transactions(
            batch.event_time_ms[order], batch.customer_id[order], batch.terminal_id[order], batch.amount[order]
        )
        served = self.served  # read once: the whole batch is scored by one snapshot
        scores = score(served, features)
        self.metrics.latency.observe((time.perf_counter() - started) / len(order))
        self.state.remember_transactions(batch, order)
        self.state.scored += len(order)
        return self._encode_scores(batch, order, scores, served.version, tx_records), letters

    @staticmethod
    def _encode_scores(batch, order, scores, version, tx_records) -> list[tuple[int, bytes, bytes]]:
        scored_at = int(time.time() * 1000)
        dumps = orjson.dumps
        out = []
        for position, tx_id, probability in zip(
            batch.index[order].tolist(), batch.transaction_id[order].tolist(), scores.tolist()
        ):
            record = tx_records[position]
            value = dumps({"transaction_id": tx_id, "score": probability, "model_version": version,
                           "scored_at": scored_at})
            out.append((record.partition, record.key, value))
        return out

    async def _publish(self, scored: list[tuple[int, bytes, bytes]], letters: list[DeadLetter]) -> None:
        sends = await self._send_scores(scored)
        if letters:
            sends.append(await self._send_dead_letters(letters))

        # Acknowledgements are awaited before the next commit, not here, so that scoring the
        # next poll overlaps the broker round trip (at-least-once: commit after ack).
        self._inflight.extend(sends)
        if len(self._inflight) > MAX_INFLIGHT_SENDS:
            await self._await_inflight()
        self.metrics.scored.inc(len(scored))

    async def _send_scores(self, scored: list[tuple[int, bytes, bytes]]) -> list[RetainedSend]:
        """Send score records in one batch per partition (more when a batch is full)."""
        topic = self.settings.topics.fraud_scores
        sends: list[RetainedSend] = []
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for partition, key, value in scored:
            by_partition.setdefault(partition, []).append((key, value))

        for partition, rows in by_partition.items():
            send = RetainedSend(topic, partition, [])
            batch = self._producer.create_batch()
            for key, value in rows:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    send.futures.append(await self._producer.send_batch(batch, topic, partition=partition))
                    sends.append(send)
                    send = RetainedSend(topic, partition, [])
                    batch = self._producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                send.records.append((key, value, None))
            send.futures.append(await self._producer.send_batch(batch, topic, partition=partition))
            sends.append(send)
        return sends

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> RetainedSend:
        send = RetainedSend(self.settings.topics.dead_letter, None, [])
        for letter in letters:
            self.metrics.invalid_events.labels(letter.topic).inc()
            logger.warning("invalid event sent to dead-letter topic=%s partition=%d offset=%d reason=%s",
                           letter.topic, letter.partition, letter.offset, letter.reason)
            headers = letter.headers(self.worker_id)
            send.records.append((letter.key, letter.value, headers))
            send.futures.append(await self._producer.send(send.topic, letter.value, key=letter.key, headers=headers))
        return send

    async def _await_inflight(self) -> None:
        """Wait until the broker acknowledged every sent record, sending failed ones again.

        Raises:
            BrokerError: a send failed while the worker is stopping; the unacknowledged
                sends stay in ``_inflight``.
        """
        while self._inflight:
            send = self._inflight[0]
            await retry("produce", lambda: send.acknowledged(self._producer), metrics=self.metrics,
                        stop_event=self._stopping)
            self._inflight.pop(0)

    async def checkpoint(self) -> None:
        """Write a checkpoint of the state if it changed, then commit the checkpoint's offsets.

        Steps: 1. wait until the broker acknowledged every score and dead letter sent, because
        a restart resumes after the checkpoint's offsets; 2. write the checkpoint in the score
        thread, between two batches; 3. commit its offsets. The offsets of the newest checkpoint
        are committed at every call, also when unchanged, because committing them again is
        idempotent, and a failed commit shows a broker outage in the metrics while no record
        comes.
        """
        self._last_checkpoint = time.monotonic()
        try:
            await self._await_inflight()
        except BrokerError as exc:
            logger.warning("no checkpoint written, because sends are unacknowledged at stop error=%s", exc)
            return
        meta = {"worker_id": self.worker_id, "model_name": self.settings.model_name,
                "served_version": self.served.version if self.served is not None else None}
        started = time.perf_counter()
        try:
            written = await self._in_score_thread(self.checkpoints.save_if_changed, self.state, meta)
        except (OSError, CheckpointError) as exc:
            logger.error("inference checkpoint failed, so the offsets consumed since the last one stay uncommitted "
                         "directory=%s error=%r", self.checkpoints.store.directory, exc)
            return
        if written:
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
        to_commit = assigned_offsets(self.checkpoints.offsets, self._consumer.assignment())
        if to_commit:
            await commit(self._consumer, to_commit, metrics=self.metrics)
