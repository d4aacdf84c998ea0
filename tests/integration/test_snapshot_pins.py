"""Pins and rollbacks from `streamer snapshots` followed by inference workers on the session's broker.

One module-scoped scenario, with real July transactions in five chunks on five days:

0. v1, v2, v3 are announced; worker A serves v3 and scores chunk 0.
1. `streamer snapshots rollback` pins v2; A swaps to v2 and scores chunk 1.
2. The updater's way announces v4; A ignores it while pinned and scores chunk 2 with v2.
3. A stops and worker B starts from the same checkpoint folder. B reads the topic from the
   beginning, honours the pin and scores chunk 3 with v2.
4. `streamer snapshots unpin`; B swaps to v4 and scores chunk 4.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

import helpers
from exporters import SnapshotStore
from helpers import build_model, offline_features
from integration.test_inference_worker import produce, publish_snapshot
from streamer import cli, snapshots_cli
from streamer.inference import InferenceWorker
from streamer.kafka import ensure_topics
from streamer.metrics import InferenceMetrics
from streamer.replay import read_transactions, replay
from streamer.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 2
CHUNK_DAYS = ("2018-07-01", "2018-07-02", "2018-07-03", "2018-07-04", "2018-07-05")
CHUNK_TRANSACTIONS = 200
# Seconds the scenario waits for a worker to reach an expected state before it fails.
WAIT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.1


class InfoLines(logging.Handler):
    """Keeps the messages of the records it receives."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class PinRun:
    """What the scenario recorded."""

    chunk_ids: list[set[int]]
    scores: list[dict]
    # Served and pinned versions, by the step after which they were read.
    served: dict[str, tuple[int, int | None]]
    # Log lines about ignored announcements, by worker.
    ignored_logs: dict[str, list[str]]
    pin_after_unpin: object

    def versions_of(self, chunk: int) -> Counter:
        return Counter(s["model_version"] for s in self.scores if s["transaction_id"] in self.chunk_ids[chunk])


@pytest.fixture(scope="module")
def pin_run(settings_factory: Callable[[str], Settings], handbook_dir: Path) -> PinRun:
    settings = settings_factory("snapshot-pins").replace(partitions=PARTITIONS)
    handler = InfoLines()
    logger = logging.getLogger("streamer.snapshot_follower")
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        return asyncio.run(run_pins(settings, handbook_dir / "transactions-2018-07.csv.gz", handler))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


async def run_pins(settings: Settings, july: Path, handler: InfoLines) -> PinRun:
    topics = settings.topics
    await ensure_topics(settings.kafka_bootstrap, topics, PARTITIONS)
    chunks = [[row for _, row in zip(range(CHUNK_TRANSACTIONS), read_transactions([july], start=day))]
              for day in CHUNK_DAYS]
    probe = offline_features(chunks[0])[:256]
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=10)
    snapshots = [publish_snapshot(store, build_model(seed, probe), probe) for seed in (1, 2, 3)]
    await produce(settings, [(topics.model_snapshots, s.key, s.value) for s in snapshots])
    served: dict[str, tuple[int, int | None]] = {}

    worker = InferenceWorker(settings, InferenceMetrics(CollectorRegistry()))
    await worker.start()
    try:
        await wait_until(lambda: worker.served is not None and worker.served.version == 3, "A serves v3")
        await score_chunk(settings, july, worker, 0)

        await run_cli(settings, "rollback")
        await wait_until(lambda: worker.served.version == 2, "A serves v2 after rollback")
        served["rollback"] = (worker.served.version, worker.snapshot_follower.pinned_version)
        await score_chunk(settings, july, worker, 1)

        v4 = publish_snapshot(store, build_model(4, probe), probe)
        await produce(settings, [(topics.model_snapshots, v4.key, v4.value)])
        await wait_until(lambda: any("ignored while pinned" in line for line in handler.lines), "A ignores v4")
        served["v4 announced"] = (worker.served.version, worker.snapshot_follower.pinned_version)
        await score_chunk(settings, july, worker, 2)
    finally:
        await worker.stop()
    ignored_by_first = ignored_lines(handler)
    handler.lines.clear()

    restarted = InferenceWorker(settings, InferenceMetrics(CollectorRegistry()))
    await restarted.start()
    try:
        await wait_until(lambda: restarted.snapshot_follower.pinned_version == 2, "B follows the pin")
        served["restart"] = (restarted.served.version, restarted.snapshot_follower.pinned_version)
        await score_chunk(settings, july, restarted, 3)

        await run_cli(settings, "unpin")
        await wait_until(lambda: restarted.served.version == 4, "B serves v4 after unpin")
        served["unpin"] = (restarted.served.version, restarted.snapshot_follower.pinned_version)
        await score_chunk(settings, july, restarted, 4)
    finally:
        await restarted.stop()

    records = await helpers.read_topic(settings, topics.fraud_scores, PARTITIONS, WAIT_TIMEOUT_SECONDS)
    return PinRun(
        chunk_ids=[{row.transaction_id for row in chunk} for chunk in chunks],
        scores=[orjson.loads(record.value) for record in records],
        served=served,
        ignored_logs={"A": ignored_by_first, "B": ignored_lines(handler)},
        pin_after_unpin=store.pinned(),
    )


def ignored_lines(handler: InfoLines) -> list[str]:
    return [line for line in handler.lines if "ignored while pinned" in line]


async def run_cli(settings: Settings, action: str) -> None:
    """Run `streamer snapshots ACTION` in a thread, because it runs its own event loop."""
    args = cli.build_parser().parse_args(["snapshots", action])
    code = await asyncio.to_thread(snapshots_cli.run, args, settings, io.StringIO())
    if code != 0:
        raise RuntimeError(f"streamer snapshots {action} exited with {code}")


async def score_chunk(settings: Settings, july: Path, worker: InferenceWorker, chunk: int) -> None:
    """Replay one chunk and wait until the worker has scored it."""
    target = worker.scored + CHUNK_TRANSACTIONS
    await replay([july], bootstrap=settings.kafka_bootstrap, topics=settings.topics, start=CHUNK_DAYS[chunk],
                 limit=CHUNK_TRANSACTIONS, progress=None)
    await wait_until(lambda: worker.scored >= target, f"chunk {chunk} scored")


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description}: not reached within {WAIT_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


def test_rollback_swaps_to_v2(pin_run: PinRun):
    assert pin_run.served["rollback"] == (2, 2)


def test_pinned_worker_ignores_v4(pin_run: PinRun):
    assert pin_run.served["v4 announced"] == (2, 2)


@pytest.mark.parametrize("worker", ["A", "B"])
def test_pinned_worker_logs_ignore_once(pin_run: PinRun, worker: str):
    assert len(pin_run.ignored_logs[worker]) == 1


def test_ignore_log_names_versions(pin_run: PinRun):
    assert "version=4 ignored while pinned" in pin_run.ignored_logs["A"][0]


def test_restarted_worker_honours_pin(pin_run: PinRun):
    assert pin_run.served["restart"] == (2, 2)


def test_unpin_swaps_to_v4(pin_run: PinRun):
    assert pin_run.served["unpin"] == (4, None)


def test_unpin_clears_store_pin(pin_run: PinRun):
    assert pin_run.pin_after_unpin is None


@pytest.mark.parametrize(("chunk", "version"), [(0, 3), (1, 2), (2, 2), (3, 2), (4, 4)])
def test_chunk_scored_by_version(pin_run: PinRun, chunk: int, version: int):
    assert set(pin_run.versions_of(chunk)) == {version}


@pytest.mark.parametrize("chunk", range(len(CHUNK_DAYS)))
def test_chunk_scored_completely(pin_run: PinRun, chunk: int):
    scored = {s["transaction_id"] for s in pin_run.scores if s["transaction_id"] in pin_run.chunk_ids[chunk]}
    assert scored == pin_run.chunk_ids[chunk]
