"""Fault injection: the inference worker is killed with SIGKILL while it scores real July transactions.

The test publishes snapshots v1 and v2 and starts `streamer serve` as a process. A paced
`streamer replay` produces 4,000 transactions and their labels. Once the worker has scored
some of them and written a checkpoint, the test kills it with SIGKILL. While it is down,
the test announces v3 and then an invalid v4. A second worker process with the same
consumer group and data folder resumes from the checkpoint, and it must serve v3. Worker 1
served v2 only, so a score's version shows which worker produced it.

Features are deterministic here: a customer's transactions share a key, hence a partition
and their order, and the terminal windows end 7 days before each transaction, before the
replayed period. So the features that an uninterrupted worker computes equal those of a
fresh `FeatureState` run over the transactions in file order. The test compares each
served score with that snapshot run offline on those features.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

import helpers
from workers import free_port
from helpers import build_model, offline_features
from exporters import SnapshotStore, encode_announcement, export_onnx
from streamer.broker import parent_death_signal
from streamer.checkpoint import CheckpointData
from streamer.demo import scrape
from streamer.features import FEATURE_NAMES
from streamer.inference_state import InferenceCheckpoints
from streamer.kafka import ensure_topics, producer_kwargs
from streamer.replay import Transaction, read_transactions
from streamer.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 4
REPLAY_START = "2018-07-01"
REPLAY_TRANSACTIONS = 4000
# 2.4 hours of event time: labels of the first transactions arrive while later ones are replayed.
LABEL_DELAY_DAYS = 0.1
# 4,000 July transactions span about 10 hours of event time: about 15 s of replay, so
# that the kill lands while transactions are still arriving.
REPLAY_SPEEDUP = 2400
KILL_AFTER_SCORED = 1200
CHECKPOINT_INTERVAL_SECONDS = 1
WORKER_ID = "inference"  # the id `streamer serve` gives its worker
# Both scorings are onnxruntime on CPU; only batch-dependent kernel order can differ.
OFFLINE_SCORE_ATOL = 1e-6
WAIT_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30
POLL_SECONDS = 0.2


@dataclass
class Worker:
    process: subprocess.Popen
    port: int
    log: Path
    output: BinaryIO

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class CrashRun:
    """What the tests inspect after the kill, the restart and the end of the replay."""

    rows: list[Transaction]
    offline_features: np.ndarray  # row i: features of rows[i] in an uninterrupted run
    onnx_by_version: dict[int, bytes]
    scored_at_kill: float
    replay_running_at_kill: bool
    checkpoint: CheckpointData
    restarted_metrics: dict[str, float]
    restarted_exit_code: int | None
    restarted_log: str
    scores: list[ConsumerRecord]

    def decoded(self) -> list[dict]:
        return [orjson.loads(record.value) for record in self.scores]

    def versions(self) -> Counter:
        return Counter(score["model_version"] for score in self.decoded())


# -- helpers ---------------------------------------------------------------------------------


def publish(store: SnapshotStore, seed: int, probe: np.ndarray) -> tuple[int, bytes, bytes, bytes]:
    """Export and store a snapshot; return its version, ONNX bytes, announcement key and value."""
    result = export_onnx(build_model(seed, probe), probe)
    manifest = store.publish(result, feature_names=list(FEATURE_NAMES), source_model={"name": "untrained"},
                             offsets={}, metrics={})
    key, value = encode_announcement(manifest, result.onnx_bytes, store_path=str(store.model_path(manifest.version)))
    return manifest.version, result.onnx_bytes, key, value


def invalid_successor(value: bytes) -> bytes:
    """The announcement ``value`` as a newer version whose SHA-256 does not match its model bytes."""
    data = json.loads(value)
    manifest = dict(data["manifest"], version=data["manifest"]["version"] + 1, sha256="0" * 64)
    return json.dumps(dict(data, manifest=manifest)).encode()


async def announce(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topics.model_snapshots, value, key=key, partition=0)
    finally:
        await producer.stop()


def worker_env(settings: Settings) -> dict[str, str]:
    topics = settings.topics
    env = {name: value for name, value in os.environ.items() if name != "STREAMER_SOURCE_CHECKPOINT"}
    env.update({
        "STREAMER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMER_EMBEDDED_BROKER": "1" if settings.embedded_broker else "0",
        "STREAMER_DATA_DIR": str(settings.data_dir),
        "STREAMER_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMER_PARTITIONS": str(PARTITIONS),
        "STREAMER_TOPIC_TRANSACTIONS": topics.transactions,
        "STREAMER_TOPIC_LABELS": topics.labels,
        "STREAMER_TOPIC_DEAD_LETTER": topics.dead_letter,
        "STREAMER_TOPIC_MODEL_SNAPSHOTS": topics.model_snapshots,
        "STREAMER_TOPIC_FRAUD_SCORES": topics.fraud_scores,
        "STREAMER_INFERENCE_CHECKPOINT_INTERVAL_SECONDS": str(CHECKPOINT_INTERVAL_SECONDS),
        # A free port, so that parallel test runs on one machine do not collide.
        "STREAMER_INFERENCE_HTTP_PORT": "0",
    })
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, BinaryIO]:
    output = open(log, "wb")
    process = subprocess.Popen([sys.executable, "-m", "streamer", *args], env=env, stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=parent_death_signal)
    return process, output


def start_worker(env: dict[str, str], log: Path) -> Worker:
    port = free_port()
    process, output = start(["serve"], dict(env, STREAMER_INFERENCE_METRICS_PORT=str(port)), log)
    return Worker(process, port, log, output)


def wait_until(condition, description: str, worker: Worker) -> None:
    """Poll ``condition`` until it is true; fail if the worker exits or the wait times out."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while not condition():
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.process.returncode} while waiting for "
                               f"{description}:\n{worker.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {WAIT_TIMEOUT_SECONDS} s waiting for {description}:\n"
                               f"{worker.log_text()[-3000:]}")
        time.sleep(POLL_SECONDS)


def kill(worker: Worker) -> None:
    """SIGKILL the worker process by its pid: no stop(), no final checkpoint, no commit."""
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    worker.output.close()


def stop(worker: Worker) -> int | None:
    """SIGTERM the worker; return its exit code, or None if it had to be killed."""
    worker.process.send_signal(signal.SIGTERM)
    try:
        code = worker.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        kill(worker)
        return None
    worker.output.close()
    return code


def stop_replay(replay: subprocess.Popen | None) -> None:
    if replay is not None and replay.poll() is None:
        replay.kill()
        replay.wait()


def offline_scores(onnx_bytes: bytes, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: features})[0].reshape(-1)


# -- scenario --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_run(settings_factory, handbook_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CrashRun:
    settings = settings_factory("inference-crash").replace(partitions=PARTITIONS)
    logs = tmp_path_factory.mktemp("inference-crash-logs")
    july = handbook_dir / "transactions-2018-07.csv.gz"
    rows = [row for _, row in zip(range(REPLAY_TRANSACTIONS), read_transactions([july], start=REPLAY_START))]
    offline = offline_features(rows)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS))

    # 1. Snapshots v1 and v2 are on the topic before the first worker starts; v3 is kept back.
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=10)
    snapshots = [publish(store, seed, offline[:256]) for seed in (1, 2, 3)]
    asyncio.run(announce(settings, [(key, value) for _, _, key, value in snapshots[:2]]))

    env = worker_env(settings)
    first = start_worker(env, logs / "worker-1.log")
    replay, replay_output = None, None
    try:
        wait_until(lambda: scrape(first.port).get("streamer_inference_model_version") == 2,
                   "worker 1 to serve version 2", first)

        # 2. The paced replay, then SIGKILL once worker 1 has scored part of it and checkpointed.
        replay, replay_output = start(
            ["replay", str(july), "--start", REPLAY_START, "--limit", str(REPLAY_TRANSACTIONS),
             "--label-delay-days", str(LABEL_DELAY_DAYS), "--speedup", str(REPLAY_SPEEDUP)],
            env, logs / "replay.log",
        )

        def scored_and_checkpointed() -> bool:
            values = scrape(first.port)
            return (values.get("streamer_scored_transactions_total", 0) >= KILL_AFTER_SCORED
                    and values.get("streamer_checkpoints_total", 0) >= 1)

        wait_until(scored_and_checkpointed, f"worker 1 to score {KILL_AFTER_SCORED} transactions", first)
        scored_at_kill = scrape(first.port)["streamer_scored_transactions_total"]
        replay_running_at_kill = replay.poll() is None
        kill(first)
    finally:
        if first.process.poll() is None:  # the scenario failed before the kill
            kill(first)
            stop_replay(replay)
    checkpoint = InferenceCheckpoints(settings.inference_checkpoint_dir(WORKER_ID)).store.load_latest()

    # 3. While worker 1 is down: v3, then an invalid v4 that the restarted worker must reject.
    asyncio.run(announce(settings, [(snapshots[2][2], snapshots[2][3]),
                                    (snapshots[2][2], invalid_successor(snapshots[2][3]))]))

    # 4. The restart: same group and data folder. It scores again everything after the checkpoint.
    second = start_worker(env, logs / "worker-2.log")
    try:
        assert replay.wait(timeout=WAIT_TIMEOUT_SECONDS) == 0, (logs / "replay.log").read_text()
        expected = REPLAY_TRANSACTIONS - checkpoint.meta["scored"]
        wait_until(lambda: scrape(second.port).get("streamer_scored_transactions_total", 0) >= expected,
                   f"worker 2 to score the {expected} transactions after the checkpoint", second)
        restarted_metrics = scrape(second.port)
    finally:
        exit_code = stop(second)
        stop_replay(replay)
        replay_output.close()

    return CrashRun(
        rows=rows, offline_features=offline, onnx_by_version={version: onnx for version, onnx, _, _ in snapshots},
        scored_at_kill=scored_at_kill, replay_running_at_kill=replay_running_at_kill, checkpoint=checkpoint,
        restarted_metrics=restarted_metrics, restarted_exit_code=exit_code, restarted_log=second.log_text(),
        scores=asyncio.run(helpers.read_topic(settings, settings.topics.fraud_scores, PARTITIONS)),
    )


# -- the kill --------------------------------------------------------------------------------


def test_kill_lands_while_replay_runs(crash_run: CrashRun):
    assert crash_run.replay_running_at_kill


def test_kill_lands_before_everything_is_scored(crash_run: CrashRun):
    assert crash_run.scored_at_kill < REPLAY_TRANSACTIONS


def test_checkpoint_written_before_kill(crash_run: CrashRun):
    assert crash_run.checkpoint.meta["scored"] > 0


# -- at-least-once ---------------------------------------------------------------------------


def test_every_transaction_scored_at_least_once(crash_run: CrashRun):
    scored = {score["transaction_id"] for score in crash_run.decoded()}
    missing = {row.transaction_id for row in crash_run.rows} - scored
    assert missing == set()


def test_no_score_for_unknown_transaction(crash_run: CrashRun):
    scored = {score["transaction_id"] for score in crash_run.decoded()}
    assert scored <= {row.transaction_id for row in crash_run.rows}


def test_duplicates_are_scores_after_checkpoint(crash_run: CrashRun):
    # Worker 1 scored with v2 only. Its scores beyond the checkpoint are scored again by worker 2.
    duplicates = len(crash_run.scores) - len({score["transaction_id"] for score in crash_run.decoded()})
    assert duplicates == crash_run.versions()[2] - crash_run.checkpoint.meta["scored"]


def test_duplicates_scored_once_by_each_worker(crash_run: CrashRun):
    versions_by_id = defaultdict(list)
    for score in crash_run.decoded():
        versions_by_id[score["transaction_id"]].append(score["model_version"])
    duplicated = {tuple(sorted(v)) for v in versions_by_id.values() if len(v) > 1}
    assert duplicated <= {(2, 3)}


def test_duplicates_share_key_and_partition(crash_run: CrashRun):
    placements = defaultdict(set)
    for record in crash_run.scores:
        placements[orjson.loads(record.value)["transaction_id"]].add((record.key, record.partition))
    assert [tx for tx, placed in placements.items() if len(placed) > 1] == []


# -- snapshot after the restart --------------------------------------------------------------


def test_restarted_worker_scores_after_checkpoint_with_version_3(crash_run: CrashRun):
    assert crash_run.versions()[3] == REPLAY_TRANSACTIONS - crash_run.checkpoint.meta["scored"]


def test_scores_only_from_versions_2_and_3(crash_run: CrashRun):
    assert set(crash_run.versions()) == {2, 3}


def test_restarted_worker_serves_version_3(crash_run: CrashRun):
    assert crash_run.restarted_metrics["streamer_inference_model_version"] == 3


def test_restarted_worker_rejects_invalid_version_4(crash_run: CrashRun):
    assert crash_run.restarted_metrics["streamer_snapshots_rejected_total{reason=invalid_snapshot}"] == 1


# -- features --------------------------------------------------------------------------------


def served_and_expected(crash_run: CrashRun, version: int) -> tuple[np.ndarray, np.ndarray]:
    index = {row.transaction_id: i for i, row in enumerate(crash_run.rows)}
    mine = [score for score in crash_run.decoded() if score["model_version"] == version]
    served = np.array([score["score"] for score in mine])
    rows = [index[score["transaction_id"]] for score in mine]
    return served, offline_scores(crash_run.onnx_by_version[version], crash_run.offline_features[rows])


@pytest.mark.parametrize("version", [2, 3])
def test_scores_equal_uninterrupted_features(crash_run: CrashRun, version: int):
    served, expected = served_and_expected(crash_run, version)
    assert np.max(np.abs(served - expected)) <= OFFLINE_SCORE_ATOL


def test_lost_feature_state_would_change_scores(crash_run: CrashRun):
    # Features of the restarted worker's transactions from an empty state, as before checkpoints:
    # the comparison above must tell them apart.
    scored_again = {score["transaction_id"] for score in crash_run.decoded() if score["model_version"] == 3}
    rows = [row for row in crash_run.rows if row.transaction_id in scored_again]
    by_id = {score["transaction_id"]: score["score"] for score in crash_run.decoded() if score["model_version"] == 3}
    lost = offline_scores(crash_run.onnx_by_version[3], offline_features(rows))
    served_in_row_order = np.array([by_id[row.transaction_id] for row in rows])
    assert np.max(np.abs(served_in_row_order - lost)) > OFFLINE_SCORE_ATOL


def test_restarted_worker_exits_zero_on_sigterm(crash_run: CrashRun):
    assert crash_run.restarted_exit_code == 0, crash_run.restarted_log[-3000:]


def test_restarted_worker_logs_restore(crash_run: CrashRun):
    assert "inference state restored" in crash_run.restarted_log
