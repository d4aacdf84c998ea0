"""Snapshot announcements: the records that the updater produces to the compacted ``model-snapshots`` topic.

The record key is the model name, so compaction keeps the newest announcement per model.
The value is UTF-8 JSON::

    {"manifest": {...}, "store_path": "/data/snapshots/fraud/v000012.onnx", "onnx_base64": "..." | null}

A model file up to ``INLINE_LIMIT_BYTES`` travels inline in base64. A larger one is
announced by reference only, and the reader must see the snapshot store at ``store_path``.
This module only encodes and decodes: the workers produce and consume the records.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.errors import SnapshotError

from .manifest import Manifest, verify_snapshot_bytes

logger = logging.getLogger(__name__)

# Base64 makes 512 KiB into about 683 KiB, which with the manifest stays under Kafka's
# default maximum record size of about 1 MiB (broker message.max.bytes 1048588,
# producer max.request.size 1048576).
INLINE_LIMIT_BYTES = 512 * 1024


@dataclass(frozen=True)
class Announcement:
    """A decoded announcement; ``onnx_bytes`` is None when the model file was sent by reference."""

    manifest: Manifest
    onnx_bytes: bytes | None = field(repr=False)
    store_path: str


def encode_announcement(
    manifest: Manifest,
    onnx_bytes: bytes,
    *,
    store_path: str,
    inline_limit_bytes: int = INLINE_LIMIT_BYTES,
) -> tuple[bytes, bytes]:
    """Return the (key, value) record that announces ``manifest``.

    ``store_path`` is the path of the model file in the snapshot store. The file is
    embedded when it has at most ``inline_limit_bytes`` bytes. Raises SnapshotError if
    ``onnx_bytes`` does not match the manifest's size and SHA-256.
    """
    if not isinstance(store_path, str) or not store_path:
        raise SnapshotError(
            f"invalid store_path {store_path!r}: "
            "expected the path of the model file in the snapshot store"
        )
    verify_snapshot_bytes(manifest, onnx_bytes, source="the bytes given to encode_announcement")
    inline = len(onnx_bytes) <= inline_limit_bytes
    value = {
        "manifest": manifest.to_dict(),
        "store_path": store_path,
        "onnx_base64": base64.b64encode(onnx_bytes).decode("ascii") if inline else None,
    }
    logger.debug(
        "snapshot announcement encoded model=%s version=%d inline=%s size_bytes=%d",
        manifest.model_name,
        manifest.version,
        inline,
        manifest.size_bytes,
    )
    key = manifest.model_name.encode("utf-8")
    return key, json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")


def decode_announcement(value: bytes | None, *, key: bytes | None = None) -> Announcement:
    """Decode and validate an announcement value.

    When ``key`` is given it must equal the manifest's model name. Raises SnapshotError on
    an empty value (a tombstone), invalid JSON, a missing or mistyped field, or invalid base64.
    The inline bytes are not checked against the manifest here: ``resolve_snapshot_bytes`` does that.
    """
    if not value:
        raise SnapshotError("invalid snapshot announcement: the value is empty (a tombstone?)")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"invalid snapshot announcement: not UTF-8 JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SnapshotError(f"invalid snapshot announcement: expected a JSON object, got {type(data).__name__}")

    manifest = Manifest.from_dict(_require_field(data, "manifest"))
    store_path = _require_field(data, "store_path")
    if not isinstance(store_path, str) or not store_path:
        raise SnapshotError(f"invalid snapshot announcement: store_path {store_path!r} is not a non-empty string")
    onnx_bytes = _decode_inline_bytes(_require_field(data, "onnx_base64"))

    if key is not None and key != manifest.model_name.encode("utf-8"):
        raise SnapshotError(
            "invalid snapshot announcement: "
            f"record key {key!r} differs from manifest model name {manifest.model_name!r}"
        )
    return Announcement(manifest=manifest, onnx_bytes=onnx_bytes, store_path=store_path)


def resolve_snapshot_bytes(announcement: Announcement) -> bytes:
    """Return the model bytes of ``announcement`` after checking size and SHA-256 against its manifest.

    Inline bytes are used when present, otherwise the file at ``store_path`` is read.
    Raises SnapshotError if the file cannot be read or the bytes do not match.
    """
    manifest = announcement.manifest
    if announcement.onnx_bytes is not None:
        verify_snapshot_bytes(manifest, announcement.onnx_bytes, source="the announcement's inline bytes")
        return announcement.onnx_bytes

    path = Path(announcement.store_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(
            f"snapshot {manifest.model_name} v{manifest.version} announced by reference could not be read "
            f"from {path}: {exc}; the inference worker needs the snapshot store mounted at that path"
        ) from exc
    verify_snapshot_bytes(manifest, data, source=str(path))
    return data


def _require_field(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise SnapshotError(f"invalid snapshot announcement: missing field {name!r}")
    return data[name]


def _decode_inline_bytes(encoded: Any) -> bytes | None:
    if encoded is None:
        return None
    if not isinstance(encoded, str):
        raise SnapshotError(
            "invalid snapshot announcement: "
            f"onnx_base64 is a {type(encoded).__name__}, expected a string or null"
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnapshotError(f"invalid snapshot announcement: onnx_base64 is not valid base64 ({exc})") from exc
