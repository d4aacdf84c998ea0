"""Snapshot faults at the inference worker: each bad announcement is rejected and v1 keeps serving.

The worker runs in-process against the session's broker. It serves v1, then receives, one
at a time, announcements of snapshots that must be rejected:

- v2, announced by reference after retention deleted its file from the snapshot store;
- v3, whose manifest names the features in another order than this version computes;
- v4, whose manifest names the right features but whose ONNX graph takes fewer inputs.

Truncated files, wrong checksums, a manifest pointing to a missing file and an invalid
announcement are covered by test_inference_worker.py, and files of a failed publish by
tests/unit/test_snapshot_store.py. Afterwards a replay of real July transactions checks
that v1 scored every one of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from prometheus_client import CollectorRegistry

import helpers
from exporters import SnapshotStore, encode_announcement, export_onnx
from helpers import build_model, offline_features
from integration.test_inference_worker import produce, wait_for
from streamer.features import FEATURE_NAMES
from streamer.inference import InferenceWorker
from streamer.kafka import ensure_topics
from streamer.metrics import InferenceMetrics
from streamer.model import FraudMLP, ScoreModule
from streamer.replay import read_transactions, replay
from streamer.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 2
REPLAY_START = "2018-07-01"
REPLAY_TRANSACTIONS = 300
NARROW_WIDTH = len(FEATURE_NAMES) - 1
REJECTED = "invalid_snapshot"
# Seconds after the last rejection during which a late swap would still show.
SETTLE_SECONDS = 1.0


@dataclass
class FaultRun:
    """What the scenario recorded."""

    registry: CollectorRegistry
    # Announced version -> the worker's log lines at ERROR emitted while it was considered.
    rejection_logs: dict[int, list[str]]
    # Announced version -> (rejection counter, served version) read after it was rejected.
    after: dict[int, tuple[float, float]]
    deleted_file_existed: bool
    score_versions: Counter

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


class ListHandler(logging.Handler):
    """A logging handler that keeps the messages of the ERROR records it receives."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def fault_run(settings_factory: Callable[[str], Settings], handbook_dir: Path) -> FaultRun:
    settings = settings_factory("snapshot-faults").replace(partitions=PARTITIONS)
    handler = ListHandler()
    logger = logging.getLogger("streamer.snapshot_follower")
    logger.addHandler(handler)
    try:
        return asyncio.run(run_faults(settings, handbook_dir / "transactions-2018-07.csv.gz", handler))
    finally:
        logger.removeHandler(handler)


def reference_announcement(store: SnapshotStore, manifest) -> tuple[bytes, bytes]:
    """Announce ``manifest`` by reference only, as the updater does for a model above the inline limit."""
    path = store.model_path(manifest.version)
    return encode_announcement(manifest, path.read_bytes(), store_path=str(path.resolve()), inline_limit_bytes=0)


def narrow_announcement(template, probe: np.ndarray) -> tuple[bytes, bytes]:
    """Announce a model of NARROW_WIDTH inputs under a manifest that lists every feature name."""
    torch.manual_seed(4)
    narrow = export_onnx(ScoreModule(FraudMLP(NARROW_WIDTH).eval()), probe[:, :NARROW_WIDTH])
    manifest = dataclasses.replace(
        template, version=4, onnx_file="v000004.onnx", created_at=time.time(),
        sha256=hashlib.sha256(narrow.onnx_bytes).hexdigest(), size_bytes=len(narrow.onnx_bytes),
    )
    return encode_announcement(manifest, narrow.onnx_bytes, store_path="/nonexistent/v000004.onnx")


async def run_faults(settings: Settings, july: Path, handler: ListHandler) -> FaultRun:
    topics = settings.topics
    await ensure_topics(settings.kafka_bootstrap, topics, PARTITIONS)
    rows = [row for _, row in zip(range(REPLAY_TRANSACTIONS), read_transactions([july], start=REPLAY_START))]
    probe = offline_features(rows)[:256]
    # Retention 1: publishing v3 deletes the files of v2.
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=1)

    def publish(seed: int, feature_names: list[str]):
        result = export_onnx(build_model(seed, probe), probe)
        return store.publish(result, feature_names=feature_names, source_model={"name": "untrained"},
                             offsets={}, metrics={})

    v1 = publish(1, list(FEATURE_NAMES))
    v1_record = encode_announcement(v1, store.model_path(1).read_bytes(), store_path=str(store.model_path(1)))
    v2 = publish(2, list(FEATURE_NAMES))
    v2_record = reference_announcement(store, v2)
    v3 = publish(3, list(reversed(FEATURE_NAMES)))
    v3_record = encode_announcement(v3, store.model_path(3).read_bytes(), store_path=str(store.model_path(3)))
    faults = {2: v2_record, 3: v3_record, 4: narrow_announcement(v1, probe)}

    registry = CollectorRegistry()
    worker = InferenceWorker(settings, InferenceMetrics(registry))
    await produce(settings, [(topics.model_snapshots, *v1_record)])
    await worker.start()
    rejection_logs: dict[int, list[str]] = {}
    after: dict[int, tuple[float, float]] = {}
    try:
        await wait_for(registry, "streamer_inference_model_version", {}, 1)
        for count, (version, (key, value)) in enumerate(faults.items(), start=1):
            seen = len(handler.lines)
            await produce(settings, [(topics.model_snapshots, key, value)])
            await wait_for(registry, "streamer_snapshots_rejected_total", {"reason": REJECTED}, count)
            rejection_logs[version] = handler.lines[seen:]
            after[version] = (
                registry.get_sample_value("streamer_snapshots_rejected_total", {"reason": REJECTED}),
                registry.get_sample_value("streamer_inference_model_version"),
            )
        await asyncio.sleep(SETTLE_SECONDS)
        await replay([july], bootstrap=settings.kafka_bootstrap, topics=topics, start=REPLAY_START,
                     limit=REPLAY_TRANSACTIONS, progress=None)
        await wait_for(registry, "streamer_scored_transactions_total", {}, REPLAY_TRANSACTIONS)
    finally:
        await worker.stop()
    scores = await helpers.read_topic(settings, topics.fraud_scores, PARTITIONS)
    return FaultRun(
        registry=registry, rejection_logs=rejection_logs, after=after,
        deleted_file_existed=store.model_path(2).exists(),
        score_versions=Counter(orjson.loads(record.value)["model_version"] for record in scores),
    )


# -- each fault ------------------------------------------------------------------------------

FAULTS = {
    2: "could not be read",  # the file that retention deleted
    3: "expects features",  # feature names in another order
    4: f"expected one of width {len(FEATURE_NAMES)}",  # fewer graph inputs
}


def test_retention_deleted_announced_file(fault_run: FaultRun):
    assert not fault_run.deleted_file_existed


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_moves_rejection_counter(fault_run: FaultRun, version: int):
    assert fault_run.after[version][0] == version - 1


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_keeps_version_1_serving(fault_run: FaultRun, version: int):
    assert fault_run.after[version][1] == 1


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_logs_one_error(fault_run: FaultRun, version: int):
    assert len(fault_run.rejection_logs[version]) == 1


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_log_names_version(fault_run: FaultRun, version: int):
    assert f"snapshot v{version} rejected" in fault_run.rejection_logs[version][0]


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_log_names_reason(fault_run: FaultRun, version: int):
    assert FAULTS[version] in fault_run.rejection_logs[version][0]


@pytest.mark.parametrize("version", sorted(FAULTS))
def test_fault_log_names_served_version(fault_run: FaultRun, version: int):
    assert "still serving version=1" in fault_run.rejection_logs[version][0]


# -- after every fault -----------------------------------------------------------------------


def test_faults_load_no_snapshot(fault_run: FaultRun):
    assert fault_run.sample("streamer_snapshots_loaded_total") == 1


def test_faults_leave_version_1_serving(fault_run: FaultRun):
    assert fault_run.sample("streamer_inference_model_version") == 1


def test_version_1_scores_every_transaction(fault_run: FaultRun):
    assert fault_run.score_versions == Counter({1: REPLAY_TRANSACTIONS})
