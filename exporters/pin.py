"""The pin record of a snapshot store: the version that inference workers must serve.

``root/<model>/pin.json`` contains::

    {"model_name": "fraud", "version": 2, "pinned_at": 1796000000.0, "manifest": {...}}

The file exists only while a version is pinned. The store writes it like its other files
(temporary file, fsync, rename, directory fsync) and never prunes the pinned version. The
inference workers do not read it: they follow the pin announcements on ``model-snapshots``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import SnapshotError

from .manifest import Manifest

PIN_FILE = "pin.json"


@dataclass(frozen=True)
class Pin:
    """A pinned version: its manifest and the Unix time in seconds when it was pinned."""

    manifest: Manifest
    pinned_at: float

    @property
    def version(self) -> int:
        return self.manifest.version

    def to_json(self) -> bytes:
        data = {"model_name": self.manifest.model_name, "version": self.version, "pinned_at": self.pinned_at,
                "manifest": self.manifest.to_dict()}
        return json.dumps(data, sort_keys=True, indent=2, allow_nan=False).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, *, source: Path) -> Pin:
        """Decode a pin record; raise SnapshotError naming ``source`` if it is invalid."""
        fix = f"run `streamer snapshots unpin` or delete {source}, then pin again"
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SnapshotError(f"pin record {source} is not UTF-8 JSON ({exc}); {fix}") from exc
        if not isinstance(data, dict) or "manifest" not in data:
            raise SnapshotError(f"pin record {source} has no manifest; {fix}")
        try:
            manifest = Manifest.from_dict(data["manifest"])
        except SnapshotError as exc:
            raise SnapshotError(f"pin record {source} is invalid: {exc}; {fix}") from exc
        pinned_at = data.get("pinned_at")
        if isinstance(pinned_at, bool) or not isinstance(pinned_at, (int, float)) or not math.isfinite(pinned_at):
            raise SnapshotError(f"pin record {source} has an invalid pinned_at {pinned_at!r}; {fix}")
        return cls(manifest=manifest, pinned_at=float(pinned_at))


def read_pin(directory: Path) -> Pin | None:
    """Return the pin record in ``directory``, or None if no version is pinned."""
    path = directory / PIN_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"pin record {path} could not be read: {exc}") from exc
    return Pin.from_json(raw, source=path)
