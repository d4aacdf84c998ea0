"""Updater checkpoints: model, optimiser, feature state, label join and input offsets, together.

Everything the updater learnt from the stream is saved in one checkpoint with the offsets
of the first records it has not yet seen, as a Flink-style consistent snapshot. Resuming
from the checkpoint and seeking to its offsets reproduces the uninterrupted state.
Offsets are committed to Kafka only after the checkpoint that includes them is durable.

On disk: ``<dir>/ckpt-000042/`` holds ``trainer.pt`` (tensors and plain values, loaded with
``weights_only=True``), ``features.npz`` and ``join.npz`` (loaded with
``allow_pickle=False``) and ``meta.json`` (offsets, counters, SHA-256 of the other files).
``<dir>/LATEST`` names the newest complete checkpoint. The inference worker stores its
state in the same layout without ``trainer.pt`` and under its own format name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .faults import crash_point

logger = logging.getLogger(__name__)

FORMAT = "streamer-updater-checkpoint/1"
KEEP = 2  # complete checkpoints kept; the older one is a fallback if the newest is damaged


@dataclass
class CheckpointData:
    """The state one checkpoint carries."""

    trainer: dict | None  # MicroBatchTrainer.state_dict(); None writes no trainer.pt
    features: dict[str, np.ndarray]
    join: dict[str, np.ndarray]
    offsets: dict[str, dict[int, int]]  # topic -> partition -> next offset to read
    meta: dict = field(default_factory=dict)  # counters, watermark, model name, last version


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _torch_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class CheckpointStore:
    """Writes and reads the checkpoints of one model (or one inference worker) in one folder.

    ``checkpoint_format`` is written into each meta.json, and a checkpoint of another format
    is rejected on load, so that one worker never resumes from another kind's state.
    """

    def __init__(self, directory: Path, checkpoint_format: str = FORMAT) -> None:
        self.directory = Path(directory)
        self.checkpoint_format = checkpoint_format

    def latest_sequence(self) -> int | None:
        try:
            return int((self.directory / "LATEST").read_text().strip().removeprefix("ckpt-"))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CheckpointError(f"{self.directory / 'LATEST'} is corrupt: {exc}") from exc

    def save(self, data: CheckpointData) -> Path:
        """Write a checkpoint atomically and return its folder.

        Steps: 1. write every file into a temporary folder and fsync it; 2. rename the folder
        to its final name; 3. replace LATEST; 4. delete checkpoints beyond ``KEEP``.
        """
        started = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Above every folder, not only LATEST's: a crash between the rename (step 2) and
        # LATEST (step 3) leaves a complete folder that LATEST does not name yet.
        sequence = max(self.latest_sequence() or 0, self._newest_folder()) + 1
        final = self.directory / f"ckpt-{sequence:06d}"
        tmp = self.directory / f".tmp-ckpt-{sequence:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

        # 1. Files, each fsynced, with their digests in meta.json.
        files = {
            "features.npz": _npz_bytes(data.features),
            "join.npz": _npz_bytes(data.join),
        }
        if data.trainer is not None:
            files["trainer.pt"] = _torch_bytes(data.trainer)
        for name, blob in files.items():
            _write_file(tmp / name, blob)
        meta = {
            "format": self.checkpoint_format,
            "sequence": sequence,
            "created_at": time.time(),
            "offsets": {t: {str(p): o for p, o in parts.items()} for t, parts in data.offsets.items()},
            "sha256": {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()},
            "meta": data.meta,
        }
        _write_file(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        crash_point("checkpoint.written")
        _fsync_dir(tmp)

        # 2. Publish the folder under its final name.
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        crash_point("checkpoint.renamed")

        # 3. Point LATEST at it.
        _write_file(self.directory / ".tmp-LATEST", final.name.encode())
        os.replace(self.directory / ".tmp-LATEST", self.directory / "LATEST")
        _fsync_dir(self.directory)

        # 4. Prune.
        self._prune(sequence)
        logger.info(
            "checkpoint written sequence=%d seconds=%.3f offsets=%s", sequence, time.perf_counter() - started,
            meta["offsets"],
        )
        return final

    def _newest_folder(self) -> int:
        """Return the highest sequence among the ``ckpt-NNNNNN`` folders, 0 if there is none."""
        if not self.directory.is_dir():
            return 0
        sequences = [
            int(entry.name[5:]) for entry in self.directory.iterdir()
            if entry.name.startswith("ckpt-") and entry.name[5:].isdigit()
        ]
        return max(sequences, default=0)

    def _prune(self, newest: int) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(".tmp-ckpt-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("ckpt-") and int(entry.name[5:]) <= newest - KEEP:
                shutil.rmtree(entry, ignore_errors=True)

    def load_latest(self) -> CheckpointData | None:
        """Load the newest complete checkpoint, or None if there is none; verify every digest."""
        sequence = self.latest_sequence()
        if sequence is None:
            return None
        folder = self.directory / f"ckpt-{sequence:06d}"
        try:
            meta = json.loads((folder / "meta.json").read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {folder} has no readable meta.json: {exc}") from exc
        if meta.get("format") != self.checkpoint_format:
            raise CheckpointError(
                f"checkpoint {folder} has format {meta.get('format')!r}, expected {self.checkpoint_format!r}"
            )
        blobs = {}
        for name, expected in meta["sha256"].items():
            try:
                blob = (folder / name).read_bytes()
            except OSError as exc:
                raise CheckpointError(
                    f"checkpoint file {folder / name} could not be read: {exc}; to resume from an older "
                    f"checkpoint, write its folder name into {self.directory / 'LATEST'}"
                ) from exc
            if hashlib.sha256(blob).hexdigest() != expected:
                raise CheckpointError(f"checkpoint file {folder / name} does not match its SHA-256; it is corrupt")
            blobs[name] = blob

        trainer = _load_trainer(folder, blobs["trainer.pt"]) if "trainer.pt" in blobs else None
        with np.load(io.BytesIO(blobs["features.npz"]), allow_pickle=False) as npz:
            features = {k: npz[k] for k in npz.files}
        with np.load(io.BytesIO(blobs["join.npz"]), allow_pickle=False) as npz:
            join = {k: npz[k] for k in npz.files}
        offsets = {t: {int(p): int(o) for p, o in parts.items()} for t, parts in meta["offsets"].items()}
        logger.info("checkpoint loaded sequence=%d offsets=%s", sequence, meta["offsets"])
        return CheckpointData(trainer=trainer, features=features, join=join, offsets=offsets, meta=meta["meta"])


def _load_trainer(folder: Path, blob: bytes) -> dict:
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint file {folder / 'trainer.pt'} failed to load with weights_only=True "
            f"({type(exc).__name__}): it contains objects other than tensors and plain values"
        ) from exc
