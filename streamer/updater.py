"""The updater worker: Kafka in, fine-tuned model, checkpoints and ONNX snapshots out.

The worker uses a raw aiokafka consumer inside the faust worker rather than a faust agent.
An agent hands events over one at a time (about 10 k events/s on one core here), while
the updater must reach 50 k transactions/s with their labels. `getmany()` delivers whole
batches that are decoded, featurised and trained on as arrays. faust still runs the
worker (CLI, signals, logging, lifecycle). Offsets are committed by hand, only after the
checkpoint that includes their events.

Threads: the event loop polls, produces and commits. One pipeline thread owns all model
and feature state (`UpdaterPipeline`). A child process exports weight copies to ONNX (see
`streamer.export_process` for why not a thread), and one thread writes them to the
snapshot store. The event loop never runs model code, so heartbeats keep flowing during
long micro-batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from exporters import SnapshotStore, encode_announcement

from . import health
from .checkpoint import CheckpointStore
from .deadletter import DeadLetter
from .errors import BrokerError
from .faults import crash_point
from .export_process import export_pool, export_serialised, serialise_model
from .features import FEATURE_NAMES
from .health import Check, HealthReport
from .kafka import consumer_kwargs, consumer_lag, producer_kwargs
from .metrics import UpdaterMetrics
from .model import ModelCheckpoint
from .pipeline import BatchOutcome, UpdaterPipeline
from .retry import RetainedSend, commit, reset_positions_beyond_end, retry
from .settings import Settings

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
# Records per poll: large enough to amortise per-batch costs, small enough to keep the
# latency of one pipeline call in the tens of milliseconds.
MAX_RECORDS_PER_POLL = 4000
PROBE_ROWS = 256
# Seconds a pipeline call may run before the loop starts polling paused partitions beside it.
# aiokafka leaves the consumer group when no getmany() call happens within
# max_poll_interval_ms (300 s by default), so this must stay far below that.
KEEPALIVE_POLL_SECONDS = 0.5
# Seconds each step of stop() gets at least, also after the stop timeout has passed.
STOP_STEP_MIN_SECONDS = 0.5


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, updater: "Updater") -> None:
        self.updater = updater

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked and self.updater.started:
            logger.info("partitions revoked %s: writing a checkpoint before giving them up", sorted(revoked))
            await self.updater.checkpoint()

    async def on_partitions_assigned(self, assigned) -> None:
        await self.updater.seek_assigned(assigned)


class Updater:
    """Runs one `UpdaterPipeline` against Kafka."""

    def __init__(
        self, settings: Settings, source: ModelCheckpoint, metrics: UpdaterMetrics, initial_features=None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # A checkpoint, when there is one, replaces the initial features in start().
        self.pipeline = UpdaterPipeline(settings, source, metrics, initial_features)
        self.checkpoints = CheckpointStore(settings.checkpoint_dir)
        self.store = SnapshotStore(settings.snapshot_dir, settings.model_name, settings.snapshot_retention)
        self._pipeline_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._export_thread = ThreadPoolExecutor(1, thread_name_prefix="export")
        self._export_process = export_pool()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._export_task: asyncio.Task | None = None
        self._last_checkpoint = time.monotonic()
        self._checkpointed_position: tuple | None = None
        # Offsets of the newest checkpoint until the broker accepts their commit.
        self._uncommitted: dict[str, dict[int, int]] | None = None
        self._last_export = time.monotonic()
        self._probe = np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
        self.started = False

    async def _in_pipeline(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pipeline_thread, fn, *args)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the last checkpoint, connect, announce the newest snapshot and start consuming."""
        await self._in_pipeline(self.pipeline.set_threads)
        data = await self._in_pipeline(self.checkpoints.load_latest)
        if data is not None:
            await self._in_pipeline(self.pipeline.restore, data)
            logger.info("resuming from checkpoint offsets=%s", data.offsets)
        elif self.pipeline.ledger is not None:
            # No checkpoint: training starts again from the source, and so does its ledger.
            await self._in_pipeline(self.pipeline.ledger.truncate, 0)
        s = self.settings
        self._producer = AIOKafkaProducer(**producer_kwargs(s))
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(**consumer_kwargs(s, group_id=f"{s.consumer_group_prefix}-updater"))
        await self._consumer.start()
        self._consumer.subscribe([s.topics.transactions, s.topics.labels], listener=_Rebalance(self))
        latest = self.store.latest()
        if latest is None:
            await self._export("initial target model, before any fine-tuning")
        else:
            self.pipeline.served_version = max(self.pipeline.served_version, latest.version)
            self.metrics.model_version.set(latest.version)
            await self._announce(latest)
        self.started = True
        self._task = asyncio.create_task(self._run(), name="updater-loop")
        logger.info("updater started model=%s group=%s-updater", s.model_name, s.consumer_group_prefix)

    async def stop(self) -> None:
        """Stop consuming, finish the current batch, write a final checkpoint, commit, disconnect.

        Waiting for the loop, a running export and the client shutdowns share one bound,
        ``settings.stop_timeout_seconds``. A loop still inside a batch at the bound is
        abandoned without a final checkpoint, so a restart resumes from the last one.
        """
        deadline = time.monotonic() + self.settings.stop_timeout_seconds
        self._stopping.set()
        loop_failed = False
        if self._task is not None:
            try:
                loop_failed = not await self._wait_bounded(self._task, "finish the current micro-batch", deadline)
            except Exception:
                # The state may be half-way through a batch: keep the last good checkpoint.
                loop_failed = True
                logger.exception("updater loop had failed; stopping without a final checkpoint")
        if self._export_task is not None:
            await self._wait_bounded(self._export_task, "finish the running export", deadline)
        try:
            if self.started and not loop_failed:
                await self.checkpoint()
                await self._in_pipeline(self._save_prequential_log)
        finally:
            for client in (self._consumer, self._producer):
                if client is not None:
                    await self._wait_bounded(client.stop(), f"close {type(client).__name__}", deadline)
        # A batch abandoned at the bound still runs in the pipeline thread, so do not wait for it.
        # NOTE: Python joins executor threads at interpreter exit, so a batch that never ends
        # still delays the process exit. Only the stop() coroutine itself is bounded.
        self._pipeline_thread.shutdown(wait=not loop_failed)
        if self.pipeline.ledger is not None and not loop_failed:
            self.pipeline.ledger.close()
        self._export_thread.shutdown()
        self._export_process.shutdown(cancel_futures=True)
        logger.info("updater stopped counters=%s", self.pipeline.counters)

    async def _wait_bounded(self, awaitable, step: str, deadline: float) -> bool:
        """Await ``awaitable`` until ``deadline`` (monotonic seconds); cancel it and return False past it."""
        try:
            # The floor gives each step a chance to run, also when an earlier one used up the bound.
            await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), STOP_STEP_MIN_SECONDS))
        except asyncio.TimeoutError:
            logger.warning("stop timed out: could not %s within stop_timeout_seconds=%.1f; continuing the stop",
                           step, self.settings.stop_timeout_seconds)
            return False
        return True

    def liveness(self) -> HealthReport:
        """Report whether the updater loop runs (see `streamer.health`)."""
        return health.liveness([self._task] if self._task is not None else [], self._stopping.is_set())

    def readiness(self) -> HealthReport:
        """Report whether the updater trains: started with its model, partitions assigned, broker reachable."""
        model = (Check(True, f"target model loaded, newest snapshot version {self.pipeline.served_version}")
                 if self.started else Check(False, "target model not ready: start() has not announced a snapshot yet"))
        return health.readiness(started=self.started, stopping=self._stopping.is_set(), consumer=self._consumer,
                                model=model, metrics=self.metrics)

    def _save_prequential_log(self) -> Path:
        path = self.settings.data_dir / "reports" / f"prequential-{self.settings.model_name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pipeline.log.save(path)
        return path

    async def seek_assigned(self, assigned) -> None:
        """Seek newly assigned partitions to the checkpoint's offsets, which may be ahead of the commits."""
        for tp in assigned:
            offset = self.pipeline.offsets.get(tp.topic, {}).get(tp.partition)
            if offset is not None:
                self._consumer.seek(tp, offset)
        logger.info("partitions assigned %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

    # -- main loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL)
            lag = await consumer_lag(self._consumer)
            self.metrics.set_consumer_lag(lag)
            # Replaced, not changed in place, so the pipeline thread never reads a half-built set.
            self.pipeline.partitions_behind = {
                (tp.topic, tp.partition) for tp in self._consumer.assignment() if lag.get(tp, 1) > 0
            }
            records = [r for part in batches.values() for r in part]
            if records:
                ends = {(tp.topic, tp.partition): part[-1].offset + 1 for tp, part in batches.items() if part}
                outcome = await self._in_pipeline_polling(self.pipeline.process, records, ends)
                self.metrics.count_consumed(batches)
                await self._after_batch(outcome)
            else:
                outcome = await self._in_pipeline_polling(self.pipeline.on_idle)
                reset = await reset_positions_beyond_end(self._consumer)
                if reset:
                    await self._in_pipeline(self._forget_offsets, reset)
                if outcome.dead_letters:
                    await self._send_dead_letters(outcome.dead_letters)
            await self._maybe_export()
            if time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_seconds:
                await self.checkpoint()

    async def _in_pipeline_polling(self, fn, *args):
        """Run ``fn`` in the pipeline thread and keep calling getmany() while it runs.

        Heartbeats flow anyway, because the event loop stays free, but aiokafka leaves the
        group when getmany() is not called within max_poll_interval_ms. So once the call
        takes longer than KEEPALIVE_POLL_SECONDS, every assigned partition is paused and
        polled until the call returns, then resumed. A paused partition returns no
        records, and its prefetched records are fetched again after the resume.
        """
        work = asyncio.ensure_future(self._in_pipeline(fn, *args))
        done, _ = await asyncio.wait({work}, timeout=KEEPALIVE_POLL_SECONDS)
        if done:
            return work.result()
        logger.debug("pipeline call still running after %.1f s: polling paused partitions", KEEPALIVE_POLL_SECONDS)
        try:
            while not work.done():
                await self._poll_paused()
                await asyncio.wait({work}, timeout=KEEPALIVE_POLL_SECONDS)
        finally:
            self._consumer.resume(*self._consumer.assignment())
        return work.result()

    async def _poll_paused(self) -> None:
        # Paused again before each call, because a rebalance may have assigned new partitions.
        self._consumer.pause(*self._consumer.assignment())
        polled = await self._consumer.getmany(timeout_ms=0)
        for tp, part in polled.items():
            # Only a partition assigned during the call can deliver records here. Seeking
            # back to its first record makes the loop read them again after the resume.
            if part:
                self._consumer.seek(tp, part[0].offset)

    async def _after_batch(self, outcome: BatchOutcome) -> None:
        if self.pipeline.watermark_ms:
            self.metrics.watermark.set(self.pipeline.watermark_ms / 1000)
        if outcome.dead_letters:
            await self._send_dead_letters(outcome.dead_letters)
        if outcome.transactions and len(self._probe) < PROBE_ROWS:
            self._probe = await self._in_pipeline(self._collect_probe)

    def _forget_offsets(self, partitions: list[TopicPartition]) -> None:
        # The pipeline's offsets never go backwards, but a partition that lost its records
        # starts again at 0. Kept, the old offsets would make the next checkpoint, and a
        # restart from it, skip the new records below them.
        for tp in partitions:
            self.pipeline.offsets.get(tp.topic, {}).pop(tp.partition, None)

    def _collect_probe(self) -> np.ndarray:
        # Real feature rows make a better parity probe than random ones: same ranges as serving.
        return self.pipeline.recent_features[-PROBE_ROWS:].copy()

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        send = RetainedSend(self.settings.topics.dead_letter, None, [])
        for letter in letters:
            self.metrics.invalid_events.labels(letter.topic).inc()
            logger.warning(
                "invalid event sent to dead-letter topic=%s partition=%d offset=%d reason=%s",
                letter.topic, letter.partition, letter.offset, letter.reason,
            )
            send.records.append((letter.key, letter.value, letter.headers("updater")))
        # The dead letters must be durable before their source offsets can be committed, so
        # the loop waits here, retrying, while the broker is unreachable.
        await self._retry("produce", lambda: send.acknowledged(self._producer))

    async def _retry(self, operation: str, fn):
        return await retry(operation, fn, metrics=self.metrics, stop_event=self._stopping)

    # -- checkpoint and commit ----------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Write a checkpoint, then commit the offsets it includes (never before).

        A failed commit is logged and tried again at the next call, also when nothing
        changed since, because a commit of the same offsets is idempotent.
        """
        started = time.perf_counter()
        self._last_checkpoint = time.monotonic()
        position = (self.pipeline.counters["microbatches"], repr(self.pipeline.offsets), self.pipeline.served_version)
        if position != self._checkpointed_position:
            meta = {"last_exported_version": self.pipeline.served_version}
            data = await self._in_pipeline(self.pipeline.checkpoint_data, meta)
            await self._in_pipeline(self.checkpoints.save, data)
            self._checkpointed_position = position
            self._uncommitted = data.offsets
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
            # In the pipeline thread: the rolling evaluators change while a batch is processed.
            await self._in_pipeline(self.pipeline.prequential_metrics)
        if self._uncommitted is not None:
            await self._commit(self._uncommitted)

    async def _commit(self, checkpointed: dict[str, dict[int, int]]) -> None:
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        offsets = {
            TopicPartition(topic, partition): offset
            for topic, parts in checkpointed.items()
            for partition, offset in parts.items()
            if TopicPartition(topic, partition) in assigned
        }
        if not offsets:
            return
        if await commit(self._consumer, offsets, metrics=self.metrics):
            self._uncommitted = None

    # -- export -------------------------------------------------------------------------------

    async def _maybe_export(self) -> None:
        if self._export_task is not None and not self._export_task.done():
            return
        due_batches = self.pipeline.batches_since_export >= self.settings.export_every_batches
        due_time = (
            self.pipeline.batches_since_export > 0
            and time.monotonic() - self._last_export >= self.settings.export_interval_seconds
        )
        if due_batches or due_time:
            self._export_task = asyncio.create_task(self._export("scheduled"))

    async def _export(self, why: str) -> None:
        """Export the live model: copy (pipeline thread), ONNX (export process), store (export thread), announce."""
        self._last_export = time.monotonic()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            model_bytes, offsets, metrics = await self._in_pipeline(self._freeze_for_export)
            probe = self._probe if len(self._probe) else self._synthetic_probe()
            result = await loop.run_in_executor(self._export_process, export_serialised, model_bytes, probe)
            crash_point("export.converted")
            manifest = await loop.run_in_executor(self._export_thread, self._publish, result, offsets, metrics)
            crash_point("export.published")
        except Exception:
            self.metrics.export_failures.inc()
            logger.exception("snapshot export failed model=%s; the previous snapshot keeps serving", self.settings.model_name)
            return
        self.pipeline.served_version = manifest.version
        self.metrics.snapshots_exported.inc()
        self.metrics.export_duration.observe(time.perf_counter() - started)
        self.metrics.model_version.set(manifest.version)
        logger.info("snapshot exported model=%s version=%d reason=%s auc=%s", manifest.model_name,
                    manifest.version, why, manifest.metrics.get("live_auc"))
        try:
            await self._announce(manifest)
        except BrokerError as exc:
            # The snapshot is in the store, and start() announces the newest stored version.
            logger.warning("snapshot announcement abandoned at stop model=%s version=%d error=%s",
                           manifest.model_name, manifest.version, exc)

    def _freeze_for_export(self):
        if not self.pipeline.trainer.weights_finite():
            raise ValueError("live model has non-finite weights; export rejected")
        metrics = {k: float(v) for k, v in self.pipeline.prequential_metrics().items() if np.isfinite(v)}
        offsets = {t: {str(p): o for p, o in parts.items()} for t, parts in self.pipeline.offsets.items()}
        # Reset together with the copy, in the pipeline thread, so that micro-batches trained
        # after the copy count towards the next export.
        self.pipeline.batches_since_export = 0
        return serialise_model(self.pipeline.trainer.model), offsets, metrics

    def _synthetic_probe(self) -> np.ndarray:
        model = self.pipeline.source_model
        rng = np.random.default_rng(0)
        noise = rng.standard_normal((PROBE_ROWS, len(FEATURE_NAMES))).astype(np.float32)
        return noise * model.feature_std.numpy() + model.feature_mean.numpy()

    def _publish(self, result, offsets, metrics):
        source = self.pipeline.source
        return self.store.publish(
            result,
            feature_names=list(FEATURE_NAMES),
            source_model={"sha256": source.sha256, **{k: v for k, v in source.metadata.items() if k != "metrics"}},
            offsets=offsets,
            metrics=metrics,
        )

    async def _announce(self, manifest) -> None:
        onnx_path = self.store.model_path(manifest.version)
        key, value = encode_announcement(manifest, onnx_path.read_bytes(), store_path=str(onnx_path.resolve()))
        topic = self.settings.topics.model_snapshots
        await self._retry("announce", lambda: self._producer.send_and_wait(topic, value, key=key))
        logger.info("snapshot announced model=%s version=%d topic=%s", manifest.model_name, manifest.version,
                    self.settings.topics.model_snapshots)
