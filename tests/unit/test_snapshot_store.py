"""SnapshotStore and Manifest on real files, with a real exported ONNX model."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.onnx_export import ExportResult, export_onnx
from exporters.store import Manifest, SnapshotStore
from streamer.errors import ConfigurationError, SnapshotError

N_FEATURES = 15
FEATURE_NAMES = [f"feature_{index}" for index in range(N_FEATURES)]
MODEL_NAME = "fraud"


@pytest.fixture(scope="module")
def exported() -> ExportResult:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
        torch.nn.Sigmoid(),
    )
    probe = np.random.default_rng(0).normal(size=(32, N_FEATURES)).astype(np.float32)
    return export_onnx(model, probe)


def publish(store: SnapshotStore, result: ExportResult, offset: int = 100) -> Manifest:
    return store.publish(
        result,
        feature_names=FEATURE_NAMES,
        source_model={"name": "fraud-source", "sha256": "ab" * 32, "trained_on": "2018-04"},
        offsets={"transactions": {"0": offset, "1": offset + 7}, "labels": {"0": offset // 2}},
        metrics={"prequential_auc": 0.87, "prequential_log_loss": 0.041},
    )


def model_files(store: SnapshotStore) -> list[str]:
    return sorted(entry.name for entry in store.directory.iterdir() if entry.name.startswith("v"))


def temporary_files(store: SnapshotStore) -> list[str]:
    return sorted(entry.name for entry in store.directory.iterdir() if entry.name.startswith(".tmp-"))


def fail_replace_for(monkeypatch: pytest.MonkeyPatch, file_name: str) -> None:
    """Make os.replace raise, as a crash would interrupt the publish, when it renames onto ``file_name``."""
    real_replace = os.replace

    def replace(source, destination):
        if Path(destination).name == file_name:
            raise OSError(28, "No space left on device (simulated)")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)


def test_publish_versions_increase(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    published = [publish(store, exported, offset=index).version for index in range(3)]
    assert published == [1, 2, 3]
    assert store.versions() == [1, 2, 3]
    assert store.latest().version == 3


def test_publish_file_layout(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    manifest = publish(store, exported)
    assert model_files(store) == ["v000001.json", "v000001.onnx"]
    assert manifest.onnx_file == "v000001.onnx"
    assert store.model_path(1) == tmp_path / MODEL_NAME / "v000001.onnx"
    assert temporary_files(store) == []


def test_publish_manifest_contents(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    manifest = publish(store, exported, offset=40)
    assert manifest.model_name == MODEL_NAME
    assert manifest.sha256 == exported.sha256
    assert manifest.size_bytes == len(exported.onnx_bytes)
    assert manifest.feature_names == FEATURE_NAMES
    assert manifest.offsets == {"transactions": {"0": 40, "1": 47}, "labels": {"0": 20}}
    assert manifest.parity_max_abs_diff == exported.max_abs_diff
    assert manifest.input_name == "features"
    assert store.manifest(1) == manifest


def test_retention_keeps_last_versions(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=2)
    for index in range(4):
        publish(store, exported, offset=index)
    assert store.versions() == [3, 4]
    assert model_files(store) == ["v000003.json", "v000003.onnx", "v000004.json", "v000004.onnx"]
    assert [manifest.version for manifest in store.manifests()] == [3, 4]


def test_version_not_reused_after_files_deleted(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=1)
    publish(store, exported)
    publish(store, exported)
    for name in model_files(store):
        (store.directory / name).unlink()
    assert store.versions() == []
    assert store.latest() is None

    restarted = SnapshotStore(tmp_path, MODEL_NAME, retention=1)
    assert publish(restarted, exported).version == 3


def test_version_not_reused_by_new_store_instance(tmp_path: Path, exported: ExportResult) -> None:
    publish(SnapshotStore(tmp_path, MODEL_NAME, retention=3), exported)
    publish(SnapshotStore(tmp_path, MODEL_NAME, retention=3), exported)
    assert SnapshotStore(tmp_path, MODEL_NAME, retention=3).versions() == [1, 2]


def test_version_above_files_without_high_water_mark(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=3)
    publish(store, exported)
    publish(store, exported)
    (store.directory / "high-water-mark.json").unlink()
    assert publish(store, exported).version == 3


def test_models_kept_apart(tmp_path: Path, exported: ExportResult) -> None:
    fraud = SnapshotStore(tmp_path, "fraud", retention=3)
    ranking = SnapshotStore(tmp_path, "ranking", retention=3)
    publish(fraud, exported)
    publish(fraud, exported)
    assert publish(ranking, exported).version == 1
    assert fraud.versions() == [1, 2]


def test_crash_before_model_rename(tmp_path: Path, exported: ExportResult, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    first = publish(store, exported)
    fail_replace_for(monkeypatch, "v000002.onnx")
    with pytest.raises(SnapshotError, match="v2"):
        publish(store, exported)
    assert model_files(store) == ["v000001.json", "v000001.onnx"]
    assert temporary_files(store) == []
    assert store.versions() == [1]
    assert store.latest() == first


def test_crash_before_manifest_rename(tmp_path: Path, exported: ExportResult, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    first = publish(store, exported)
    fail_replace_for(monkeypatch, "v000002.json")
    with pytest.raises(SnapshotError, match="No space left"):
        publish(store, exported)
    assert not (store.directory / "v000002.json").exists()
    assert store.versions() == [1]
    assert store.latest() == first


def test_publish_after_crash_skips_version_and_cleans_up(
    tmp_path: Path, exported: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    fail_replace_for(monkeypatch, "v000002.json")
    with pytest.raises(SnapshotError):
        publish(store, exported)
    monkeypatch.undo()

    assert publish(store, exported).version == 3
    assert store.versions() == [1, 3]
    assert model_files(store) == ["v000001.json", "v000001.onnx", "v000003.json", "v000003.onnx"]


def test_leftover_temporary_file_ignored_and_removed(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    leftover = store.directory / ".tmp-v000002.json.k3j9x_"
    leftover.write_bytes(b'{"model_name": "fraud", "vers')
    assert store.versions() == [1]
    assert store.latest().version == 1

    publish(store, exported)
    assert not leftover.exists()
    assert temporary_files(store) == []


def test_load_returns_verified_bytes(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    published = publish(store, exported)
    manifest, data = store.load(1)
    assert manifest == published
    assert data == exported.onnx_bytes


def test_loaded_snapshot_scores_in_onnxruntime(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    manifest, data = store.load(1)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    features = np.zeros((3, len(manifest.feature_names)), dtype=np.float32)
    (scores,) = session.run([manifest.output_name], {manifest.input_name: features})
    assert scores.shape == (3, 1)


def test_load_rejects_truncated_file(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    path = store.model_path(1)
    path.write_bytes(exported.onnx_bytes[:-10])
    with pytest.raises(SnapshotError, match=rf"v000001\.onnx has {len(exported.onnx_bytes) - 10} bytes"):
        store.load(1)


def test_load_rejects_wrong_checksum(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    corrupt = bytearray(exported.onnx_bytes)
    corrupt[len(corrupt) // 2] ^= 0xFF
    store.model_path(1).write_bytes(bytes(corrupt))
    with pytest.raises(SnapshotError, match=r"v000001\.onnx has SHA-256 [0-9a-f]{64} but its manifest says"):
        store.load(1)


def test_load_rejects_missing_model_file(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    store.model_path(1).unlink()
    with pytest.raises(SnapshotError, match=r"v000001\.onnx .* is missing"):
        store.load(1)


def test_manifest_unknown_version(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    with pytest.raises(SnapshotError, match=r"v7 not found .* committed versions: \[1\]"):
        store.manifest(7)


def test_manifest_file_for_other_version_rejected(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    (store.directory / "v000002.json").write_bytes((store.directory / "v000001.json").read_bytes())
    with pytest.raises(SnapshotError, match="expected 'fraud' v2"):
        store.manifest(2)


def test_corrupt_manifest_file_rejected(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    (store.directory / "v000001.json").write_bytes(b"{not json")
    with pytest.raises(SnapshotError, match=r"v000001\.json is invalid"):
        store.latest()


def test_corrupt_high_water_mark_rejected(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    publish(store, exported)
    (store.directory / "high-water-mark.json").write_bytes(b'{"version": "one"}')
    with pytest.raises(SnapshotError, match="high-water mark .* is invalid"):
        publish(store, exported)
    assert store.versions() == [1]


def test_publish_rejects_feature_name_count(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    with pytest.raises(SnapshotError, match="got 2 feature names for a model with 15 inputs"):
        store.publish(exported, feature_names=["a", "b"], source_model={}, offsets={}, metrics={})
    assert store.versions() == []


def test_publish_rejects_invalid_offsets_before_allocating(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    with pytest.raises(SnapshotError, match="partition"):
        store.publish(
            exported, feature_names=FEATURE_NAMES, source_model={}, offsets={"transactions": {0: 5}}, metrics={}
        )
    assert publish(store, exported).version == 1


def test_publish_rejects_mismatched_result(tmp_path: Path, exported: ExportResult) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=5)
    tampered = dataclasses.replace(exported, onnx_bytes=exported.onnx_bytes + b"\0")
    with pytest.raises(SnapshotError, match="sha256 does not match"):
        publish(store, tampered)


def test_publish_logs_model_version_and_sha(
    tmp_path: Path, exported: ExportResult, caplog: pytest.LogCaptureFixture
) -> None:
    store = SnapshotStore(tmp_path, MODEL_NAME, retention=1)
    with caplog.at_level(logging.INFO, logger="exporters.store"):
        publish(store, exported)
        publish(store, exported)
    messages = [record.getMessage() for record in caplog.records if record.name == "exporters.store"]
    prefix = exported.sha256[:12]
    assert f"snapshot published model=fraud version=2 sha256={prefix} size_bytes={len(exported.onnx_bytes)}" in messages
    assert f"snapshot pruned model=fraud version=1 sha256={prefix}" in messages


@pytest.mark.parametrize("model_name", ["", "../escape", "a/b", ".hidden"])
def test_store_rejects_invalid_model_name(tmp_path: Path, model_name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid model name"):
        SnapshotStore(tmp_path, model_name, retention=1)


@pytest.mark.parametrize("retention", [0, -1, 1.5, True])
def test_store_rejects_invalid_retention(tmp_path: Path, retention: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid snapshot retention"):
        SnapshotStore(tmp_path, MODEL_NAME, retention=retention)


def test_store_without_directory_is_empty(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "absent", MODEL_NAME, retention=1)
    assert store.versions() == []
    assert store.manifests() == []
    assert store.latest() is None


def make_manifest(**changes: object) -> Manifest:
    fields = {
        "model_name": "fraud",
        "version": 12,
        "created_at": 1_733_000_000.25,
        "onnx_file": "v000012.onnx",
        "sha256": "0f" * 32,
        "size_bytes": 7284,
        "input_name": "features",
        "output_name": "score",
        "feature_names": FEATURE_NAMES,
        "source_model": {"name": "fraud-source", "period": ["2018-04-01", "2018-04-30"]},
        "offsets": {"transactions": {"0": 1200, "3": 0}},
        "metrics": {"prequential_auc": 0.91},
        "parity_max_abs_diff": 5.96e-08,
    }
    fields.update(changes)
    return Manifest(**fields)


def test_manifest_json_round_trip() -> None:
    manifest = make_manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifest_from_json_ignores_unknown_field() -> None:
    data = json.loads(make_manifest().to_json())
    data["added_by_newer_writer"] = True
    assert Manifest.from_json(json.dumps(data).encode()) == make_manifest()


def manifest_json_with(**changes: object) -> bytes:
    data = make_manifest().to_dict()
    data.update(changes)
    return json.dumps(data).encode()


def manifest_json_without(field: str) -> bytes:
    data = make_manifest().to_dict()
    del data[field]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{", "not UTF-8 JSON"),
        (b"[]", "expected a JSON object"),
        (manifest_json_without("sha256"), r"missing fields \['sha256'\]"),
        (manifest_json_with(version=0), "field version"),
        (manifest_json_with(version="12"), "field version"),
        (manifest_json_with(version=True), "field version"),
        (manifest_json_with(sha256="ABC"), "field sha256"),
        (manifest_json_with(onnx_file="../../etc/passwd"), "field onnx_file"),
        (manifest_json_with(size_bytes=-1), "field size_bytes"),
        (manifest_json_with(feature_names=[]), "field feature_names"),
        (manifest_json_with(feature_names=["a", 2]), "feature_names item"),
        (manifest_json_with(offsets={"transactions": {"zero": 1}}), "partition"),
        (manifest_json_with(offsets={"transactions": {"0": -1}}), "offset >= 0"),
        (manifest_json_with(metrics={"auc": "high"}), r"metrics\['auc'\]"),
        (manifest_json_with(source_model=["fraud-source"]), "field source_model"),
        (manifest_json_with(parity_max_abs_diff=None), "field parity_max_abs_diff"),
        (manifest_json_with(metrics={"auc": float("nan")}), "omit undefined metrics"),
    ],
)
def test_manifest_from_json_rejects_invalid(raw: bytes, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        Manifest.from_json(raw)


def test_manifest_rejects_nan_metric() -> None:
    with pytest.raises(SnapshotError, match="omit undefined metrics"):
        make_manifest(metrics={"prequential_auc": float("nan")})
