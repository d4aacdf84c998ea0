"""Snapshot announcements encoded, decoded and resolved against a real store and real exported models."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.announcement import (
    CONTROL_PIN,
    CONTROL_UNPIN,
    INLINE_LIMIT_BYTES,
    control_key,
    decode_announcement,
    encode_announcement,
    encode_unpin,
    resolve_snapshot_bytes,
)
from exporters.manifest import Manifest
from exporters.onnx_export import export_onnx
from exporters.store import SnapshotStore
from streamer.errors import SnapshotError

N_FEATURES = 15
FEATURE_NAMES = [f"feature_{index}" for index in range(N_FEATURES)]
# Kafka's default maximum record size (producer max.request.size).
KAFKA_DEFAULT_MAX_RECORD_BYTES = 1_048_576


def make_mlp(hidden: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    width = N_FEATURES
    for size in hidden:
        layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
        width = size
    layers += [torch.nn.Linear(width, 1), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SnapshotStore:
    """A store with v1, a small model (about 7 KiB), and v2, a model above the inline limit."""
    snapshot_store = SnapshotStore(tmp_path_factory.mktemp("snapshots"), "fraud", retention=5)
    probe = np.random.default_rng(0).normal(size=(16, N_FEATURES)).astype(np.float32)
    # 15*2048 + 2048*64 weights of 4 bytes are about 630 KiB.
    for hidden in [(32,), (2048, 64)]:
        snapshot_store.publish(
            export_onnx(make_mlp(hidden), probe),
            feature_names=FEATURE_NAMES,
            source_model={"name": "fraud-source"},
            offsets={"transactions": {"0": 10}},
            metrics={"prequential_auc": 0.9},
        )
    return snapshot_store


def announce(store: SnapshotStore, version: int) -> tuple[Manifest, bytes, bytes, bytes]:
    manifest, data = store.load(version)
    key, value = encode_announcement(manifest, data, store_path=str(store.model_path(version)))
    return manifest, data, key, value


def test_small_snapshot_round_trip_inline(store: SnapshotStore) -> None:
    manifest, data, key, value = announce(store, 1)
    announcement = decode_announcement(value, key=key)
    assert key == b"fraud"
    assert announcement.manifest == manifest
    assert announcement.onnx_bytes == data
    assert announcement.store_path == str(store.model_path(1))
    assert resolve_snapshot_bytes(announcement) == data


def test_large_snapshot_goes_by_reference(store: SnapshotStore) -> None:
    manifest, data, key, value = announce(store, 2)
    announcement = decode_announcement(value, key=key)
    assert manifest.size_bytes > INLINE_LIMIT_BYTES
    assert json.loads(value)["onnx_base64"] is None
    assert announcement.onnx_bytes is None
    assert len(value) < 10_000
    assert resolve_snapshot_bytes(announcement) == data


def test_small_snapshot_by_reference_when_limit_lower(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    _, value = encode_announcement(manifest, data, store_path=str(store.model_path(1)), inline_limit_bytes=1024)
    announcement = decode_announcement(value)
    assert announcement.onnx_bytes is None
    assert resolve_snapshot_bytes(announcement) == data


def test_inline_limit_fits_kafka_default_record_size() -> None:
    data = np.random.default_rng(1).bytes(INLINE_LIMIT_BYTES)
    manifest = Manifest(
        model_name="fraud",
        version=1,
        created_at=1_733_000_000.0,
        onnx_file="v000001.onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        input_name="features",
        output_name="score",
        feature_names=[f"a_long_feature_name_of_a_real_model_{index}" for index in range(200)],
        source_model={"name": "fraud-source"},
        offsets={"transactions": {str(partition): 10**12 for partition in range(64)}},
        metrics={"prequential_auc": 0.9},
        parity_max_abs_diff=0.0,
    )
    key, value = encode_announcement(manifest, data, store_path="/data/snapshots/fraud/v000001.onnx")
    assert json.loads(value)["onnx_base64"] is not None
    assert len(key) + len(value) < KAFKA_DEFAULT_MAX_RECORD_BYTES


def test_tampered_inline_bytes_rejected(store: SnapshotStore) -> None:
    _, data, key, value = announce(store, 1)
    message = json.loads(value)
    tampered = bytearray(data)
    tampered[100] ^= 0x01
    message["onnx_base64"] = base64.b64encode(bytes(tampered)).decode("ascii")
    announcement = decode_announcement(json.dumps(message).encode(), key=key)
    with pytest.raises(SnapshotError, match="inline bytes has SHA-256"):
        resolve_snapshot_bytes(announcement)


def test_truncated_inline_bytes_rejected(store: SnapshotStore) -> None:
    _, data, _, value = announce(store, 1)
    message = json.loads(value)
    message["onnx_base64"] = base64.b64encode(data[:-1]).decode("ascii")
    announcement = decode_announcement(json.dumps(message).encode())
    with pytest.raises(SnapshotError, match=f"has {len(data) - 1} bytes"):
        resolve_snapshot_bytes(announcement)


def test_tampered_referenced_file_rejected(store: SnapshotStore, tmp_path: Path) -> None:
    _, data, _, value = announce(store, 2)
    copy_path = tmp_path / "v000002.onnx"
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    copy_path.write_bytes(bytes(tampered))
    message = json.loads(value)
    message["store_path"] = str(copy_path)
    announcement = decode_announcement(json.dumps(message).encode())
    with pytest.raises(SnapshotError, match=f"{re.escape(str(copy_path))} has SHA-256"):
        resolve_snapshot_bytes(announcement)


def test_missing_referenced_file_rejected(store: SnapshotStore, tmp_path: Path) -> None:
    _, _, _, value = announce(store, 2)
    message = json.loads(value)
    message["store_path"] = str(tmp_path / "absent.onnx")
    announcement = decode_announcement(json.dumps(message).encode())
    with pytest.raises(SnapshotError, match="could not be read from .*absent.onnx"):
        resolve_snapshot_bytes(announcement)


def test_encode_rejects_bytes_not_matching_manifest(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    with pytest.raises(SnapshotError, match="SHA-256"):
        encode_announcement(manifest, data[::-1], store_path=str(store.model_path(1)))


def test_encode_rejects_empty_store_path(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    with pytest.raises(SnapshotError, match="invalid store_path"):
        encode_announcement(manifest, data, store_path="")


def test_decode_rejects_key_of_other_model(store: SnapshotStore) -> None:
    _, _, _, value = announce(store, 1)
    with pytest.raises(SnapshotError, match="record key b'ranking' differs"):
        decode_announcement(value, key=b"ranking")


def announcement_with(store: SnapshotStore, **changes: object) -> bytes:
    _, _, _, value = announce(store, 1)
    message = json.loads(value)
    message.update(changes)
    return json.dumps(message).encode()


def announcement_without(store: SnapshotStore, field: str) -> bytes:
    _, _, _, value = announce(store, 1)
    message = json.loads(value)
    del message[field]
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda store: b"", "tombstone"),
        (lambda store: None, "tombstone"),
        (lambda store: b"\x80\x81", "not UTF-8 JSON"),
        (lambda store: b"[1, 2]", "expected a JSON object"),
        (lambda store: announcement_without(store, "manifest"), "missing field 'manifest'"),
        (lambda store: announcement_without(store, "onnx_base64"), "missing field 'onnx_base64'"),
        (lambda store: announcement_with(store, manifest={"model_name": "fraud"}), "invalid manifest: missing fields"),
        (lambda store: announcement_with(store, store_path=17), "store_path 17"),
        (lambda store: announcement_with(store, onnx_base64="not base64!"), "not valid base64"),
        (lambda store: announcement_with(store, onnx_base64=[1, 2]), "onnx_base64 is a list"),
    ],
    ids=[
        "empty",
        "none",
        "not-utf8",
        "json-array",
        "no-manifest",
        "no-onnx-field",
        "bad-manifest",
        "store-path-number",
        "bad-base64",
        "base64-list",
    ],
)
def test_decode_rejects_invalid_value(store: SnapshotStore, build, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        decode_announcement(build(store))


def test_announcement_value_is_plain_json(store: SnapshotStore) -> None:
    manifest, _, _, value = announce(store, 1)
    message = json.loads(value.decode("utf-8"))
    assert sorted(message) == ["manifest", "onnx_base64", "store_path"]
    assert message["manifest"] == json.loads(manifest.to_json())


# -- control announcements ------------------------------------------------------------------


def test_regular_announcement_has_no_control(store: SnapshotStore) -> None:
    _, _, key, value = announce(store, 1)
    assert "control" not in json.loads(value)
    assert decode_announcement(value, key=key).control is None


def test_pin_round_trip_under_control_key(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    key, value = encode_announcement(manifest, data, store_path=str(store.model_path(1)), control=CONTROL_PIN)
    announcement = decode_announcement(value, key=key)
    assert key == b"fraud/control"
    assert announcement.control == CONTROL_PIN
    assert resolve_snapshot_bytes(announcement) == data


def test_unpin_round_trip_without_model(store: SnapshotStore) -> None:
    manifest = store.manifest(1)
    key, value = encode_unpin(manifest, store_path=str(store.model_path(1)))
    announcement = decode_announcement(value, key=key)
    assert key == control_key("fraud")
    assert announcement.control == CONTROL_UNPIN
    assert announcement.onnx_bytes is None


def test_control_key_differs_from_any_model_name() -> None:
    # "/" is not allowed in a model name, so no model's regular key equals a control key.
    assert b"/" in control_key("fraud")


def test_pin_under_model_key_rejected(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    _, value = encode_announcement(manifest, data, store_path=str(store.model_path(1)), control=CONTROL_PIN)
    with pytest.raises(SnapshotError, match="record key b'fraud' differs"):
        decode_announcement(value, key=b"fraud")


def test_unknown_control_rejected(store: SnapshotStore) -> None:
    _, _, _, value = announce(store, 1)
    message = dict(json.loads(value), control="freeze")
    with pytest.raises(SnapshotError, match="control 'freeze' is not one of"):
        decode_announcement(json.dumps(message).encode())


def test_encode_unpin_control_rejected(store: SnapshotStore) -> None:
    manifest, data = store.load(1)
    with pytest.raises(SnapshotError, match="invalid control 'unpin'"):
        encode_announcement(manifest, data, store_path=str(store.model_path(1)), control=CONTROL_UNPIN)
