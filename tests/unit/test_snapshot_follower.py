"""SnapshotFollower on records of real exported snapshots: newest valid version, pins and unpins."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from exporters import CONTROL_PIN, SnapshotStore, encode_announcement, encode_unpin, export_onnx
from streamer.features import FEATURE_NAMES
from streamer.metrics import InferenceMetrics
from streamer.snapshot_follower import SnapshotFollower

MODEL = "fraud"


class Record(NamedTuple):
    """The two fields of an aiokafka ConsumerRecord that the follower reads."""

    key: bytes
    value: bytes


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SnapshotStore:
    """Versions 1 to 4 of small models of the worker's feature width."""
    snapshot_store = SnapshotStore(tmp_path_factory.mktemp("snapshots"), MODEL, retention=10)
    probe = np.random.default_rng(0).normal(size=(32, len(FEATURE_NAMES))).astype(np.float32)
    for seed in range(4):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(len(FEATURE_NAMES), 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        snapshot_store.publish(export_onnx(model, probe), feature_names=list(FEATURE_NAMES),
                               source_model={"name": "test"}, offsets={}, metrics={})
    return snapshot_store


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def follower(registry: CollectorRegistry):
    executor = ThreadPoolExecutor(1)
    yield SnapshotFollower(MODEL, InferenceMetrics(registry), executor)
    executor.shutdown()


def regular(store: SnapshotStore, version: int) -> Record:
    manifest, data = store.load(version)
    return Record(*encode_announcement(manifest, data, store_path=str(store.model_path(version))))


def pin(store: SnapshotStore, version: int) -> Record:
    manifest, data = store.load(version)
    return Record(*encode_announcement(manifest, data, store_path=str(store.model_path(version)),
                                       control=CONTROL_PIN))


def corrupt_pin(store: SnapshotStore, version: int) -> Record:
    key, value = pin(store, version)
    data = json.loads(value)
    model = bytearray(base64.b64decode(data["onnx_base64"]))
    model[len(model) // 2] ^= 0xFF
    data["onnx_base64"] = base64.b64encode(bytes(model)).decode()
    return Record(key, json.dumps(data).encode())


def unpin(store: SnapshotStore, version: int) -> Record:
    return Record(*encode_unpin(store.manifest(version), store_path=str(store.model_path(version))))


def follow(follower: SnapshotFollower, *polls: list[Record]) -> None:
    async def run() -> None:
        for records in polls:
            await follower.follow(records)

    asyncio.run(run())


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


def test_follower_serves_newest_regular(follower, store):
    follow(follower, [regular(store, 1), regular(store, 2)])
    assert follower.served.version == 2


def test_follower_pin_swaps_to_lower_version(follower, store):
    follow(follower, [regular(store, 3)], [pin(store, 2)])
    assert follower.served.version == 2
    assert follower.pinned_version == 2


def test_follower_pin_sets_gauge(follower, store, registry):
    follow(follower, [regular(store, 3)], [pin(store, 2)])
    assert sample(registry, "streamer_inference_pinned_version") == 2


def test_follower_unpin_clears_gauge(follower, store, registry):
    follow(follower, [regular(store, 3)], [pin(store, 2)], [unpin(store, 2)])
    assert sample(registry, "streamer_inference_pinned_version") == 0


def test_follower_pinned_ignores_newer(follower, store):
    follow(follower, [regular(store, 2)], [pin(store, 2)], [regular(store, 4)])
    assert follower.served.version == 2


def test_follower_pinned_logs_ignored_once(follower, store, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="streamer.snapshot_follower"):
        follow(follower, [regular(store, 2)], [pin(store, 2)], [regular(store, 3)], [regular(store, 4)])
    ignored = [r for r in caplog.records if "ignored while pinned" in r.getMessage()]
    assert len(ignored) == 1


def test_follower_unpin_serves_newest_seen(follower, store):
    follow(follower, [regular(store, 3)], [pin(store, 2)], [regular(store, 4)], [unpin(store, 2)])
    assert follower.served.version == 4
    assert follower.pinned_version is None


def test_follower_unpin_skips_invalid_newest(follower, store):
    key, value = regular(store, 4)
    broken = json.loads(value)
    broken["manifest"]["sha256"] = "0" * 64
    follow(follower, [regular(store, 3)], [pin(store, 1)], [Record(key, json.dumps(broken).encode())],
           [unpin(store, 1)])
    assert follower.served.version == 3


def test_follower_corrupt_pin_rejected(follower, store, registry):
    follow(follower, [regular(store, 3)], [corrupt_pin(store, 2)])
    assert follower.served.version == 3
    assert follower.pinned_version is None
    assert sample(registry, "streamer_snapshots_rejected_total", {"reason": "invalid_snapshot"}) == 1


def test_follower_corrupt_pin_keeps_previous_pin(follower, store):
    follow(follower, [regular(store, 3)], [pin(store, 2)], [corrupt_pin(store, 1)])
    assert follower.served.version == 2
    assert follower.pinned_version == 2


def test_follower_one_poll_ends_pinned(follower, store, registry):
    follow(follower, [regular(store, 1), regular(store, 2), regular(store, 3), pin(store, 2), regular(store, 4)])
    assert follower.served.version == 2
    assert follower.pinned_version == 2
    assert sample(registry, "streamer_snapshots_loaded_total") == 1


def test_follower_one_poll_ends_unpinned(follower, store):
    follow(follower, [regular(store, 1), pin(store, 1), regular(store, 4), unpin(store, 1)])
    assert follower.served.version == 4
    assert follower.pinned_version is None


def test_follower_pin_of_served_version_no_reload(follower, store, registry):
    follow(follower, [regular(store, 2)], [pin(store, 2)])
    assert follower.pinned_version == 2
    assert sample(registry, "streamer_snapshots_loaded_total") == 1


def test_follower_pin_delay_not_observed(follower, store, registry):
    follow(follower, [regular(store, 3)], [pin(store, 2)])
    assert sample(registry, "streamer_update_to_serving_delay_seconds_count") == 1


def test_follower_other_model_control_rejected(follower, store, registry):
    _, value = pin(store, 2)
    follow(follower, [regular(store, 3)], [Record(b"fraud/control", value.replace(b'"fraud"', b'"ranking"'))])
    assert follower.served.version == 3
    assert sample(registry, "streamer_snapshots_rejected_total", {"reason": "invalid_announcement"}) == 1


def test_follower_skips_other_keys(follower, store):
    key, value = pin(store, 1)
    follow(follower, [regular(store, 3)], [Record(b"ranking/control", value)])
    assert follower.served.version == 3


def test_follower_pin_by_reference_missing_file(follower, store, tmp_path: Path, registry):
    manifest, data = store.load(2)
    key, value = encode_announcement(manifest, data, store_path=str(tmp_path / "v000002.onnx"),
                                     inline_limit_bytes=0, control=CONTROL_PIN)
    follow(follower, [regular(store, 3)], [Record(key, value)])
    assert follower.served.version == 3
    assert sample(registry, "streamer_snapshots_rejected_total", {"reason": "invalid_snapshot"}) == 1
