"""`streamer snapshots` on a store of real exported ONNX snapshots, with the Kafka announcement captured."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import CONTROL_PIN, CONTROL_UNPIN, SnapshotStore, control_key, decode_announcement, export_onnx
from exporters.onnx_export import ExportResult
from streamer import cli, snapshots_cli
from streamer.errors import BrokerError, ConfigurationError, SnapshotError
from streamer.features import FEATURE_NAMES
from streamer.settings import Settings

MODEL = "fraud"
BOOTSTRAP = "127.0.0.1:1"  # never contacted: the announcement is captured


@pytest.fixture(scope="module")
def exports() -> list[ExportResult]:
    """Three small models of the worker's feature width, each with other weights."""
    probe = np.random.default_rng(0).normal(size=(32, len(FEATURE_NAMES))).astype(np.float32)
    results = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(len(FEATURE_NAMES), 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        results.append(export_onnx(model, probe))
    return results


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=BOOTSTRAP, data_dir=tmp_path, model_name=MODEL, snapshot_retention=5)


@pytest.fixture
def store(settings: Settings, exports: list[ExportResult]) -> SnapshotStore:
    """v1 without metrics, v2 and v3 with live AUC and AP."""
    snapshot_store = SnapshotStore(settings.snapshot_dir, MODEL, settings.snapshot_retention)
    publish(snapshot_store, exports[0], {})
    publish(snapshot_store, exports[1], {"live_auc": 0.875, "live_average_precision": 0.5})
    publish(snapshot_store, exports[2], {"live_auc": 0.9, "live_average_precision": 0.625})
    return snapshot_store


@pytest.fixture
def announced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """The (key, value) records that the CLI would send to model-snapshots."""
    records: list[tuple[bytes, bytes]] = []
    monkeypatch.setattr(snapshots_cli, "_announce", lambda settings, key, value, description: records.append((key, value)))
    return records


def publish(store: SnapshotStore, result: ExportResult, metrics: dict[str, float], feature_names=None):
    return store.publish(result, feature_names=list(feature_names or FEATURE_NAMES),
                         source_model={"name": "test"}, offsets={}, metrics=metrics)


def run(settings: Settings, *argv: str) -> str:
    args = cli.build_parser().parse_args(["snapshots", *argv])
    out = io.StringIO()
    assert snapshots_cli.run(args, settings, out) == 0
    return out.getvalue()


def list_rows(output: str) -> dict[int, str]:
    rows = {}
    for line in output.splitlines()[1:]:
        rows[int(line.split()[0])] = line
    return rows


# -- list and show ------------------------------------------------------------------------


def test_list_shows_every_version(settings: Settings, store: SnapshotStore):
    assert sorted(list_rows(run(settings, "list"))) == [1, 2, 3]


def test_list_shows_sha256_prefix(settings: Settings, store: SnapshotStore):
    row = list_rows(run(settings, "list"))[2]
    assert store.manifest(2).sha256[:12] in row


def test_list_shows_live_metrics(settings: Settings, store: SnapshotStore):
    row = list_rows(run(settings, "list"))[3]
    assert "0.9000" in row
    assert "0.6250" in row


def test_list_shows_dash_for_missing_metric(settings: Settings, store: SnapshotStore):
    assert list_rows(run(settings, "list"))[1].split()[4:6] == ["-", "-"]


def test_list_marks_newest_serving_unpinned(settings: Settings, store: SnapshotStore):
    rows = list_rows(run(settings, "list"))
    assert rows[3].endswith("serving")
    assert "pinned" not in run(settings, "list")


def test_list_marks_pinned_version(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "2")
    rows = list_rows(run(settings, "list"))
    assert rows[2].endswith("pinned, serving")
    assert rows[3].split()[-1] == "0.6250"


def test_list_empty_store(settings: Settings):
    assert run(settings, "list").startswith("no snapshots of model fraud")


def test_show_prints_manifest_json(settings: Settings, store: SnapshotStore):
    assert json.loads(run(settings, "show", "2")) == store.manifest(2).to_dict()


def test_show_missing_version_fails(settings: Settings, store: SnapshotStore):
    with pytest.raises(SnapshotError, match="v9 not found"):
        run(settings, "show", "9")


# -- pin ----------------------------------------------------------------------------------


def test_pin_records_pin_in_store(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "2")
    assert store.pinned().version == 2


def test_pin_announces_under_control_key(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "v2")
    assert [key for key, _ in announced] == [control_key(MODEL)]


def test_pin_announcement_carries_model(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "2")
    announcement = decode_announcement(announced[0][1], key=announced[0][0])
    assert announcement.control == CONTROL_PIN
    assert announcement.manifest == store.manifest(2)
    assert announcement.onnx_bytes == store.load(2)[1]


def test_pin_pruned_version_rejected(settings: Settings, store: SnapshotStore, exports, announced):
    pruning = SnapshotStore(settings.snapshot_dir, MODEL, retention=1)
    publish(pruning, exports[0], {})
    with pytest.raises(SnapshotError, match="v2 not found"):
        run(settings, "pin", "2")
    assert store.pinned() is None
    assert announced == []


def test_pin_corrupt_file_rejected(settings: Settings, store: SnapshotStore, announced):
    path = store.model_path(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="SHA-256"):
        run(settings, "pin", "2")
    assert store.pinned() is None
    assert announced == []


def test_pin_other_features_rejected(settings: Settings, store: SnapshotStore, exports, announced):
    manifest = publish(store, exports[0], {}, feature_names=list(reversed(FEATURE_NAMES)))
    with pytest.raises(SnapshotError, match="expects features"):
        run(settings, "pin", str(manifest.version))
    assert announced == []


def test_pin_missing_version_exit_code(settings: Settings, store: SnapshotStore, announced):
    argv = ["snapshots", "pin", "7", "--data-dir", str(settings.data_dir), "--bootstrap", BOOTSTRAP]
    assert cli.main(argv) == 2
    assert announced == []


def test_pin_failed_announcement_restores_previous(settings: Settings, store: SnapshotStore,
                                                  monkeypatch: pytest.MonkeyPatch, announced):
    run(settings, "pin", "1")

    def fail(settings, key, value, description):
        raise BrokerError("broker unreachable (simulated)")

    monkeypatch.setattr(snapshots_cli, "_announce", fail)
    with pytest.raises(BrokerError):
        run(settings, "pin", "3")
    assert store.pinned().version == 1


def test_pin_failed_announcement_leaves_unpinned(settings: Settings, store: SnapshotStore,
                                                monkeypatch: pytest.MonkeyPatch):
    def fail(settings, key, value, description):
        raise BrokerError("broker unreachable (simulated)")

    monkeypatch.setattr(snapshots_cli, "_announce", fail)
    with pytest.raises(BrokerError):
        run(settings, "pin", "3")
    assert store.pinned() is None


def test_rollback_without_bootstrap_names_rollback(settings: Settings, store: SnapshotStore, announced):
    with pytest.raises(ConfigurationError, match="snapshots rollback announces"):
        run(settings.replace(kafka_bootstrap=""), "rollback")


def test_pin_without_bootstrap_rejected(settings: Settings, store: SnapshotStore, announced):
    with pytest.raises(Exception, match="STREAMER_KAFKA_BOOTSTRAP"):
        run(settings.replace(kafka_bootstrap=""), "pin", "2")
    assert store.pinned() is None


def test_retention_keeps_pinned_version(settings: Settings, store: SnapshotStore, exports, announced):
    run(settings, "pin", "1")
    pruning = SnapshotStore(settings.snapshot_dir, MODEL, retention=2)
    for result in exports:
        publish(pruning, result, {})
    assert store.versions() == [1, 5, 6]


# -- unpin --------------------------------------------------------------------------------


def test_unpin_deletes_pin(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "2")
    run(settings, "unpin")
    assert store.pinned() is None


def test_unpin_announces_released_version(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "2")
    run(settings, "unpin")
    announcement = decode_announcement(announced[-1][1], key=announced[-1][0])
    assert announcement.control == CONTROL_UNPIN
    assert announcement.manifest.version == 2


def test_unpin_without_pin_says_none_was_recorded(settings: Settings, store: SnapshotStore, announced):
    assert "no pin was recorded" in run(settings, "unpin")


def test_unpin_without_pin_still_announces(settings: Settings, store: SnapshotStore, announced):
    run(settings, "unpin")
    announcement = decode_announcement(announced[0][1], key=announced[0][0])
    assert announcement.control == CONTROL_UNPIN
    assert announcement.manifest.version == 3


def test_unpin_failed_announcement_keeps_pin(settings: Settings, store: SnapshotStore,
                                            monkeypatch: pytest.MonkeyPatch, announced):
    run(settings, "pin", "2")

    def fail(settings, key, value, description):
        raise BrokerError("broker unreachable (simulated)")

    monkeypatch.setattr(snapshots_cli, "_announce", fail)
    with pytest.raises(BrokerError):
        run(settings, "unpin")
    assert store.pinned().version == 2


def test_unpin_corrupt_pin_record(settings: Settings, store: SnapshotStore, announced):
    (store.directory / "pin.json").write_bytes(b"{not json")
    run(settings, "unpin")
    assert not (store.directory / "pin.json").exists()


# -- rollback -----------------------------------------------------------------------------


def test_rollback_pins_version_before_newest(settings: Settings, store: SnapshotStore, announced):
    run(settings, "rollback")
    assert store.pinned().version == 2


def test_rollback_twice_goes_further_back(settings: Settings, store: SnapshotStore, announced):
    run(settings, "rollback")
    run(settings, "rollback")
    assert store.pinned().version == 1


def test_rollback_skips_pruned_versions(settings: Settings, store: SnapshotStore, announced):
    store.model_path(2).unlink()
    (store.directory / "v000002.json").unlink()
    run(settings, "rollback")
    assert store.pinned().version == 1


def test_rollback_without_older_version_fails(settings: Settings, store: SnapshotStore, announced):
    run(settings, "pin", "1")
    with pytest.raises(SnapshotError, match="no version before v1"):
        run(settings, "rollback")
    assert store.pinned().version == 1
