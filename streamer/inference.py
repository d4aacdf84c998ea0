"""The inference worker: scores every transaction with the newest announced snapshot.

It consumes `transactions` (to score) and `labels` (only to keep the terminal fraud-rate
features current, exactly as the updater computes them), and `model-snapshots` without a
consumer group, so that every worker receives every announcement. Scores go to
`fraud-scores` in the partition of their transaction, keyed by customer id.

A snapshot is verified (SHA-256, feature schema, probe batch) and swapped in between two
batches; a bad one is rejected and logged while the previous one keeps serving. No
transaction is scored before the first snapshot is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from exporters import decode_announcement, resolve_snapshot_bytes

from .deadletter import DeadLetter, dead_letter_from
from .errors import BrokerError, SnapshotError
from .events import decode_labels, decode_transactions
from .features import FeatureState
from .kafka import consumer_kwargs, producer_kwargs
from .labeljoin import LabelJoin
from .metrics import InferenceMetrics
from .retry import RetainedSend, commit, reset_positions_beyond_end, retry
from .scoring import ServedModel, build_served_model, score
from .settings import Settings

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
MAX_RECORDS_PER_POLL = 4000
COMMIT_INTERVAL_SECONDS = 1.0
# Produce requests (score batches and dead letters) allowed in flight before waiting for acks.
MAX_INFLIGHT_SENDS = 64


class InferenceWorker:
    """Consumes, featurises, scores and publishes; follows snapshot announcements."""

    def __init__(
        self, settings: Settings, metrics: InferenceMetrics, worker_id: str = "inference",
        initial_features: FeatureState | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.worker_id = worker_id
        self.features = initial_features if initial_features is not None else FeatureState()
        # Only the transaction time and terminal are needed when a label comes.
        self._labels = LabelJoin(0, deadline_days=settings.label_deadline_days, policy="drop", joined_memory=100_000)
        self.served: ServedModel | None = None
        self._score_thread = ThreadPoolExecutor(1, thread_name_prefix="score")
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="snapshot-load")
        self._consumer: AIOKafkaConsumer | None = None
        self._snapshots: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._model_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_commit = time.monotonic()
        # Sent but not yet acknowledged, kept with their records so that they can be sent again.
        self._inflight: list[RetainedSend] = []
        self.scored = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
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
        self._consumer.subscribe([s.topics.transactions, s.topics.labels])
        self._tasks = [
            asyncio.create_task(self._follow_snapshots(), name="snapshot-follower"),
            asyncio.create_task(self._run(), name="inference-loop"),
        ]
        logger.info("inference worker started id=%s group=%s-inference", self.worker_id, s.consumer_group_prefix)

    async def stop(self) -> None:
        self._stopping.set()
        self._model_ready.set()  # release a loop still waiting for its first snapshot
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._commit()
        for client in (self._consumer, self._snapshots, self._producer):
            if client is not None:
                await client.stop()
        self._score_thread.shutdown()
        self._load_thread.shutdown()
        logger.info("inference worker stopped id=%s scored=%d", self.worker_id, self.scored)

    # -- snapshots ----------------------------------------------------------------------------

    async def _follow_snapshots(self) -> None:
        while not self._stopping.is_set():
            batches = await self._snapshots.getmany(timeout_ms=POLL_TIMEOUT_MS)
            key = self.settings.model_name.encode()
            # Several models may share the topic: only this model's newest announcement counts.
            mine = [r for part in batches.values() for r in part if r.key == key]
            if mine:
                await self._consider(mine[-1].value)
            elif not batches:
                await reset_positions_beyond_end(self._snapshots)

    async def _consider(self, value: bytes) -> None:
        try:
            announcement = decode_announcement(value)
        except SnapshotError as exc:
            self._reject("invalid_announcement", f"invalid snapshot announcement: {exc}")
            return
        manifest = announcement.manifest
        if manifest.model_name != self.settings.model_name:
            return
        if self.served is not None and manifest.version <= self.served.version:
            return
        try:
            served = await asyncio.get_running_loop().run_in_executor(
                self._load_thread, self._load, announcement
            )
        except SnapshotError as exc:
            self._reject("invalid_snapshot", f"snapshot v{manifest.version} rejected: {exc}")
            return
        previous = self.served.version if self.served is not None else 0
        self.served = served
        delay = max(0.0, time.time() - manifest.created_at)
        self.metrics.update_to_serving.observe(delay)
        self.metrics.snapshots_loaded.inc()
        self.metrics.model_version.set(manifest.version)
        self._model_ready.set()
        logger.info("snapshot swapped in model=%s version=%d previous=%d update_to_serving_seconds=%.3f",
                    manifest.model_name, manifest.version, previous, delay)

    def _load(self, announcement) -> ServedModel:
        return build_served_model(announcement.manifest, resolve_snapshot_bytes(announcement))

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.snapshots_rejected.labels(reason).inc()
        serving = self.served.version if self.served is not None else None
        logger.error("%s; still serving version=%s", message, serving)

    # -- scoring loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._model_ready.is_set():
            try:
                await asyncio.wait_for(self._model_ready.wait(), timeout=10)
            except asyncio.TimeoutError:
                logger.info("waiting for the first snapshot on topic=%s", self.settings.topics.model_snapshots)
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL)
            records = [r for part in batches.values() for r in part]
            if records:
                polled = time.perf_counter()
                scored, letters = await asyncio.get_running_loop().run_in_executor(
                    self._score_thread, self._process, records
                )
                await self._publish(scored, letters)
                self.metrics.batch_duration.observe(time.perf_counter() - polled)
                self.metrics.count_consumed(batches)
            else:
                await reset_positions_beyond_end(self._consumer)
            if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_SECONDS:
                await self._commit()

    def _process(self, records: list) -> tuple[list[tuple[int, bytes, bytes]], list[DeadLetter]]:
        """Labels then transactions of one poll; return (partition, key, value) score records."""
        topics = self.settings.topics
        letters: list[DeadLetter] = []
        label_records = [r for r in records if r.topic == topics.labels]
        # NOTE: labels apply at once, without the updater's event-time gate. The features still
        # match the updater's for label delays up to the 7-day terminal delay, because a
        # terminal window never reaches a label that recent. A longer delay can differ.
        if label_records:
            labels = decode_labels([r.value for r in label_records])
            letters += [dead_letter_from(label_records[b.index], b.reason) for b in labels.rejected]
            joined, _ = self._labels.add_labels(labels.transaction_id, labels.label, labels.event_time_ms)
            self.features.observe_labels(joined.columns["event_time_ms"], joined.columns["terminal_id"], joined.label)
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
        self._remember_transactions(batch, order)
        return self._encode_scores(batch, order, scores, served.version, tx_records), letters

    def _remember_transactions(self, batch, order) -> None:
        n = len(order)
        columns = {
            "transaction_id": batch.transaction_id[order], "event_time_ms": batch.event_time_ms[order],
            "customer_id": batch.customer_id[order], "terminal_id": batch.terminal_id[order],
            "live_score": np.zeros(n, np.float32), "source_score": np.zeros(n, np.float32),
            "model_version": np.zeros(n, np.int32),
        }
        joined, _ = self._labels.add_transactions(columns, np.zeros((n, 0), dtype=np.float32))
        if len(joined):
            self.features.observe_labels(joined.columns["event_time_ms"], joined.columns["terminal_id"], joined.label)
        watermark = int(columns["event_time_ms"][-1])
        self._labels.expire(watermark)

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
        self.scored += len(scored)
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

    async def _commit(self) -> None:
        """Commit the consumed offsets once every score and dead letter of them is acknowledged."""
        self._last_commit = time.monotonic()
        try:
            await self._await_inflight()
        except BrokerError as exc:
            logger.warning("offsets not committed, because sends are unacknowledged at stop error=%s", exc)
            return
        # A commit fails during a rebalance or an outage, and the next one covers its offsets.
        await commit(self._consumer, metrics=self.metrics)
