"""Unit tests of model checkpoint files and of the updater's CheckpointStore."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer import checkpoint as checkpoint_module
from streamer.checkpoint import KEEP, CheckpointData, CheckpointStore
from streamer.errors import CheckpointError, StreamerError
from streamer.labeljoin import LabelJoin
from streamer.model import (
    FraudMLP,
    ModelCheckpoint,
    file_sha256,
    load_model_checkpoint,
    save_model_checkpoint,
)
from streamer.trainer import MicroBatchTrainer
from streamer.transfer import build_target

N_FEATURES = 15
HIDDEN = (8, 4)
FEATURE_NAMES = [f"feature_{i}" for i in range(N_FEATURES)]
START_MS = 1_522_540_800_000  # 2018-04-01T00:00:00Z

# Notes of the CustomObject instances that an unpickler rebuilt. A weights_only load must leave it empty.
REBUILT_INSTANCES: list[str] = []


class CustomObject:
    """A plain class that weights_only loading does not allow."""

    def __init__(self) -> None:
        self.note = "custom"

    def __setstate__(self, state: dict) -> None:
        REBUILT_INSTANCES.append(state.get("note", ""))
        self.__dict__.update(state)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def clear_rebuilt_instances():
    REBUILT_INSTANCES.clear()
    yield
    REBUILT_INSTANCES.clear()


def make_model(seed: int = 0) -> FraudMLP:
    torch.manual_seed(seed)
    model = FraudMLP(N_FEATURES, HIDDEN)
    model.set_normalisation(torch.linspace(-1.0, 1.0, N_FEATURES), torch.linspace(0.5, 2.0, N_FEATURES))
    return model


def probe_batch() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(4).normal(size=(16, N_FEATURES)).astype(np.float32))


def save_model(tmp_path: Path, model: FraudMLP | None = None) -> Path:
    path = tmp_path / "models" / "source.pt"
    metadata = {"name": "source", "period": ["2018-04-01", "2018-05-31"], "auc": 0.87}
    save_model_checkpoint(path, ModelCheckpoint(model or make_model(), FEATURE_NAMES, metadata))
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_sha256(meta_path: Path, weights_path: Path) -> None:
    """Make the metadata vouch for the current weights file, as a tampered checkpoint would."""
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = file_sha256(weights_path)
    meta_path.write_text(json.dumps(meta))


# --- model checkpoints -----------------------------------------------------------------------


def test_model_checkpoint_round_trip_gives_same_outputs(tmp_path):
    model = make_model()
    path = save_model(tmp_path, model)

    loaded = load_model_checkpoint(path)

    with torch.no_grad():
        assert torch.equal(loaded.model(probe_batch()), model(probe_batch()))
    assert loaded.model.architecture() == model.architecture()


def test_model_checkpoint_round_trip_keeps_metadata(tmp_path):
    path = save_model(tmp_path)

    loaded = load_model_checkpoint(path)

    assert loaded.feature_names == FEATURE_NAMES
    assert loaded.metadata == {"name": "source", "period": ["2018-04-01", "2018-05-31"], "auc": 0.87}


def test_model_checkpoint_sha256_matches_file(tmp_path):
    path = tmp_path / "m.pt"

    sha = save_model_checkpoint(path, ModelCheckpoint(make_model(), FEATURE_NAMES))

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == sha
    assert load_model_checkpoint(path).sha256 == sha


def test_model_checkpoint_leaves_no_temporary_files(tmp_path):
    path = save_model(tmp_path)

    assert sorted(p.name for p in path.parent.iterdir()) == ["source.json", "source.pt"]


def test_model_checkpoint_corrupt_byte_raises(tmp_path):
    path = save_model(tmp_path)
    flip_byte(path, path.stat().st_size // 2)

    with pytest.raises(CheckpointError, match="SHA-256") as info:
        load_model_checkpoint(path)

    assert isinstance(info.value, StreamerError)


def test_model_checkpoint_missing_metadata_raises(tmp_path):
    path = save_model(tmp_path)
    path.with_suffix(".json").unlink()

    with pytest.raises(CheckpointError, match=r"metadata of model checkpoint .*source\.pt not found"):
        load_model_checkpoint(path)


def test_model_checkpoint_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"model checkpoint .*nope\.pt not found"):
        load_model_checkpoint(tmp_path / "nope.pt")


def test_model_checkpoint_invalid_metadata_raises(tmp_path):
    path = save_model(tmp_path)
    path.with_suffix(".json").write_text("{not json")

    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_checkpoint(path)


def test_model_checkpoint_unknown_format_raises(tmp_path):
    path = save_model(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format"] = "other/9"
    path.with_suffix(".json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError, match="unknown format"):
        load_model_checkpoint(path)


def test_model_checkpoint_missing_weights_raises(tmp_path):
    path = save_model(tmp_path)
    path.unlink()

    with pytest.raises(CheckpointError, match="not found"):
        load_model_checkpoint(path)


def test_model_checkpoint_with_pickled_object_raises(tmp_path):
    model = make_model()
    path = save_model(tmp_path, model)
    payload = {"architecture": model.architecture(), "state_dict": model.state_dict(), "extra": CustomObject()}
    torch.save(payload, path)
    rewrite_sha256(path.with_suffix(".json"), path)

    with pytest.raises(CheckpointError, match="weights_only"):
        load_model_checkpoint(path)

    assert REBUILT_INSTANCES == []


def test_custom_object_is_rebuilt_by_full_unpickling(tmp_path):
    """Check the probe itself: without weights_only the custom object is rebuilt and recorded."""
    path = tmp_path / "probe.pt"
    torch.save({"extra": CustomObject()}, path)

    torch.load(path, weights_only=False)

    assert REBUILT_INSTANCES == ["custom"]

def test_model_checkpoint_not_a_torch_file_raises(tmp_path):
    path = save_model(tmp_path)
    path.write_bytes(b"not a torch file")
    rewrite_sha256(path.with_suffix(".json"), path)

    with pytest.raises(CheckpointError):
        load_model_checkpoint(path)


# --- CheckpointStore -------------------------------------------------------------------------


def make_checkpoint_data(sequence: int = 1) -> CheckpointData:
    """Build checkpoint contents from a real trainer and label join, tagged with ``sequence``."""
    trainer = MicroBatchTrainer(build_target(make_model()), learning_rate=1e-2)
    rng = np.random.default_rng(sequence)
    for _ in range(2):
        x = rng.normal(size=(16, N_FEATURES)).astype(np.float32)
        trainer.step(x, (x[:, 0] > 0).astype(np.int8))

    join = LabelJoin(N_FEATURES)
    ids = np.arange(5, dtype=np.int64)
    join.add_transactions(
        {
            "transaction_id": ids,
            "event_time_ms": START_MS + ids,
            "customer_id": ids + 100,
            "terminal_id": ids + 200,
            "live_score": np.linspace(0, 1, 5, dtype=np.float32),
            "source_score": np.linspace(1, 0, 5, dtype=np.float32),
            "model_version": np.full(5, 3, dtype=np.int32),
        },
        rng.normal(size=(5, N_FEATURES)).astype(np.float32),
    )
    join.add_labels(np.array([1, 99]), np.array([1, 0], dtype=np.int8), np.array([START_MS + 10] * 2))

    features = {
        "customer_keys": np.arange(4, dtype=np.int64),
        "customer_sums": rng.normal(size=(4, 3)),
        "terminal_counts": np.array([1, 0, 2], dtype=np.int32),
    }
    offsets = {"transactions": {0: 100 * sequence, 3: 7}, "labels": {1: 40 + sequence}}
    meta = {"sequence_tag": sequence, "watermark_ms": START_MS + sequence, "counters": {"examples": 32}}
    return CheckpointData(trainer=trainer.state_dict(), features=features, join=join.state_dict(),
                          offsets=offsets, meta=meta)


def assert_arrays_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        np.testing.assert_array_equal(actual[name], array, err_msg=name)


def test_store_round_trip_keeps_trainer_state(tmp_path):
    data = make_checkpoint_data()
    store = CheckpointStore(tmp_path)
    store.save(data)

    loaded = store.load_latest()

    assert set(loaded.trainer) == {"model", "optimizer", "updates", "skipped"}
    assert loaded.trainer["updates"] == data.trainer["updates"]
    for name, tensor in data.trainer["model"].items():
        assert torch.equal(loaded.trainer["model"][name], tensor), name
    assert loaded.trainer["optimizer"]["param_groups"] == data.trainer["optimizer"]["param_groups"]
    for index, state in data.trainer["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded.trainer["optimizer"]["state"][index][key], value), (index, key)


def test_store_save_after_crash_before_latest(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data())
    # A crash after renaming the second checkpoint's folder, before LATEST named it.
    shutil.copytree(tmp_path / "ckpt-000001", tmp_path / "ckpt-000002")

    saved = store.save(make_checkpoint_data())

    assert saved.name == "ckpt-000003"
    assert (tmp_path / "LATEST").read_text() == "ckpt-000003"


def test_store_round_trip_restores_trainer(tmp_path):
    data = make_checkpoint_data()
    store = CheckpointStore(tmp_path)
    store.save(data)
    original = MicroBatchTrainer(build_target(make_model()))
    original.load_state_dict(data.trainer)

    restored = MicroBatchTrainer(build_target(make_model(seed=9)))
    restored.load_state_dict(store.load_latest().trainer)

    x = probe_batch().numpy()
    np.testing.assert_array_equal(restored.score(x), original.score(x))


def test_store_round_trip_keeps_arrays_offsets_and_meta(tmp_path):
    data = make_checkpoint_data()
    store = CheckpointStore(tmp_path)
    store.save(data)

    loaded = store.load_latest()

    assert_arrays_equal(loaded.features, data.features)
    assert_arrays_equal(loaded.join, data.join)
    assert loaded.offsets == {"transactions": {0: 100, 3: 7}, "labels": {1: 41}}
    assert loaded.meta == data.meta


def test_store_restores_label_join(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data())

    join = LabelJoin(N_FEATURES)
    join.load_state_dict(store.load_latest().join)

    assert join.pending == 4
    assert join.pending_early_labels == 1


def test_store_without_checkpoint_loads_none(tmp_path):
    store = CheckpointStore(tmp_path / "missing")

    assert store.load_latest() is None
    assert store.latest_sequence() is None


def test_store_latest_points_to_newest(tmp_path):
    store = CheckpointStore(tmp_path)

    folders = [store.save(make_checkpoint_data(sequence)) for sequence in (1, 2, 3)]

    assert (tmp_path / "LATEST").read_text() == "ckpt-000003"
    assert folders[-1] == tmp_path / "ckpt-000003"
    assert store.latest_sequence() == 3
    assert store.load_latest().meta["sequence_tag"] == 3


def test_store_keeps_only_newest_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path)

    for sequence in range(1, KEEP + 3):
        store.save(make_checkpoint_data(sequence))

    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert folders == [f"ckpt-{s:06d}" for s in range(3, KEEP + 3)]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ckpt-")) == ["LATEST"]


@pytest.mark.parametrize("name", ["trainer.pt", "features.npz", "join.npz"])
def test_store_corrupt_file_in_newest_raises(tmp_path, name):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data(1))
    newest = store.save(make_checkpoint_data(2))
    flip_byte(newest / name, (newest / name).stat().st_size // 2)

    with pytest.raises(CheckpointError, match=name):
        store.load_latest()


def test_store_missing_file_in_newest_raises(tmp_path):
    store = CheckpointStore(tmp_path)
    newest = store.save(make_checkpoint_data())
    (newest / "join.npz").unlink()

    with pytest.raises(CheckpointError, match="join.npz"):
        store.load_latest()


def test_store_truncated_meta_raises(tmp_path):
    store = CheckpointStore(tmp_path)
    newest = store.save(make_checkpoint_data())
    meta_path = newest / "meta.json"
    meta_path.write_bytes(meta_path.read_bytes()[:20])

    with pytest.raises(CheckpointError, match="meta.json"):
        store.load_latest()


def test_store_corrupt_latest_raises(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data())
    (tmp_path / "LATEST").write_text("ckpt-zz")

    with pytest.raises(CheckpointError, match="LATEST"):
        store.load_latest()


def test_store_pickled_object_in_trainer_raises(tmp_path):
    store = CheckpointStore(tmp_path)
    newest = store.save(make_checkpoint_data())
    torch.save({"model": {}, "extra": CustomObject()}, newest / "trainer.pt")
    meta = json.loads((newest / "meta.json").read_text())
    meta["sha256"]["trainer.pt"] = file_sha256(newest / "trainer.pt")
    (newest / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError, match="weights_only"):
        store.load_latest()

    assert REBUILT_INSTANCES == []


def test_store_ignores_leftover_temporary_folder(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data(1))
    leftover = tmp_path / ".tmp-ckpt-000002-424242"
    leftover.mkdir()
    (leftover / "trainer.pt").write_bytes(b"half written")

    loaded = store.load_latest()

    assert loaded.meta["sequence_tag"] == 1
    assert store.latest_sequence() == 1


def test_store_cleans_leftover_temporary_folder(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data(1))
    leftover = tmp_path / ".tmp-ckpt-000002-424242"
    leftover.mkdir()
    (leftover / "trainer.pt").write_bytes(b"half written")

    newest = store.save(make_checkpoint_data(2))

    assert not leftover.exists()
    assert newest.name == "ckpt-000002"
    assert store.load_latest().meta["sequence_tag"] == 2


def test_store_leftover_folder_without_checkpoint_loads_none(tmp_path):
    (tmp_path / ".tmp-ckpt-000001-424242").mkdir()

    assert CheckpointStore(tmp_path).load_latest() is None


def test_store_save_interrupted_before_rename_keeps_previous(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint_data(1))

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(make_checkpoint_data(2))
    monkeypatch.undo()

    assert store.load_latest().meta["sequence_tag"] == 1
    assert not (tmp_path / "ckpt-000002").exists()
