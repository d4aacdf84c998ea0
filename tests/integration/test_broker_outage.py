"""Both workers in-process through a broker outage: the broker stops, restarts empty, and they resume.

The scenario starts its own embedded broker (Tansu) on a fixed free 127.0.0.1 port, so that
it can stop the process and start a new one on the same port. The updater and the inference
worker consume a replay of July transactions. Then the broker is stopped with SIGTERM for
OUTAGE_SECONDS, and started again. Tansu keeps data in memory only, so the new broker has
no topics, no records and no committed offsets. The scenario creates the topics again,
replays a later day and checks that both workers consume it. The tests assert on what the
scenario recorded.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

import helpers
from streamer.broker import broker_binary, parent_death_signal
from streamer.errors import BrokerError
from streamer.inference import InferenceWorker
from streamer.kafka import ensure_topics, producer_kwargs
from streamer.metrics import InferenceMetrics, UpdaterMetrics
from streamer.model import load_feature_state, load_model_checkpoint
from streamer.replay import read_transactions, replay
from streamer.settings import Settings
from streamer.updater import Updater
from conftest import make_unique_topics

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
# Tansu creates an unknown topic with 4 partitions when a client asks for its metadata,
# which the workers may do before the scenario creates the topics again after the restart.
PARTITIONS = 4
BEFORE_OUTAGE = ("2018-07-01", 300)  # (first day, transactions) replayed before the outage
AFTER_OUTAGE = ("2018-07-03", 200)  # a later day, so that no transaction id repeats
INVALID_AFTER_OUTAGE = [(b"17", b"{not json"), (b"23", b'{"type": "transaction"}')]
LABEL_DELAY_DAYS = 0.1
# Longer than streamer.retry.COMMIT_TIMEOUT_SECONDS, so that a commit times out during it.
OUTAGE_SECONDS = 8.0
# Seconds to wait for the broker to accept topics, and for a worker to reach a count.
BROKER_READY_SECONDS = 15.0
WAIT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.2


class RestartableBroker:
    """A Tansu process on a fixed 127.0.0.1 port, which can be stopped and started again on it."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        url = f"tcp://{self.bootstrap}"
        command = [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=parent_death_signal)

    def stop(self) -> None:
        """Send SIGTERM and wait for the exit; SIGKILL after 5 s."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Outage:
    """What the scenario recorded."""

    settings: Settings
    updater_registry: CollectorRegistry
    inference_registry: CollectorRegistry
    loops_alive_after_outage: dict[str, bool]
    errors_during_outage: dict[str, float]
    inference_broker_up_during_outage: float
    scored_ids_after_restart: set[int]
    dead_letters_after_restart: int
    updater_offsets: dict[str, dict[int, int]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


def broker_errors(registry: CollectorRegistry) -> float:
    """Sum of ``streamer_broker_errors_total`` over every operation."""
    return sum(
        s.value for metric in registry.collect() if metric.name == "streamer_broker_errors"
        for s in metric.samples if s.name == "streamer_broker_errors_total"
    )


async def create_topics(settings: Settings) -> None:
    """Create the topics, retrying while the broker process is still starting."""
    deadline = time.monotonic() + BROKER_READY_SECONDS
    while True:
        try:
            await ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS)
            return
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(POLL_SECONDS)


async def wait_for(registry: CollectorRegistry, name: str, labels: dict[str, str], count: float) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while sample(registry, name, labels) < count:
        if time.monotonic() > deadline:
            seen = sample(registry, name, labels)
            raise TimeoutError(f"{name}{labels} reached {seen}, expected {count} within {WAIT_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


async def wait_for_errors(registry: CollectorRegistry, before: float) -> None:
    """Wait until ``streamer_broker_errors_total`` moves beyond ``before``; return at the deadline otherwise."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while broker_errors(registry) <= before and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)


async def replay_day(settings: Settings, july: Path, day: tuple[str, int]) -> None:
    start, limit = day
    await replay([july], bootstrap=settings.kafka_bootstrap, topics=settings.topics, start=start, limit=limit,
                 label_delay_days=LABEL_DELAY_DAYS, progress=None)


async def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> RestartableBroker:
    broker = RestartableBroker(free_port(), tmp_path_factory.mktemp("outage-broker") / "tansu.log")
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def outage_settings(broker: RestartableBroker, source_path: Path, tmp_path_factory) -> Settings:
    return Settings(
        kafka_bootstrap=broker.bootstrap, embedded_broker=True, topics=make_unique_topics("broker-outage"),
        data_dir=tmp_path_factory.mktemp("streamer-data"), consumer_group_prefix=f"test-{uuid.uuid4().hex[:8]}",
        partitions=PARTITIONS, source_checkpoint=source_path, microbatch_size=64, microbatch_max_age_seconds=0.5,
        label_release_idle_seconds=0.5, checkpoint_interval_seconds=1.0,
        # Only the initial snapshot: exports are not what this scenario is about.
        export_every_batches=10_000, export_interval_seconds=3600.0,
    )


@pytest.fixture(scope="module")
def outage(broker: RestartableBroker, outage_settings: Settings, handbook_dir: Path) -> Outage:
    return asyncio.run(run_outage(broker, outage_settings, handbook_dir / "transactions-2018-07.csv.gz"))


# -- scenario ------------------------------------------------------------------------------


async def run_outage(broker: RestartableBroker, settings: Settings, july: Path) -> Outage:
    topics = settings.topics
    broker.start()
    await create_topics(settings)
    source = load_model_checkpoint(settings.source_checkpoint)
    updater_registry, inference_registry = CollectorRegistry(), CollectorRegistry()
    updater = Updater(settings, source, UpdaterMetrics(updater_registry),
                      load_feature_state(settings.source_checkpoint, source))
    inference = InferenceWorker(settings, InferenceMetrics(inference_registry))
    await updater.start()
    await inference.start()
    try:
        await replay_day(settings, july, BEFORE_OUTAGE)
        before = BEFORE_OUTAGE[1]
        await wait_for(updater_registry, "streamer_events_consumed_total", {"topic": topics.transactions}, before)
        await wait_for(inference_registry, "streamer_scored_transactions_total", {}, before)
        # Acknowledged and committed before the outage: a produce still in flight when the broker
        # stops fails only after the producer's request timeout (40 s by default in aiokafka).
        await asyncio.sleep(2 * settings.checkpoint_interval_seconds)
        errors_before = {"updater": broker_errors(updater_registry), "inference": broker_errors(inference_registry)}

        stopped = time.monotonic()
        # In a thread, so that the workers' loops run while Tansu handles SIGTERM.
        await asyncio.to_thread(broker.stop)
        await wait_for_errors(inference_registry, errors_before["inference"])
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        alive = {"updater": not updater._task.done(), "inference": not any(t.done() for t in inference._tasks)}
        errors = {
            "updater": broker_errors(updater_registry) - errors_before["updater"],
            "inference": broker_errors(inference_registry) - errors_before["inference"],
        }
        up_during_outage = sample(inference_registry, "streamer_broker_up")

        # The new broker is empty: no topics, no records, no committed offsets.
        broker.start()
        await create_topics(settings)
        await produce(settings, topics.transactions, INVALID_AFTER_OUTAGE)
        await replay_day(settings, july, AFTER_OUTAGE)
        after = AFTER_OUTAGE[1]
        consumed = before + after + len(INVALID_AFTER_OUTAGE)
        await wait_for(updater_registry, "streamer_events_consumed_total", {"topic": topics.transactions}, consumed)
        await wait_for(inference_registry, "streamer_scored_transactions_total", {}, before + after)
        # The last commit covers the records consumed after the restart.
        await asyncio.sleep(2 * settings.checkpoint_interval_seconds)
        scores = await helpers.read_topic(settings, topics.fraud_scores, PARTITIONS, WAIT_TIMEOUT_SECONDS)
        dead_letters = await helpers.read_topic(settings, topics.dead_letter, PARTITIONS, WAIT_TIMEOUT_SECONDS)
    finally:
        await inference.stop()
        await updater.stop()
    updater_offsets = {t: dict(parts) for t, parts in updater.pipeline.offsets.items()}
    return Outage(settings, updater_registry, inference_registry, alive, errors, up_during_outage, 
                  {orjson.loads(r.value)["transaction_id"] for r in scores}, len(dead_letters), updater_offsets)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_outage_keeps_worker_loop_running(outage: Outage, worker: str):
    assert outage.loops_alive_after_outage[worker]


def test_outage_counts_inference_broker_errors(outage: Outage):
    assert outage.errors_during_outage["inference"] > 0


def test_outage_sets_broker_down(outage: Outage):
    assert outage.inference_broker_up_during_outage == 0


def test_restart_updater_consumes_new_transactions(outage: Outage):
    topic = outage.settings.topics.transactions
    consumed = sample(outage.updater_registry, "streamer_events_consumed_total", {"topic": topic})
    assert consumed == BEFORE_OUTAGE[1] + AFTER_OUTAGE[1] + len(INVALID_AFTER_OUTAGE)


def test_restart_inference_scores_new_transactions(outage: Outage):
    scored = sample(outage.inference_registry, "streamer_scored_transactions_total")
    assert scored == BEFORE_OUTAGE[1] + AFTER_OUTAGE[1]


def test_restart_scores_reach_new_topic(outage: Outage, handbook_dir: Path):
    start, limit = AFTER_OUTAGE
    rows = read_transactions([handbook_dir / "transactions-2018-07.csv.gz"], start=start)
    expected = {row.transaction_id for _, row in zip(range(limit), rows)}
    # Scores sent before the outage but not acknowledged are sent again, so they may be there too.
    assert expected - outage.scored_ids_after_restart == set()


def test_restart_dead_letters_reach_new_topic(outage: Outage):
    # Both workers send a dead letter for each invalid transaction, and a re-send may repeat one.
    assert outage.dead_letters_after_restart >= 2 * len(INVALID_AFTER_OUTAGE)


@pytest.mark.parametrize("registry", ["updater_registry", "inference_registry"])
def test_restart_sets_broker_up(outage: Outage, registry: str):
    assert sample(getattr(outage, registry), "streamer_broker_up") == 1


def test_restart_updater_offsets_follow_new_topic(outage: Outage):
    # The offsets from before the restart (300 records) would be beyond the new topic's end.
    topic = outage.settings.topics.transactions
    assert sum(outage.updater_offsets[topic].values()) == AFTER_OUTAGE[1] + len(INVALID_AFTER_OUTAGE)
