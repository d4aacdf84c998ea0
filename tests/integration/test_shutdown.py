"""SIGTERM during a replay: both workers as processes stop cleanly, commit and exit 0.

`streamer update` and `streamer serve` run against the session's broker while a paced
replay of real July transactions is still producing. Each worker gets SIGTERM by pid
while it consumes. The updater then writes a final checkpoint and commits its offsets,
and the inference worker commits the offsets of the transactions it has scored. A second
`streamer update` on the same data folder and consumer group consumes the rest of the
replay. The tests compare its counts with the first run's final checkpoint, so a record
counted by both runs, or by neither, fails them.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

import helpers
from workers import Worker, free_port, start_worker, stop_worker, wait_until, worker_env
from streamer.broker import parent_death_signal
from streamer.checkpoint import CheckpointData, CheckpointStore
from streamer.demo import scrape
from streamer.kafka import consumer_kwargs, ensure_topics
from streamer.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 4
REPLAY_START = "2018-07-01"
REPLAY_TRANSACTIONS = 3000
LABEL_DELAY_DAYS = 0.1
# 3,000 July transactions span about 7.5 hours of event time: about 9 s of replay at this
# speed-up, long enough for SIGTERM to reach both workers while records still arrive.
REPLAY_SPEEDUP = 3000
# A guard against a stop that hangs, not a performance bound: a clean stop takes seconds.
STOP_BOUND_SECONDS = 60.0
WAIT_TIMEOUT_SECONDS = 90.0


@dataclass
class Stop:
    """How one worker process stopped."""

    exit_code: int | None  # None: still running after STOP_BOUND_SECONDS, then killed
    seconds: float
    log: str


@dataclass
class ShutdownRun:
    """What the scenario recorded."""

    settings: Settings
    updater_stop: Stop
    inference_stop: Stop
    restart_stop: Stop
    # Records consumed before SIGTERM, read from the metrics endpoints just before it.
    consumed_before_updater_stop: float
    consumed_before_inference_stop: float
    first_checkpoint: CheckpointData
    updater_committed: dict[TopicPartition, int | None]  # read after the first updater stopped
    inference_committed: dict[TopicPartition, int | None]
    restart_consumed: dict[str, float]  # topic -> records the second updater consumed
    final_checkpoint: CheckpointData
    produced: dict[str, int]  # topic -> records on it after the replay
    scores: int  # records on fraud-scores


@pytest.fixture(scope="module")
def shutdown_run(settings_factory, source_path: Path, handbook_dir: Path, tmp_path_factory) -> ShutdownRun:
    settings = settings_factory("shutdown").replace(partitions=PARTITIONS)
    logs = tmp_path_factory.mktemp("shutdown-logs")
    ports = {"updater": free_port(), "inference": free_port(), "restart": free_port()}
    env = worker_env(settings, source_path, ports["updater"], ports["inference"], PARTITIONS)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS))
    topics = settings.topics

    workers = [start_worker("updater", "update", env, logs, ports["updater"]),
               start_worker("inference", "serve", env, logs, ports["inference"])]
    updater, inference = workers
    replay = None
    try:
        wait_until(lambda: scrape(ports["inference"]).get("streamer_inference_model_version", 0) >= 1,
                   "the inference worker to serve the initial snapshot", workers)
        replay = start_replay(env, handbook_dir / "transactions-2018-07.csv.gz", logs / "replay.log")

        # 1. SIGTERM to each worker while the replay is still producing.
        consumed_key = f"streamer_events_consumed_total{{topic={topics.transactions}}}"
        wait_until(lambda: scrape(ports["updater"]).get(consumed_key, 0) > 0, "the updater to consume", workers)
        consumed_before_updater = scrape(ports["updater"])[consumed_key]
        updater_stop = timed_stop(updater)
        workers.remove(updater)
        wait_until(lambda: scrape(ports["inference"]).get("streamer_scored_transactions_total", 0) > 0,
                   "the inference worker to score", workers)
        consumed_before_inference = scrape(ports["inference"])[consumed_key]
        inference_stop = timed_stop(inference)
        workers.remove(inference)
        replay_code = replay.wait(timeout=WAIT_TIMEOUT_SECONDS)
        assert replay_code == 0, (logs / "replay.log").read_text()

        first_checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
        updater_committed = asyncio.run(committed_offsets(settings, "updater"))
        inference_committed = asyncio.run(committed_offsets(settings, "inference"))
        produced = {topic: len(asyncio.run(helpers.read_topic(settings, topic, PARTITIONS)))
                    for topic in (topics.transactions, topics.labels)}

        # 2. A second updater consumes what the first one left.
        restart_env = dict(env, STREAMER_UPDATER_METRICS_PORT=str(ports["restart"]))
        restart = start_worker("restart", "update", restart_env, logs, ports["restart"])
        workers.append(restart)
        remaining = {topic: produced[topic] - sum(first_checkpoint.offsets.get(topic, {}).values())
                     for topic in produced}

        def consumed_remaining() -> bool:
            values = scrape(ports["restart"])
            return all(values.get(f"streamer_events_consumed_total{{topic={topic}}}", 0) >= count
                       for topic, count in remaining.items())

        wait_until(consumed_remaining, "the second updater to consume the rest of the replay", workers)
        # Labels wait for 1 s of idle transactions and a partial micro-batch for 1 s of age (worker_env).
        time.sleep(3)
        values = scrape(ports["restart"])
        restart_consumed = {topic: values.get(f"streamer_events_consumed_total{{topic={topic}}}", 0.0)
                            for topic in produced}
        restart_stop = timed_stop(restart)
        workers.remove(restart)
    finally:
        for worker in workers:
            worker.process.kill()
            worker.process.wait()
            worker.output.close()
        if replay is not None and replay.poll() is None:
            replay.kill()
            replay.wait()

    return ShutdownRun(
        settings=settings, updater_stop=updater_stop, inference_stop=inference_stop, restart_stop=restart_stop,
        consumed_before_updater_stop=consumed_before_updater, consumed_before_inference_stop=consumed_before_inference,
        first_checkpoint=first_checkpoint, updater_committed=updater_committed,
        inference_committed=inference_committed, restart_consumed=restart_consumed,
        final_checkpoint=CheckpointStore(settings.checkpoint_dir).load_latest(), produced=produced,
        scores=len(asyncio.run(helpers.read_topic(settings, topics.fraud_scores, PARTITIONS))),
    )


def start_replay(env: dict[str, str], july: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "streamer", "replay", str(july), "--start", REPLAY_START,
             "--limit", str(REPLAY_TRANSACTIONS), "--label-delay-days", str(LABEL_DELAY_DAYS),
             "--speedup", str(REPLAY_SPEEDUP)],
            env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=parent_death_signal,
        )


def timed_stop(worker: Worker) -> Stop:
    started = time.monotonic()
    code, _leftovers = stop_worker(worker)
    return Stop(code, time.monotonic() - started, worker.log_text())


async def committed_offsets(settings: Settings, role: str) -> dict[TopicPartition, int | None]:
    """Read the committed offsets of the group of ``role`` ("updater" or "inference") for both input topics.

    The consumer never subscribes, so it does not join the group. Partitions are listed
    explicitly, because the embedded broker breaks the connection without them.
    """
    group = f"{settings.consumer_group_prefix}-{role}"
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=group))
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in input_partitions(settings)}
    finally:
        await consumer.stop()


def input_partitions(settings: Settings) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for topic in (settings.topics.transactions, settings.topics.labels)
            for p in range(PARTITIONS)]


def checkpoint_offsets(checkpoint: CheckpointData, settings: Settings) -> dict[TopicPartition, int | None]:
    return {tp: checkpoint.offsets.get(tp.topic, {}).get(tp.partition) for tp in input_partitions(settings)}


# -- updater: the first stop -----------------------------------------------------------------


def test_updater_sigterm_exits_zero(shutdown_run: ShutdownRun):
    assert shutdown_run.updater_stop.exit_code == 0, shutdown_run.updater_stop.log[-3000:]


def test_updater_sigterm_stops_within_bound(shutdown_run: ShutdownRun):
    assert shutdown_run.updater_stop.seconds < STOP_BOUND_SECONDS


def test_updater_stopped_during_replay(shutdown_run: ShutdownRun):
    consumed = sum(shutdown_run.first_checkpoint.offsets[shutdown_run.settings.topics.transactions].values())
    assert consumed < REPLAY_TRANSACTIONS


def test_updater_logs_stop(shutdown_run: ShutdownRun):
    assert "updater stopped" in shutdown_run.updater_stop.log


def test_updater_final_checkpoint_covers_consumed(shutdown_run: ShutdownRun):
    topic = shutdown_run.settings.topics.transactions
    assert sum(shutdown_run.first_checkpoint.offsets[topic].values()) >= shutdown_run.consumed_before_updater_stop


def test_updater_commits_final_checkpoint(shutdown_run: ShutdownRun):
    expected = checkpoint_offsets(shutdown_run.first_checkpoint, shutdown_run.settings)
    assert shutdown_run.updater_committed == expected


# -- updater: the restart --------------------------------------------------------------------


@pytest.mark.parametrize("topic_field", ["transactions", "labels"])
def test_restart_consumes_only_after_checkpoint(shutdown_run: ShutdownRun, topic_field: str):
    topic = getattr(shutdown_run.settings.topics, topic_field)
    already = sum(shutdown_run.first_checkpoint.offsets.get(topic, {}).values())
    assert shutdown_run.restart_consumed[topic] == shutdown_run.produced[topic] - already


def test_replay_produced_every_record(shutdown_run: ShutdownRun):
    topics = shutdown_run.settings.topics
    assert shutdown_run.produced == {topics.transactions: REPLAY_TRANSACTIONS, topics.labels: REPLAY_TRANSACTIONS}


@pytest.mark.parametrize("counter", ["transactions", "labels", "examples"])
def test_restart_counts_each_record_once(shutdown_run: ShutdownRun, counter: str):
    assert shutdown_run.final_checkpoint.meta["counters"][counter] == REPLAY_TRANSACTIONS


def test_restart_sigterm_exits_zero(shutdown_run: ShutdownRun):
    assert shutdown_run.restart_stop.exit_code == 0, shutdown_run.restart_stop.log[-3000:]


def test_restart_sigterm_stops_within_bound(shutdown_run: ShutdownRun):
    assert shutdown_run.restart_stop.seconds < STOP_BOUND_SECONDS


# -- inference worker ------------------------------------------------------------------------


def test_inference_sigterm_exits_zero(shutdown_run: ShutdownRun):
    assert shutdown_run.inference_stop.exit_code == 0, shutdown_run.inference_stop.log[-3000:]


def test_inference_sigterm_stops_within_bound(shutdown_run: ShutdownRun):
    assert shutdown_run.inference_stop.seconds < STOP_BOUND_SECONDS


def test_inference_stopped_during_replay(shutdown_run: ShutdownRun):
    assert shutdown_run.scores < REPLAY_TRANSACTIONS


def test_inference_logs_stop(shutdown_run: ShutdownRun):
    assert "inference worker stopped" in shutdown_run.inference_stop.log


def test_inference_commits_scored_transactions(shutdown_run: ShutdownRun):
    # Every consumed transaction was scored and acknowledged before the final commit.
    topic = shutdown_run.settings.topics.transactions
    committed = [offset for tp, offset in shutdown_run.inference_committed.items() if tp.topic == topic]
    assert sum(offset or 0 for offset in committed) == shutdown_run.scores


def test_inference_commits_before_exit(shutdown_run: ShutdownRun):
    topic = shutdown_run.settings.topics.transactions
    committed = [offset for tp, offset in shutdown_run.inference_committed.items() if tp.topic == topic]
    assert sum(offset or 0 for offset in committed) >= shutdown_run.consumed_before_inference_stop


# -- stop bound, in-process ------------------------------------------------------------------


class HangingClient:
    """A Kafka client whose stop() never returns, like a client waiting for an unreachable broker."""

    async def stop(self) -> None:
        await asyncio.Event().wait()


def test_updater_stop_bounded_when_client_hangs(source_path: Path, tmp_path: Path, caplog):
    from prometheus_client import CollectorRegistry

    from streamer.metrics import UpdaterMetrics
    from streamer.model import load_model_checkpoint
    from streamer.updater import Updater

    settings = Settings(kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path, source_checkpoint=source_path,
                        stop_timeout_seconds=1.0)
    updater = Updater(settings, load_model_checkpoint(source_path), UpdaterMetrics(CollectorRegistry()))
    updater._consumer = HangingClient()

    async def stop_with_guard() -> None:
        await asyncio.wait_for(updater.stop(), STOP_BOUND_SECONDS)

    with caplog.at_level(logging.WARNING, logger="streamer.updater"):
        asyncio.run(stop_with_guard())
    assert "stop timed out: could not close HangingClient" in caplog.text
