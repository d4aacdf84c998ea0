"""A versioned snapshot store on the local filesystem.

Layout, for model ``fraud`` under ``root``::

    root/fraud/v000012.onnx         the model file
    root/fraud/v000012.json         its manifest, the commit record of version 12
    root/fraud/high-water-mark.json the highest version ever allocated
    root/fraud/pin.json             the pinned version, while there is one (``exporters.pin``)
    root/fraud/.publish.lock        serialises publishers (POSIX advisory lock)
    root/fraud/.tmp-*               files being written, or left by a crashed publisher

A version exists once its manifest exists. Every file is written to a temporary name
(``.tmp-`` prefix, never a final name), flushed and fsynced, renamed into place, and then
the directory is fsynced, so a reader sees a whole file or none. The model file is
renamed before the manifest, so a visible manifest always follows a complete model file.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamer.errors import ConfigurationError, SnapshotError

from .manifest import Manifest, is_plain_file_name, verify_snapshot_bytes
from .pin import PIN_FILE, Pin, read_pin

if TYPE_CHECKING:
    # Only for annotations: the store is used by inference workers that need not import torch.
    from .onnx_export import ExportResult

logger = logging.getLogger(__name__)

_MODEL_FILE = re.compile(r"^v(\d{6,})\.onnx$")
_MANIFEST_FILE = re.compile(r"^v(\d{6,})\.json$")
_TEMP_PREFIX = ".tmp-"
_HIGH_WATER_FILE = "high-water-mark.json"
_LOCK_FILE = ".publish.lock"
# Snapshot files are read by inference workers that may run as another user.
_FILE_MODE = 0o644

__all__ = ["Manifest", "Pin", "SnapshotStore"]


class SnapshotStore:
    """Versioned ONNX snapshots of one model below ``root / model_name``.

    Versions start at 1, only increase and are never reused, also after retention
    deleted their files and across process restarts, because the highest version ever
    allocated is persisted. Publishers are serialised by an advisory lock on the
    directory, which holds between processes on one host (and on network filesystems
    only where they support ``flock``). Readers take no lock.

    Arguments:
        root: folder that holds one subfolder per model (created on first publish).
        model_name: plain name (letters, digits, ``.``, ``_``, ``-``), also the subfolder.
        retention: number of newest versions kept after each publish (>= 1). A pinned
            version is kept in addition.
    """

    def __init__(self, root: Path, model_name: str, retention: int) -> None:
        if not isinstance(model_name, str) or not is_plain_file_name(model_name):
            raise ConfigurationError(
                f"invalid model name {model_name!r}: "
                "use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 1:
            raise ConfigurationError(f"invalid snapshot retention {retention!r}: expected an integer >= 1")
        self.root = Path(root)
        self.model_name = model_name
        self.retention = retention
        self.directory = self.root / model_name

    def model_path(self, version: int) -> Path:
        """Return the path of the model file of ``version`` (which may not exist)."""
        return self.directory / _model_file_name(version)

    def publish(
        self,
        result: ExportResult,
        *,
        feature_names: Sequence[str],
        source_model: dict[str, Any],
        offsets: dict[str, dict[str, int]],
        metrics: dict[str, float],
    ) -> Manifest:
        """Store ``result`` as the next version and return its manifest.

        Steps, under the publish lock:
          1. Allocate the version: one above both the high-water mark and every version on disk.
          2. Persist the new high-water mark, so that the version is never handed out again.
          3. Write the model file atomically.
          4. Write the manifest atomically: the commit point.
          5. Prune to the newest ``retention`` versions and remove files of failed publishes.

        ``offsets`` maps topic -> partition (a string) -> next offset to read. Raises
        SnapshotError if the inputs are invalid or a file cannot be written. If a step
        after 2 fails, the version number is skipped, never reused.
        """
        _check_result(result, feature_names)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"snapshot directory {self.directory} could not be created: {exc}") from exc
        with self._publish_lock():
            # Step 1: allocate.
            version = self._next_version()
            manifest = Manifest(
                model_name=self.model_name,
                version=version,
                created_at=time.time(),
                onnx_file=_model_file_name(version),
                sha256=result.sha256,
                size_bytes=len(result.onnx_bytes),
                input_name=result.input_name,
                output_name=result.output_name,
                feature_names=list(feature_names),
                # Copies, so that the caller changing its dicts later cannot change this manifest.
                source_model=copy.deepcopy(source_model),
                offsets=copy.deepcopy(offsets),
                metrics=copy.deepcopy(metrics),
                parity_max_abs_diff=result.max_abs_diff,
            )
            try:
                # Step 2: the high-water mark goes first, so a crash later skips this version.
                self._write_high_water_mark(version)
                # Steps 3 and 4: model file, then the manifest that makes it visible.
                _write_atomically(self.directory, manifest.onnx_file, result.onnx_bytes)
                _write_atomically(self.directory, _manifest_file_name(version), manifest.to_json())
            except OSError as exc:
                raise SnapshotError(
                    f"publishing snapshot {self.model_name} v{version} to {self.directory} failed: {exc}; "
                    "check free space and permissions. The next publish skips this version."
                ) from exc
            logger.info(
                "snapshot published model=%s version=%d sha256=%s size_bytes=%d",
                self.model_name,
                version,
                manifest.sha256[:12],
                manifest.size_bytes,
            )
            # Step 5: clean-up. Its failure leaves extra files but does not undo the publish.
            try:
                self._prune()
                self._remove_stale_temporary_files()
            except OSError as exc:
                logger.warning(
                    "snapshot prune failed model=%s directory=%s error=%s", self.model_name, self.directory, exc
                )
        return manifest

    def versions(self) -> list[int]:
        """Return the committed versions (those with a manifest), oldest first."""
        return sorted(self._versions_matching(_MANIFEST_FILE))

    def manifests(self) -> list[Manifest]:
        """Return the manifests of the committed versions, oldest first.

        A version pruned by a concurrent publish while this runs is left out.
        """
        found = (self._read_manifest(version) for version in self.versions())
        return [manifest for manifest in found if manifest is not None]

    def latest(self) -> Manifest | None:
        """Return the manifest of the newest committed version, or None if there is none."""
        for version in reversed(self.versions()):
            manifest = self._read_manifest(version)
            if manifest is not None:
                return manifest
        return None

    def pinned(self) -> Pin | None:
        """Return the pin record, or None if no version is pinned.

        Raises SnapshotError if the pin record cannot be read or is invalid.
        """
        return read_pin(self.directory)

    def pin(self, version: int) -> tuple[Pin, bytes]:
        """Record ``version`` as pinned and return the pin with the verified model bytes.

        Under the publish lock, so that no concurrent publish prunes the version between
        the check and the record. Raises SnapshotError if the version is not in the store,
        its file is missing, truncated or corrupt, or the record cannot be written.
        """
        if not self.directory.is_dir():
            raise SnapshotError(f"snapshot {self.model_name} v{version} not found: {self.directory} does not exist")
        with self._publish_lock():
            manifest, data = self.load(version)
            pin = Pin(manifest=manifest, pinned_at=time.time())
            try:
                _write_atomically(self.directory, PIN_FILE, pin.to_json())
            except OSError as exc:
                raise SnapshotError(f"pin record in {self.directory} could not be written: {exc}") from exc
        logger.info("snapshot pinned model=%s version=%d sha256=%s", self.model_name, version, manifest.sha256[:12])
        return pin, data

    def unpin(self) -> Pin | None:
        """Delete the pin record; return the pin it contained, or None if no version was pinned."""
        if not self.directory.is_dir():
            return None
        with self._publish_lock():
            try:
                pin = self.pinned()
            except SnapshotError as exc:
                # An unreadable record is deleted all the same: unpinning is how to recover from it.
                logger.warning("pin record unreadable, deleting it model=%s error=%s", self.model_name, exc)
                pin = None
            try:
                (self.directory / PIN_FILE).unlink(missing_ok=True)
                _fsync_directory(self.directory)
            except OSError as exc:
                raise SnapshotError(f"pin record in {self.directory} could not be deleted: {exc}") from exc
        if pin is not None:
            logger.info("snapshot unpinned model=%s version=%d", self.model_name, pin.version)
        return pin

    def manifest(self, version: int) -> Manifest:
        """Return the manifest of ``version``; raise SnapshotError if it is not committed or invalid."""
        manifest = self._read_manifest(version)
        if manifest is None:
            raise SnapshotError(
                f"snapshot {self.model_name} v{version} not found in {self.directory}; "
                f"committed versions: {self.versions()}"
            )
        return manifest

    def load(self, version: int) -> tuple[Manifest, bytes]:
        """Return the manifest and model bytes of ``version`` after checking size and SHA-256.

        Raises SnapshotError naming the file if it is missing, truncated or corrupt.
        """
        manifest = self.manifest(version)
        path = self.directory / manifest.onnx_file
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SnapshotError(
                f"snapshot file {path} of {self.model_name} v{version} is missing although its manifest exists; "
                "load another version or republish"
            ) from exc
        except OSError as exc:
            raise SnapshotError(
                f"snapshot file {path} of {self.model_name} v{version} could not be read: "
                f"{exc}"
            ) from exc
        verify_snapshot_bytes(manifest, data, source=str(path))
        return manifest, data

    def _read_manifest(self, version: int) -> Manifest | None:
        """Return the validated manifest of ``version``, or None if its file does not exist."""
        path = self.directory / _manifest_file_name(version)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"manifest {path} could not be read: {exc}") from exc
        try:
            manifest = Manifest.from_json(raw)
        except SnapshotError as exc:
            raise SnapshotError(f"manifest {path} is invalid: {exc}; restore it or delete the version") from exc
        expected = (self.model_name, version, _model_file_name(version))
        found = (manifest.model_name, manifest.version, manifest.onnx_file)
        if found != expected:
            raise SnapshotError(
                f"manifest {path} describes model {found[0]!r} v{found[1]} file {found[2]!r}, "
                f"expected {expected[0]!r} v{expected[1]} file {expected[2]!r}; restore it or delete the version"
            )
        return manifest

    def _versions_matching(self, pattern: re.Pattern[str]) -> set[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        return {int(match.group(1)) for match in map(pattern.match, names) if match}

    def _next_version(self) -> int:
        on_disk = self._versions_matching(_MODEL_FILE) | self._versions_matching(_MANIFEST_FILE)
        return max(self._read_high_water_mark(), *on_disk, 0) + 1

    def _read_high_water_mark(self) -> int:
        path = self.directory / _HIGH_WATER_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"high-water mark {path} could not be read: {exc}; {_HIGH_WATER_FIX}") from exc
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise SnapshotError(f"high-water mark {path} is invalid: {data!r}; {_HIGH_WATER_FIX}")
        return version

    def _write_high_water_mark(self, version: int) -> None:
        data = json.dumps({"model_name": self.model_name, "version": version}).encode("utf-8") + b"\n"
        _write_atomically(self.directory, _HIGH_WATER_FILE, data)

    def _prune(self) -> None:
        """Delete versions beyond retention (manifest first), then model files without a manifest.

        The pinned version is kept, because a worker that starts later may need its file.
        """
        committed = self.versions()
        expired = committed[: -self.retention]
        pinned = self._pinned_version_for_prune()
        expired = [version for version in expired if version != pinned]
        for version in expired:
            sha_prefix = self._sha_prefix_for_log(version)
            (self.directory / _manifest_file_name(version)).unlink(missing_ok=True)
            self.model_path(version).unlink(missing_ok=True)
            logger.info("snapshot pruned model=%s version=%d sha256=%s", self.model_name, version, sha_prefix)
        # Under the publish lock a model file without a manifest can only come from a
        # publish that failed between its two renames.
        kept = set(committed) - set(expired)
        for version in sorted(self._versions_matching(_MODEL_FILE) - kept):
            self.model_path(version).unlink(missing_ok=True)
            logger.warning("uncommitted snapshot file removed model=%s version=%d", self.model_name, version)
        _fsync_directory(self.directory)

    def _pinned_version_for_prune(self) -> int | None:
        try:
            pin = self.pinned()
        except SnapshotError as exc:
            # Keep publishing: an unreadable pin record must not stop the updater's exports.
            logger.warning("pin record unreadable, pruning as if no version were pinned model=%s error=%s",
                           self.model_name, exc)
            return None
        return pin.version if pin is not None else None

    def _sha_prefix_for_log(self, version: int) -> str:
        try:
            manifest = self._read_manifest(version)
        except SnapshotError:
            return "unreadable"
        return manifest.sha256[:12] if manifest is not None else "missing"

    def _remove_stale_temporary_files(self) -> None:
        # Under the publish lock no other publisher is writing, so every temporary file is stale.
        for entry in self.directory.iterdir():
            if entry.name.startswith(_TEMP_PREFIX):
                entry.unlink(missing_ok=True)
                logger.warning("stale temporary file removed model=%s path=%s", self.model_name, entry)

    @contextlib.contextmanager
    def _publish_lock(self) -> Iterator[None]:
        path = self.directory / _LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise SnapshotError(
                f"publish lock {path} could not be opened: {exc}; "
                "check the directory's permissions"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


_HIGH_WATER_FIX = 'write {"version": N} into it, with N the highest version ever published'


def _check_result(result: ExportResult, feature_names: Sequence[str]) -> None:
    if hashlib.sha256(result.onnx_bytes).hexdigest() != result.sha256:
        raise SnapshotError("export result's sha256 does not match its onnx_bytes; export the model again")
    if isinstance(feature_names, str) or len(feature_names) != result.n_features:
        raise SnapshotError(
            f"got {len(feature_names)} feature names for a model with {result.n_features} inputs; "
            "pass one name per input column, in column order"
        )


def _model_file_name(version: int) -> str:
    return f"v{version:06d}.onnx"


def _manifest_file_name(version: int) -> str:
    return f"v{version:06d}.json"


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory / name`` by temporary file, fsync, rename and directory fsync."""
    fd, temp_path = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
