"""The training ledger: which transactions the live model was trained on, in order.

An optional audit trail (``STREAMER_TRAINING_LEDGER``). Each applied micro-batch appends
the transaction ids of its examples to ``<data_dir>/ledger/<model>.ids`` as little-endian
int64. Skipped (non-finite) micro-batches are not written: they did not change the model.

The ledger moves with the checkpoints. A checkpoint records the ledger's length, and a
restart truncates the file to that length, because the micro-batches written after the
checkpoint are trained again from the replayed records. So after any crash the ledger
lists exactly the examples in the restored model's history: each id once if the input
had it once. Size: 8 bytes per example, about 35 GB a day at 50 k examples/s, which is
why it is off by default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import CheckpointError

logger = logging.getLogger(__name__)

ID_BYTES = 8


class TrainingLedger:
    """Append-only file of trained transaction ids, truncated back to a checkpoint on restore."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncation: a restart first restores a checkpoint, then truncates.
        self._file = open(self.path, "ab")
        self.length = self._file.tell() // ID_BYTES

    def append(self, transaction_ids: np.ndarray) -> None:
        self._file.write(np.asarray(transaction_ids, dtype="<i8").tobytes())
        self.length += len(transaction_ids)

    def sync(self) -> int:
        """Make every appended id durable; return the length a checkpoint should record."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.length

    def truncate(self, length: int) -> None:
        """Drop the ids after ``length``: those written after the checkpoint being restored."""
        self._file.flush()
        size = os.path.getsize(self.path)
        if size < length * ID_BYTES:
            raise CheckpointError(
                f"training ledger {self.path} has {size // ID_BYTES} ids but the checkpoint counts {length}; "
                "the ledger was truncated or replaced by hand. Move it away to start a new one."
            )
        if size != length * ID_BYTES:
            logger.info("training ledger truncated to the checkpoint path=%s ids=%d dropped=%d",
                        self.path, length, (size - length * ID_BYTES) // ID_BYTES)
        self._file.truncate(length * ID_BYTES)
        self._file.seek(0, os.SEEK_END)
        self.length = length

    def close(self) -> None:
        self._file.close()


def read_ledger(path: Path) -> np.ndarray:
    """Return every id of a ledger file, without a torn last id left by a crash during a write."""
    raw = Path(path).read_bytes()
    return np.frombuffer(raw[: len(raw) - len(raw) % ID_BYTES], dtype="<i8").astype(np.int64)
