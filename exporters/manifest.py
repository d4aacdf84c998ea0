"""The snapshot manifest: what a published ONNX file is, where it came from and how to verify it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from streamer.errors import SnapshotError

# A snapshot file name is a plain name inside the store directory, never a path, so a
# manifest read from a topic or a disk cannot point a reader at another file.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    """Metadata of one published snapshot version; the file's JSON form is its commit record.

    ``offsets`` maps topic -> partition (as a string) -> the next offset to read, so every
    event below it was seen by the model. ``metrics`` contains finite numbers only, because
    JSON has no NaN: omit a metric that is undefined. Construction validates every field
    and raises SnapshotError.
    """

    model_name: str
    version: int
    created_at: float
    onnx_file: str
    sha256: str
    size_bytes: int
    input_name: str
    output_name: str
    feature_names: list[str]
    source_model: dict[str, Any]
    offsets: dict[str, dict[str, int]]
    metrics: dict[str, float]
    parity_max_abs_diff: float

    def __post_init__(self) -> None:
        _validate_manifest(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as a dict of JSON types (a deep copy)."""
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        """Encode the manifest as UTF-8 JSON with sorted keys."""
        text = json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False)
        return text.encode("utf-8") + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Build a manifest from a decoded JSON object.

        Unknown keys are ignored, so that a reader keeps working when a newer writer adds a field.
        """
        if not isinstance(data, dict):
            raise SnapshotError(f"invalid manifest: expected a JSON object, got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise SnapshotError(f"invalid manifest: missing fields {missing}")
        return cls(**{name: data[name] for name in names})

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Decode and validate a manifest written by ``to_json``."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SnapshotError(f"invalid manifest: not UTF-8 JSON ({exc})") from exc
        return cls.from_dict(data)


def verify_snapshot_bytes(manifest: Manifest, data: bytes, *, source: str) -> None:
    """Raise SnapshotError unless ``data`` has the manifest's size and SHA-256.

    ``source`` names where the bytes came from (a file path, an announcement) in the message.
    """
    if len(data) != manifest.size_bytes:
        raise SnapshotError(
            f"snapshot {manifest.model_name} v{manifest.version} from {source} has "
            f"{len(data)} bytes but its manifest says {manifest.size_bytes}: the file is "
            "truncated or replaced; republish the snapshot or load another version"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise SnapshotError(
            f"snapshot {manifest.model_name} v{manifest.version} from {source} has "
            f"SHA-256 {digest} but its manifest says {manifest.sha256}: the file is "
            "corrupt or replaced; republish the snapshot or load another version"
        )


def is_plain_file_name(name: str) -> bool:
    """Return whether ``name`` is a file name without a directory part."""
    return bool(_FILE_NAME.match(name))


def _validate_manifest(manifest: Manifest) -> None:
    _require_text(manifest.model_name, "model_name")
    if not _is_int(manifest.version) or manifest.version < 1:
        raise _invalid("version", manifest.version, "an integer >= 1")
    if not _is_finite_number(manifest.created_at) or manifest.created_at < 0:
        raise _invalid("created_at", manifest.created_at, "Unix seconds (a finite number >= 0)")
    if not isinstance(manifest.onnx_file, str) or not is_plain_file_name(manifest.onnx_file):
        raise _invalid("onnx_file", manifest.onnx_file, "a plain file name without a directory")
    if not isinstance(manifest.sha256, str) or not _SHA256_HEX.match(manifest.sha256):
        raise _invalid("sha256", manifest.sha256, "64 lowercase hex digits")
    if not _is_int(manifest.size_bytes) or manifest.size_bytes < 1:
        raise _invalid("size_bytes", manifest.size_bytes, "an integer >= 1")
    _require_text(manifest.input_name, "input_name")
    _require_text(manifest.output_name, "output_name")
    _validate_feature_names(manifest.feature_names)
    _validate_source_model(manifest.source_model)
    _validate_offsets(manifest.offsets)
    _validate_metrics(manifest.metrics)
    if not _is_finite_number(manifest.parity_max_abs_diff) or manifest.parity_max_abs_diff < 0:
        raise _invalid("parity_max_abs_diff", manifest.parity_max_abs_diff, "a finite number >= 0")


def _validate_feature_names(feature_names: Any) -> None:
    if not isinstance(feature_names, list) or not feature_names:
        raise _invalid("feature_names", feature_names, "a non-empty list of strings")
    for name in feature_names:
        _require_text(name, "feature_names item")


def _validate_source_model(source_model: Any) -> None:
    if not isinstance(source_model, dict):
        raise _invalid("source_model", source_model, "a JSON object")
    try:
        json.dumps(source_model, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"invalid manifest field source_model: not JSON-serialisable ({exc})") from exc


def _validate_offsets(offsets: Any) -> None:
    if not isinstance(offsets, dict):
        raise _invalid("offsets", offsets, "a JSON object of topic -> partition -> offset")
    for topic, partitions in offsets.items():
        _require_text(topic, "offsets topic")
        if not isinstance(partitions, dict):
            raise _invalid(f"offsets[{topic!r}]", partitions, "a JSON object of partition -> offset")
        for partition, offset in partitions.items():
            if not isinstance(partition, str) or not partition.isdigit():
                raise _invalid(f"offsets[{topic!r}] partition", partition, "a partition number as a string")
            if not _is_int(offset) or offset < 0:
                raise _invalid(f"offsets[{topic!r}][{partition!r}]", offset, "an integer offset >= 0")


def _validate_metrics(metrics: Any) -> None:
    if not isinstance(metrics, dict):
        raise _invalid("metrics", metrics, "a JSON object of name -> number")
    for name, value in metrics.items():
        _require_text(name, "metrics name")
        if not _is_finite_number(value):
            raise _invalid(f"metrics[{name!r}]", value, "a finite number (omit undefined metrics)")


def _require_text(value: Any, field: str) -> None:
    if not isinstance(value, str) or not value:
        raise _invalid(field, value, "a non-empty string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(field: str, value: Any, expected: str) -> SnapshotError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return SnapshotError(f"invalid manifest field {field}: {shown}, expected {expected}")
