"""The updater keeps its consumer group membership while a micro-batch trains for longer than the group limits.

The updater runs in-process against the session's broker. Every training step is made to
sleep `SLOW_STEP_SECONDS`, longer than both the embedded profile's session timeout (2 s)
and a `max_poll_interval_ms` lowered for this test. The consumer's heartbeat task runs
on the event loop, which the pipeline thread leaves free, so the session stays alive.
aiokafka leaves the group when no ``getmany()`` call happens within
``max_poll_interval_ms``, so the updater must keep polling while a batch trains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import streamer.updater as updater_module
from streamer.kafka import EMBEDDED_SESSION_TIMEOUT_MS, consumer_kwargs, ensure_topics
from streamer.metrics import UpdaterMetrics
from streamer.model import load_feature_state, load_model_checkpoint
from streamer.replay import replay
from streamer.settings import Settings
from streamer.trainer import MicroBatchTrainer
from streamer.updater import Updater

pytestmark = pytest.mark.integration

PARTITIONS = 2
REPLAY_START = "2018-07-01"
TRANSACTIONS = 300
# 128 examples per micro-batch: 300 labels make 2 full micro-batches and 1 partial one.
MICROBATCH_SIZE = 128
LABEL_DELAY_DAYS = 0.1
# Milliseconds between two getmany() calls after which aiokafka leaves the group. It is far
# below the 300 s default, so that one slow step exceeds it.
MAX_POLL_INTERVAL_MS = 1_500
# Seconds each training step sleeps before it trains: above both group limits.
SLOW_STEP_SECONDS = 3.0
WAIT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.2


@dataclass
class SlowRun:
    """What the run recorded."""

    registry: CollectorRegistry
    counters: dict[str, int]
    revocations: int  # non-empty revocations between the first assignment and stop()
    generation_before: int
    generation_after: int
    assignment_before: set
    assignment_after: set
    slow_steps: int


@pytest.fixture(scope="module")
def slow_run(settings_factory: Callable[[str], Settings], source_path: Path, handbook_dir: Path) -> SlowRun:
    settings = settings_factory("slow-training").replace(
        partitions=PARTITIONS, source_checkpoint=source_path, microbatch_size=MICROBATCH_SIZE,
        microbatch_max_age_seconds=0.5, label_release_idle_seconds=0.5, checkpoint_interval_seconds=1.0,
        export_every_batches=1000, export_interval_seconds=3600.0,
    )
    with pytest.MonkeyPatch.context() as patch:
        slow_steps = patch_slow_step(patch)
        revocations = patch_revocation_counter(patch)
        patch.setattr(updater_module, "consumer_kwargs", short_poll_interval_kwargs)
        return asyncio.run(run_slow(settings, handbook_dir / "transactions-2018-07.csv.gz", slow_steps,
                                    revocations))


def patch_slow_step(patch: pytest.MonkeyPatch) -> list[float]:
    """Make every training step sleep first; return the list that records each call's start."""
    calls: list[float] = []
    original = MicroBatchTrainer.step

    def slow_step(self, features, labels):
        calls.append(time.monotonic())
        time.sleep(SLOW_STEP_SECONDS)
        return original(self, features, labels)

    patch.setattr(MicroBatchTrainer, "step", slow_step)
    return calls


def patch_revocation_counter(patch: pytest.MonkeyPatch) -> list[set]:
    """Record every non-empty revocation the updater's rebalance listener receives."""
    revoked_sets: list[set] = []
    original = updater_module._Rebalance.on_partitions_revoked

    async def counting(self, revoked):
        if revoked:
            revoked_sets.append(set(revoked))
        await original(self, revoked)

    patch.setattr(updater_module._Rebalance, "on_partitions_revoked", counting)
    return revoked_sets


def short_poll_interval_kwargs(settings: Settings, **kwargs) -> dict:
    built = consumer_kwargs(settings, **kwargs)
    built["max_poll_interval_ms"] = MAX_POLL_INTERVAL_MS
    return built


async def run_slow(settings: Settings, july: Path, slow_steps: list[float], revocations: list[set]) -> SlowRun:
    await ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS)
    source = load_model_checkpoint(settings.source_checkpoint)
    registry = CollectorRegistry()
    updater = Updater(settings, source, UpdaterMetrics(registry), load_feature_state(settings.source_checkpoint, source))
    await updater.start()
    try:
        coordinator = updater._consumer._coordinator
        # The generation is set after the assignment callback, so wait for both.
        await wait_until(lambda: len(updater._consumer.assignment()) == 2 * PARTITIONS and coordinator.generation >= 0,
                         "the first assignment")
        generation_before = coordinator.generation
        # The group may rebalance once while it forms, before the replay, so only later revocations count.
        revoked_before = len(revocations)
        assignment_before = set(updater._consumer.assignment())
        await replay([july], bootstrap=settings.kafka_bootstrap, topics=settings.topics, start=REPLAY_START,
                     limit=TRANSACTIONS, label_delay_days=LABEL_DELAY_DAYS, progress=None)
        await wait_until(lambda: updater.pipeline.counters["examples"] >= TRANSACTIONS, "every example trained")
        # Two session timeouts after the last slow step, so that a leave or a rejoin would show.
        await asyncio.sleep(2 * EMBEDDED_SESSION_TIMEOUT_MS / 1000)
        revoked_while_running = len(revocations) - revoked_before
        generation_after = coordinator.generation
        assignment_after = set(updater._consumer.assignment())
    finally:
        await updater.stop()
    return SlowRun(
        registry=registry, counters=dict(updater.pipeline.counters), revocations=revoked_while_running,
        generation_before=generation_before, generation_after=generation_after,
        assignment_before=assignment_before, assignment_after=assignment_after, slow_steps=len(slow_steps),
    )


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {WAIT_TIMEOUT_SECONDS:.0f} s waiting for {description}")
        await asyncio.sleep(POLL_SECONDS)


def test_slow_steps_exceed_group_limits():
    assert SLOW_STEP_SECONDS * 1000 > max(EMBEDDED_SESSION_TIMEOUT_MS, MAX_POLL_INTERVAL_MS)


def test_slow_steps_ran(slow_run: SlowRun):
    assert slow_run.slow_steps >= 2


def test_slow_training_revokes_no_partition(slow_run: SlowRun):
    assert slow_run.revocations == 0


def test_slow_training_keeps_group_generation(slow_run: SlowRun):
    assert slow_run.generation_after == slow_run.generation_before


def test_slow_training_keeps_assignment(slow_run: SlowRun):
    assert slow_run.assignment_after == slow_run.assignment_before


def test_slow_training_consumes_each_transaction_once(slow_run: SlowRun):
    assert slow_run.counters["transactions"] == TRANSACTIONS


def test_slow_training_consumes_each_label_once(slow_run: SlowRun):
    assert slow_run.counters["labels"] == TRANSACTIONS


def test_slow_training_trains_each_example_once(slow_run: SlowRun):
    assert slow_run.counters["examples"] == TRANSACTIONS
