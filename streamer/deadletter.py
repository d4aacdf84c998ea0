"""Dead-letter records: an invalid event keeps its original bytes; the reason and origin go in headers.

Headers (all UTF-8): ``streamer.reason``, ``streamer.source.topic``,
``streamer.source.partition``, ``streamer.source.offset``, ``streamer.worker``.
The record key is the original key, so a fixed event can be re-produced as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons are cut to this length in headers; the full text is in the worker's log.
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class DeadLetter:
    """One rejected record and why it was rejected."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str

    def headers(self, worker: str) -> list[tuple[str, bytes]]:
        return [
            ("streamer.reason", self.reason[:MAX_REASON_CHARS].encode()),
            ("streamer.source.topic", self.topic.encode()),
            ("streamer.source.partition", str(self.partition).encode()),
            ("streamer.source.offset", str(self.offset).encode()),
            ("streamer.worker", worker.encode()),
        ]


def dead_letter_from(record, reason: str) -> DeadLetter:
    """Build a dead letter from a consumer record (anything with topic, partition, offset, key, value)."""
    return DeadLetter(record.topic, record.partition, record.offset, record.key, record.value, reason)
