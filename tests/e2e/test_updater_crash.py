"""Fault injection: the updater killed with SIGKILL at several points of a replay loses and repeats nothing.

Two runs consume the same 4,157 July transactions and their labels, replayed in the same
six chunks into each run's own topics. The reference run is never interrupted. In the
other one, a chunk is replayed before each start, and each run is killed. Crash points
(`streamer.faults`) kill it during a micro-batch, between writing a checkpoint and
renaming it, between renaming it and pointing LATEST at it, after an ONNX export was
built, and after the export was stored but before it was announced. One more kill comes
from outside at no particular point. The run is then left to finish and stopped with
SIGTERM.

Afterwards the training ledger (`streamer.ledger`) of each run must list every replayed
transaction exactly once, the final feature states must be equal, and the snapshot
versions must only ever go up, with no version number reused for different weights.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import helpers
from exporters import SnapshotStore, decode_announcement
from streamer.checkpoint import CheckpointStore
from streamer.features import FeatureState
from streamer.ledger import read_ledger
from streamer.replay import read_transactions
from streamer.settings import Settings
from workers import (
    ORPHAN_GRACE_SECONDS, free_port, run_command, session_members, start_worker, stop_worker, wait_until, worker_env,
)

pytestmark = pytest.mark.e2e

PARTITIONS = 4
# Event-time chunks of 2018-07-01 with 879, 813, 552, 546, 668 and 699 transactions: one per
# run of the killed updater, so that each run has work to be killed in.
CHUNKS = (("00:00", "05:00"), ("05:00", "07:00"), ("07:00", "08:00"), ("08:00", "09:00"), ("09:00", "10:00"),
          ("10:00", "11:00"))
DAY = "2018-07-01T"
LABEL_DELAY_DAYS = 0.1
# Each run with a crash point must die there; a run still alive after this many seconds fails.
CRASH_TIMEOUT_SECONDS = 90
# (crash point, how many times it is passed before the kill), in the order of the runs. The
# run on the last chunk is killed from outside.
CRASHES = (
    ("microbatch.trained", 10),
    ("checkpoint.written", 2),
    ("checkpoint.renamed", 2),
    ("export.converted", 2),
    ("export.published", 2),
)
WORKER_SETTINGS = {
    "STREAMER_TRAINING_LEDGER": "1",
    "STREAMER_CHECKPOINT_INTERVAL_SECONDS": "0.5",
    "STREAMER_EXPORT_EVERY_BATCHES": "3",
}


@dataclass
class RunResult:
    """What one updater run left behind."""

    ledger: np.ndarray
    features: dict[str, np.ndarray]
    announcements: list[tuple[int, str]]  # (version, sha256) in the order announced
    store_versions: list[int]
    crash_codes: list[int | None]
    leftovers: list[int]  # pids still alive in a killed worker's session
    counters: dict[str, int]  # of the final checkpoint
    final_exit_code: int | None
    logs: str


def _replay(july: Path, chunk: tuple[str, str], env: dict, log: Path) -> None:
    args = ["replay", str(july), "--start", DAY + chunk[0], "--end", DAY + chunk[1],
            "--label-delay-days", str(LABEL_DELAY_DAYS)]
    assert run_command(args, env, log) == 0, log.read_text()


def _ledger_path(settings: Settings) -> Path:
    return settings.data_dir / "ledger" / f"{settings.model_name}.ids"


def _ledger_length(settings: Settings) -> int:
    path = _ledger_path(settings)
    return len(read_ledger(path)) if path.exists() else 0


async def _announcements(settings: Settings) -> list[tuple[int, str]]:
    records = await helpers.read_topic(settings, settings.topics.model_snapshots, 1)
    manifests = [decode_announcement(r.value).manifest for r in records]
    return [(m.version, m.sha256) for m in manifests]


def _finish(settings: Settings, env: dict, logs: Path, name: str, crash_codes: list, leftovers: list) -> RunResult:
    """Start the updater without a crash point, wait until it trained every example, stop it with SIGTERM."""
    worker = start_worker(name, "update", env, logs, int(env["STREAMER_UPDATER_METRICS_PORT"]))
    try:
        wait_until(lambda: _ledger_length(settings) >= len(_replayed_ids()),
                   f"{name} to train on every replayed transaction", [worker])
    finally:
        code, _ = stop_worker(worker)
    log_text = "".join(path.read_text(errors="replace") for path in sorted(logs.glob(f"{name.split('-')[0]}-*.log")))
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    return RunResult(
        ledger=read_ledger(_ledger_path(settings)),
        features=checkpoint.features,
        announcements=asyncio.run(_announcements(settings)),
        store_versions=SnapshotStore(settings.snapshot_dir, settings.model_name, 1000).versions(),
        crash_codes=crash_codes, leftovers=leftovers, counters=checkpoint.meta["counters"],
        final_exit_code=code, logs=log_text,
    )


def _run_until_killed(worker, description: str, leftovers: list[int]) -> int | None:
    """Wait for the worker to be killed; add the pids its session still has a moment later to ``leftovers``."""
    try:
        code = worker.process.wait(timeout=CRASH_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()
        pytest.fail(f"{description} never happened:\n{worker.log_text()[-3000:]}")
    finally:
        worker.output.close()
    # The export process and multiprocessing's resource tracker exit when their pipes close.
    deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
    while session_members(worker.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers += session_members(worker.process.pid)
    return code


@pytest.fixture(scope="module")
def runs(settings_factory, handbook_dir: Path, source_path: Path, tmp_path_factory) -> dict[str, RunResult]:
    july = handbook_dir / "transactions-2018-07.csv.gz"
    logs = tmp_path_factory.mktemp("crash-logs")
    results = {}

    # The reference: every chunk produced first, then one updater that is only stopped at the end.
    reference = settings_factory("crash-reference").replace(partitions=PARTITIONS)
    env = worker_env(reference, source_path, free_port(), free_port(), PARTITIONS, **WORKER_SETTINGS)
    for i, chunk in enumerate(CHUNKS):
        _replay(july, chunk, env, logs / f"reference-replay-{i}.log")
    results["reference"] = _finish(reference, env, logs, "reference", [], [])

    # The killed run: one chunk more before each start, and every run killed.
    killed = settings_factory("crash-killed").replace(partitions=PARTITIONS)
    env = worker_env(killed, source_path, free_port(), free_port(), PARTITIONS, **WORKER_SETTINGS)
    port = int(env["STREAMER_UPDATER_METRICS_PORT"])
    codes, leftovers = [], []
    for run, (point, count) in enumerate(CRASHES):
        _replay(july, CHUNKS[run], env, logs / f"killed-replay-{run}.log")
        worker = start_worker(f"killed-{run}", "update", {**env, "STREAMER_CRASH_AT": f"{point}:{count}"}, logs, port)
        codes.append(_run_until_killed(worker, f"crash point {point}:{count}", leftovers))
    # One kill from outside, at whatever the worker is doing once it trains again.
    _replay(july, CHUNKS[-1], env, logs / "killed-replay-last.log")
    worker = start_worker("killed-outside", "update", env, logs, port)
    trained_before = _ledger_length(killed)
    wait_until(lambda: _ledger_length(killed) > trained_before, "killed-outside to train", [worker])
    worker.process.send_signal(signal.SIGKILL)
    codes.append(_run_until_killed(worker, "the SIGKILL from outside", leftovers))
    results["killed"] = _finish(killed, env, logs, "killed-final", codes, leftovers)
    return results


@functools.lru_cache(maxsize=1)
def _replayed_ids() -> tuple[int, ...]:
    rows = read_transactions([helpers.HANDBOOK_DIR / "transactions-2018-07.csv.gz"],
                             start=DAY + CHUNKS[0][0], end=DAY + CHUNKS[-1][1])
    return tuple(row.transaction_id for row in rows)


def _per_key(features: dict[str, np.ndarray], prefix: str) -> dict[int, list[int]]:
    """Event times per key of a feature table, pruned at the end of the replay.

    Each run prunes entries that no window reaches any more at its own moments, so the
    states are compared after pruning both at the same event time. Keys are compared
    independently of the order they were first seen in.
    """
    state = FeatureState.from_state_dict(features)
    state.prune(_end_ms())
    pruned = state.state_dict()
    ends = np.cumsum(pruned[f"{prefix}_lengths"])
    starts = ends - pruned[f"{prefix}_lengths"]
    times = pruned[f"{prefix}_times"]
    return {
        key: sorted(times[start:end].tolist())
        for key, start, end in zip(pruned[f"{prefix}_keys"].tolist(), starts.tolist(), ends.tolist())
    }


def _end_ms() -> int:
    return int(np.datetime64(DAY + CHUNKS[-1][1], "ms").astype(np.int64))


@pytest.mark.parametrize("run", ["reference", "killed"])
def test_every_replayed_transaction_trained_exactly_once(runs: dict[str, RunResult], run: str):
    assert Counter(runs[run].ledger.tolist()) == Counter(_replayed_ids())


def test_crash_points_killed_the_worker(runs: dict[str, RunResult]):
    assert runs["killed"].crash_codes == [-signal.SIGKILL] * (len(CRASHES) + 1)


def test_killed_worker_leaves_no_process_behind(runs: dict[str, RunResult]):
    assert runs["killed"].leftovers == []


@pytest.mark.parametrize("counter", ["transactions", "labels", "examples"])
def test_killed_run_counts_each_event_once(runs: dict[str, RunResult], counter: str):
    assert runs["killed"].counters[counter] == len(_replayed_ids())


def test_crash_points_were_reached(runs: dict[str, RunResult]):
    reached = [point for point, _ in CRASHES if f"crash point reached point={point}" in runs["killed"].logs]
    assert reached == [point for point, _ in CRASHES]


@pytest.mark.parametrize("run", ["reference", "killed"])
def test_final_stop_exits_zero(runs: dict[str, RunResult], run: str):
    assert runs[run].final_exit_code == 0


@pytest.mark.parametrize("table", ["customer", "terminal", "fraud"])
def test_killed_run_feature_state_equals_reference(runs: dict[str, RunResult], table: str):
    assert _per_key(runs["killed"].features, table) == _per_key(runs["reference"].features, table)


def test_reference_feature_state_is_not_empty(runs: dict[str, RunResult]):
    assert len(_per_key(runs["reference"].features, "customer")) > 100


def test_killed_run_announced_versions_never_go_back(runs: dict[str, RunResult]):
    versions = [version for version, _ in runs["killed"].announcements]
    assert versions == sorted(versions)


def test_killed_run_reuses_no_version_for_other_weights(runs: dict[str, RunResult]):
    digests: dict[int, set[str]] = {}
    for version, sha256 in runs["killed"].announcements:
        digests.setdefault(version, set()).add(sha256)
    assert {v: d for v, d in digests.items() if len(d) > 1} == {}


def test_killed_run_store_versions_are_unique_and_rising(runs: dict[str, RunResult]):
    versions = runs["killed"].store_versions
    assert versions == sorted(set(versions))


def test_killed_run_announced_every_stored_version_it_kept(runs: dict[str, RunResult]):
    # A crash between storing and announcing leaves one version unannounced until the restart.
    announced = {version for version, _ in runs["killed"].announcements}
    assert set(runs["killed"].store_versions) - announced == set()
