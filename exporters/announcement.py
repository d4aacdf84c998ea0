"""Snapshot announcements: the records that the updater produces to the compacted ``model-snapshots`` topic.

The record key is the model name, so compaction keeps the newest announcement per model.
The value is UTF-8 JSON::

    {"manifest": {...}, "store_path": "/data/snapshots/fraud/v000012.onnx", "onnx_base64": "..." | null}

A model file up to ``INLINE_LIMIT_BYTES`` travels inline in base64. A larger one is
announced by reference only, and the reader must see the snapshot store at ``store_path``.
This module only encodes and decodes: the workers produce and consume the records.

Control announcements (``streamer snapshots pin|unpin|rollback``) add ``"control": "pin"``
or ``"control": "unpin"`` to the same value. A pin carries the pinned version's manifest
and model like a regular announcement. An unpin carries the manifest of the version that
was pinned, without the model. Their record key is ``control_key(model_name)``, not the
model name, because compaction keeps only the newest record per key: under the model
name, the next regular announcement would erase the pin for every worker that starts
later. A reader that predates the field ignores control records, because their key is
not its model name.
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

CONTROL_PIN = "pin"
CONTROL_UNPIN = "unpin"
CONTROLS = (CONTROL_PIN, CONTROL_UNPIN)
# Model names are plain file names, which never contain "/", so no model's key equals this suffix form.
_CONTROL_KEY_SUFFIX = "/control"


@dataclass(frozen=True)
class Announcement:
    """A decoded announcement; ``onnx_bytes`` is None when the model file was sent by reference.

    ``control`` is None for a regular announcement of a new version, else ``CONTROL_PIN``
    or ``CONTROL_UNPIN``.
    """

    manifest: Manifest
    onnx_bytes: bytes | None = field(repr=False)
    store_path: str
    control: str | None = None


def control_key(model_name: str) -> bytes:
    """Return the record key of the pin and unpin announcements of ``model_name``."""
    return (model_name + _CONTROL_KEY_SUFFIX).encode("utf-8")


def encode_announcement(
    manifest: Manifest,
    onnx_bytes: bytes,
    *,
    store_path: str,
    inline_limit_bytes: int = INLINE_LIMIT_BYTES,
    control: str | None = None,
) -> tuple[bytes, bytes]:
    """Return the (key, value) record that announces ``manifest``.

    ``store_path`` is the path of the model file in the snapshot store. The file is
    embedded when it has at most ``inline_limit_bytes`` bytes. ``control`` makes it a pin
    (``CONTROL_PIN``) under ``control_key``; use `encode_unpin` for an unpin. Raises
    SnapshotError if ``onnx_bytes`` does not match the manifest's size and SHA-256.
    """
    _check_store_path(store_path)
    if control not in (None, CONTROL_PIN):
        raise SnapshotError(f"invalid control {control!r} for encode_announcement: expected None or {CONTROL_PIN!r}")
    verify_snapshot_bytes(manifest, onnx_bytes, source="the bytes given to encode_announcement")
    inline = len(onnx_bytes) <= inline_limit_bytes
    value = {
        "manifest": manifest.to_dict(),
        "store_path": store_path,
        "onnx_base64": base64.b64encode(onnx_bytes).decode("ascii") if inline else None,
    }
    logger.debug(
        "snapshot announcement encoded model=%s version=%d inline=%s size_bytes=%d control=%s",
        manifest.model_name,
        manifest.version,
        inline,
        manifest.size_bytes,
        control,
    )
    if control is None:
        key = manifest.model_name.encode("utf-8")
    else:
        value["control"] = control
        key = control_key(manifest.model_name)
    return key, json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")


def encode_unpin(manifest: Manifest, *, store_path: str) -> tuple[bytes, bytes]:
    """Return the (key, value) record that lifts the pin of ``manifest``'s version.

    The model itself is not sent: an unpinned worker goes back to the newest version it
    has seen announced.
    """
    _check_store_path(store_path)
    value = {"manifest": manifest.to_dict(), "store_path": store_path, "onnx_base64": None,
             "control": CONTROL_UNPIN}
    return control_key(manifest.model_name), json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")


def decode_announcement(value: bytes | None, *, key: bytes | None = None) -> Announcement:
    """Decode and validate an announcement value.

    When ``key`` is given it must equal the manifest's model name, or ``control_key`` of it
    for a control announcement. Raises SnapshotError on an empty value (a tombstone),
    invalid JSON, a missing or mistyped field, an unknown ``control``, or invalid base64.
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
    control = data.get("control")
    if control is not None and control not in CONTROLS:
        raise SnapshotError(f"invalid snapshot announcement: control {control!r} is not one of {list(CONTROLS)}")

    expected_key = manifest.model_name.encode("utf-8") if control is None else control_key(manifest.model_name)
    if key is not None and key != expected_key:
        raise SnapshotError(
            "invalid snapshot announcement: "
            f"record key {key!r} differs from {expected_key!r}, expected for model {manifest.model_name!r} "
            f"and control {control!r}"
        )
    return Announcement(manifest=manifest, onnx_bytes=onnx_bytes, store_path=store_path, control=control)


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


def _check_store_path(store_path: Any) -> None:
    if not isinstance(store_path, str) or not store_path:
        raise SnapshotError(
            f"invalid store_path {store_path!r}: "
            "expected the path of the model file in the snapshot store"
        )


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
