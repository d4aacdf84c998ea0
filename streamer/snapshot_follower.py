"""Snapshot choice of an inference worker: the newest valid announcement, unless a version is pinned.

The worker reads ``model-snapshots`` from the beginning and hands each poll's records to
`SnapshotFollower.follow`. Two kinds of record count for this worker's model:

- Regular announcements (key: the model name). Unpinned, the newest valid one of a poll
  is swapped in if its version is above the one served. After an invalid one, the one
  before it is tried. Pinned, they are remembered but not loaded.
- Control announcements (key: ``exporters.control_key``), written by
  ``streamer snapshots pin|unpin|rollback``. A pin swaps in its version even if it is
  lower than the one served, after the same verification as any snapshot. A rejected pin
  leaves the worker as it was. An unpin swaps in the newest valid remembered announcement.

Within one poll the last valid control record decides whether the worker is pinned, which
gives the same end state as applying the records one by one. A restarted worker reads the
whole topic again, so it ends up honouring the newest pin. On a compacted topic the pin
survives later regular announcements, because the two kinds have different keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor

from exporters import CONTROL_PIN, Announcement, control_key, decode_announcement, resolve_snapshot_bytes

from .errors import SnapshotError
from .metrics import InferenceMetrics
from .scoring import ServedModel, build_served_model

logger = logging.getLogger(__name__)

# Regular announcements kept for an unpin to choose from. Compaction leaves one per model
# on the topic, so a few cover the versions announced while a pin was in force. An unpin
# falls back to older ones only when the newer ones are invalid.
REMEMBERED_ANNOUNCEMENTS = 8


class SnapshotFollower:
    """The snapshot choice of one inference worker, made from the records of ``model-snapshots``.

    It owns ``served``, the snapshot that the worker scores with.

    Call `follow` from one task only. ``served`` is replaced as a whole, so the score
    thread reads either the old snapshot or the new one.
    """

    def __init__(self, model_name: str, metrics: InferenceMetrics, load_executor: Executor) -> None:
        self.model_name = model_name
        self.metrics = metrics
        self.served: ServedModel | None = None
        self.pinned_version: int | None = None
        self._load_executor = load_executor
        self._key = model_name.encode("utf-8")
        self._control_key = control_key(model_name)
        self._remembered: deque[bytes] = deque(maxlen=REMEMBERED_ANNOUNCEMENTS)
        self._ignored_logged = False

    async def follow(self, records: list) -> None:
        """Apply one poll's records of the snapshot topic (other models' records are skipped)."""
        regular = [r.value for r in records if r.key == self._key]
        controls = [r.value for r in records if r.key == self._control_key]
        self._remembered.extend(regular)
        unpinned = False
        for value in reversed(controls):
            outcome = await self._apply_control(value)
            if outcome is not None:
                unpinned = outcome == "unpinned"
                break
        if self.pinned_version is not None:
            self._log_ignored(regular)
        elif unpinned:
            await self._serve_newest(list(self._remembered), observe_delay=False)
        elif regular:
            await self._serve_newest(regular, observe_delay=True)

    # -- control announcements ------------------------------------------------------------

    async def _apply_control(self, value: bytes) -> str | None:
        """Apply a pin or unpin; return "pinned" or "unpinned", or None if it was rejected."""
        announcement = self._decode(value)
        if announcement is None:
            return None
        manifest = announcement.manifest
        if manifest.model_name != self.model_name:
            self._reject("invalid_announcement",
                         f"control announcement under key {self._control_key!r} is for model {manifest.model_name!r}")
            return None
        if announcement.control == CONTROL_PIN:
            return "pinned" if await self._pin(announcement) else None
        if self.pinned_version is not None:
            logger.info("snapshot unpinned model=%s pinned_version=%d", self.model_name, self.pinned_version)
        self.pinned_version = None
        self.metrics.pinned_version.set(0)
        self._ignored_logged = False
        return "unpinned"

    async def _pin(self, announcement: Announcement) -> bool:
        manifest = announcement.manifest
        served = self.served
        if served is None or served.manifest.sha256 != manifest.sha256 or served.version != manifest.version:
            if not await self._swap(announcement, observe_delay=False):
                return False
        self.pinned_version = manifest.version
        self.metrics.pinned_version.set(manifest.version)
        self._ignored_logged = False
        logger.info("snapshot pinned model=%s version=%d", self.model_name, manifest.version)
        return True

    def _log_ignored(self, regular: list[bytes]) -> None:
        if not regular or self._ignored_logged:
            return
        try:
            newest = decode_announcement(regular[-1]).manifest.version
        except SnapshotError:
            return  # an invalid announcement is rejected when an unpin considers it
        if newest <= self.pinned_version:
            return
        self._ignored_logged = True
        logger.info("snapshot version=%d ignored while pinned model=%s pinned_version=%d; newer ones are ignored "
                    "without a log line until `streamer snapshots unpin`", newest, self.model_name, self.pinned_version)

    # -- regular announcements ------------------------------------------------------------

    async def _serve_newest(self, values: list[bytes], *, observe_delay: bool) -> None:
        """Swap in the newest valid announcement above the served version; older ones only after a rejection."""
        for value in reversed(values):
            announcement = self._decode(value)
            if announcement is None:
                continue
            if announcement.manifest.model_name != self.model_name:
                continue
            if self.served is not None and announcement.manifest.version <= self.served.version:
                return
            if await self._swap(announcement, observe_delay=observe_delay):
                return

    # -- shared steps ---------------------------------------------------------------------

    def _decode(self, value: bytes) -> Announcement | None:
        try:
            return decode_announcement(value)
        except SnapshotError as exc:
            self._reject("invalid_announcement", f"invalid snapshot announcement: {exc}")
            return None

    async def _swap(self, announcement: Announcement, *, observe_delay: bool) -> bool:
        """Verify and load a snapshot, then serve it; return False if it was rejected.

        ``observe_delay`` is False for pins and unpins: their snapshot was exported long
        before an operator chose it, so its age is no export-to-serving delay.
        """
        manifest = announcement.manifest
        try:
            served = await asyncio.get_running_loop().run_in_executor(self._load_executor, _load, announcement)
        except SnapshotError as exc:
            self._reject("invalid_snapshot", f"snapshot v{manifest.version} rejected: {exc}")
            return False
        previous = self.served.version if self.served is not None else 0
        self.served = served
        delay = max(0.0, time.time() - manifest.created_at)
        if observe_delay:
            self.metrics.update_to_serving.observe(delay)
        self.metrics.snapshots_loaded.inc()
        self.metrics.model_version.set(manifest.version)
        logger.info("snapshot swapped in model=%s version=%d previous=%d control=%s update_to_serving_seconds=%.3f",
                    manifest.model_name, manifest.version, previous, announcement.control, delay)
        return True

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.snapshots_rejected.labels(reason).inc()
        serving = self.served.version if self.served is not None else None
        logger.error("%s; still serving version=%s", message, serving)


def _load(announcement: Announcement) -> ServedModel:
    return build_served_model(announcement.manifest, resolve_snapshot_bytes(announcement))
