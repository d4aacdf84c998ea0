"""ONNX export and validation, the versioned snapshot store, and snapshot announcements.

A trained model travels through three steps:

1. ``export_onnx`` turns a PyTorch scoring module into one self-contained ONNX file and
   checks that onnxruntime scores a probe batch like PyTorch does.
2. ``SnapshotStore.publish`` writes it atomically under the next version with a ``Manifest``.
3. ``encode_announcement`` builds the record for the compacted ``model-snapshots`` topic,
   and an inference worker reads it back with ``decode_announcement`` and
   ``resolve_snapshot_bytes``, which verify the SHA-256 before the bytes are used.

A failed export, publish, load or decode raises ``streamer.errors.SnapshotError``, and an
invalid store configuration raises ``ConfigurationError``. The export names are imported on
first use, so that a process which only reads snapshots does not import torch.
"""

from typing import Any

from .announcement import (
    CONTROL_PIN,
    CONTROL_UNPIN,
    INLINE_LIMIT_BYTES,
    Announcement,
    control_key,
    decode_announcement,
    encode_announcement,
    encode_unpin,
    resolve_snapshot_bytes,
)
from .manifest import Manifest, verify_snapshot_bytes
from .store import Pin, SnapshotStore

_EXPORT_NAMES = frozenset({"PARITY_ATOL", "PARITY_RTOL", "ExportResult", "export_onnx"})

__all__ = [
    "CONTROL_PIN",
    "CONTROL_UNPIN",
    "INLINE_LIMIT_BYTES",
    "PARITY_ATOL",
    "PARITY_RTOL",
    "Announcement",
    "ExportResult",
    "Manifest",
    "Pin",
    "SnapshotStore",
    "control_key",
    "decode_announcement",
    "encode_announcement",
    "encode_unpin",
    "export_onnx",
    "resolve_snapshot_bytes",
    "verify_snapshot_bytes",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORT_NAMES:
        from . import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
