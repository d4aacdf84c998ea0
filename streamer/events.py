"""Event schemas of the `transactions` and `labels` topics, and their batch decoding.

Every event is one JSON object per Kafka message, UTF-8, keyed by the customer id so
that a transaction and its label land on the same partition.

Transaction event (topic ``transactions``)::

    {"type": "transaction", "event_id": "tx-1042", "transaction_id": 1042,
     "event_time": 1530403231000, "customer_id": 596, "terminal_id": 3156,
     "amount": 57.16}

Label event (topic ``labels``)::

    {"type": "label", "event_id": "lb-1042", "transaction_id": 1042,
     "event_time": 1531008031000, "label": 1}

``event_time`` is Unix time in milliseconds, UTC. For a label it is the time the label
became known (for example the chargeback), not the transaction's time. ``label`` is 1
for fraud and 0 for genuine. Ids are non-negative integers; ``amount`` is a finite,
non-negative number below ``MAX_AMOUNT``.

Decoding works on a whole batch of raw message values and returns column arrays, so the
hot path never builds one Python object per event beyond the decoded dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import orjson

TRANSACTION_FIELDS = frozenset(
    ("type", "event_id", "transaction_id", "event_time", "customer_id", "terminal_id", "amount")
)
LABEL_FIELDS = frozenset(("type", "event_id", "transaction_id", "event_time", "label"))

# Upper bound on a single card payment; larger values are treated as corrupt input.
MAX_AMOUNT = 1_000_000.0
# Oversized messages are rejected before parsing; real events are about 160 bytes.
MAX_MESSAGE_BYTES = 16_384
# Event times outside 2000-01-01 .. 2100-01-01 (Unix ms) are rejected as corrupt.
MIN_EVENT_TIME_MS = 946_684_800_000
MAX_EVENT_TIME_MS = 4_102_444_800_000
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class Rejected:
    """An event that failed validation, with where it came from and why."""

    index: int
    reason: str


@dataclass
class TransactionBatch:
    """Column arrays of valid transaction events, in input order."""

    index: np.ndarray  # position of each event in the input batch
    transaction_id: np.ndarray  # int64
    event_time_ms: np.ndarray  # int64
    customer_id: np.ndarray  # int64
    terminal_id: np.ndarray  # int64
    amount: np.ndarray  # float64
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.transaction_id)


@dataclass
class LabelBatch:
    """Column arrays of valid label events, in input order."""

    index: np.ndarray
    transaction_id: np.ndarray  # int64
    event_time_ms: np.ndarray  # int64
    label: np.ndarray  # int8, 0 or 1
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.transaction_id)


def transaction_event(
    transaction_id: int, event_time_ms: int, customer_id: int, terminal_id: int, amount: float
) -> dict:
    """Build a transaction event as a dict ready for JSON encoding."""
    return {
        "type": "transaction",
        "event_id": f"tx-{transaction_id}",
        "transaction_id": transaction_id,
        "event_time": event_time_ms,
        "customer_id": customer_id,
        "terminal_id": terminal_id,
        "amount": amount,
    }


def label_event(transaction_id: int, event_time_ms: int, label: int) -> dict:
    """Build a label event as a dict ready for JSON encoding."""
    return {
        "type": "label",
        "event_id": f"lb-{transaction_id}",
        "transaction_id": transaction_id,
        "event_time": event_time_ms,
        "label": label,
    }


def _parse_object(value: bytes | None, expected_type: str, fields: frozenset) -> dict:
    if value is None:
        raise ValueError("empty message (no value)")
    if len(value) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(value)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if type(event) is not dict:
        raise ValueError(f"expected a JSON object, got {type(event).__name__}")
    if event.keys() != fields:
        missing = sorted(fields - event.keys())
        extra = sorted(event.keys() - fields)
        raise ValueError(f"wrong fields: missing {missing}, unexpected {extra}")
    if event["type"] != expected_type:
        raise ValueError(f"unknown event type {event['type']!r}, expected {expected_type!r}")
    if type(event["event_id"]) is not str or not 0 < len(event["event_id"]) <= 128:
        raise ValueError("event_id must be a non-empty string of at most 128 characters")
    _check_id(event, "transaction_id")
    time_ms = event["event_time"]
    if type(time_ms) is not int or not MIN_EVENT_TIME_MS <= time_ms < MAX_EVENT_TIME_MS:
        raise ValueError(f"event_time must be Unix milliseconds between 2000 and 2100, got {time_ms!r}")
    return event


def _check_id(event: dict, name: str) -> None:
    value = event[name]
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError(f"{name} must be a non-negative 64-bit integer, got {value!r}")


def _check_transaction(event: dict) -> None:
    _check_id(event, "customer_id")
    _check_id(event, "terminal_id")
    amount = event["amount"]
    if type(amount) not in (int, float) or not math.isfinite(amount):
        raise ValueError(f"amount must be a finite number, got {amount!r}")
    if not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"amount must be between 0 and {MAX_AMOUNT:.0f}, got {amount!r}")


def decode_transactions(values: list[bytes | None]) -> TransactionBatch:
    """Decode and validate raw `transactions` message values; invalid ones are listed in ``rejected``."""
    rows: list[tuple] = []
    index: list[int] = []
    rejected: list[Rejected] = []
    for i, value in enumerate(values):
        try:
            event = _parse_object(value, "transaction", TRANSACTION_FIELDS)
            _check_transaction(event)
        except ValueError as exc:
            rejected.append(Rejected(i, str(exc)))
            continue
        index.append(i)
        rows.append(
            (event["transaction_id"], event["event_time"], event["customer_id"], event["terminal_id"], event["amount"])
        )
    columns = list(zip(*rows)) if rows else [(), (), (), (), ()]
    return TransactionBatch(
        index=np.asarray(index, dtype=np.int64),
        transaction_id=np.asarray(columns[0], dtype=np.int64),
        event_time_ms=np.asarray(columns[1], dtype=np.int64),
        customer_id=np.asarray(columns[2], dtype=np.int64),
        terminal_id=np.asarray(columns[3], dtype=np.int64),
        amount=np.asarray(columns[4], dtype=np.float64),
        rejected=rejected,
    )


def decode_labels(values: list[bytes | None]) -> LabelBatch:
    """Decode and validate raw `labels` message values; invalid ones are listed in ``rejected``."""
    rows: list[tuple] = []
    index: list[int] = []
    rejected: list[Rejected] = []
    for i, value in enumerate(values):
        try:
            event = _parse_object(value, "label", LABEL_FIELDS)
            if event["label"] not in (0, 1) or type(event["label"]) is not int:
                raise ValueError(f"label must be 0 or 1, got {event['label']!r}")
        except ValueError as exc:
            rejected.append(Rejected(i, str(exc)))
            continue
        index.append(i)
        rows.append((event["transaction_id"], event["event_time"], event["label"]))
    columns = list(zip(*rows)) if rows else [(), (), ()]
    return LabelBatch(
        index=np.asarray(index, dtype=np.int64),
        transaction_id=np.asarray(columns[0], dtype=np.int64),
        event_time_ms=np.asarray(columns[1], dtype=np.int64),
        label=np.asarray(columns[2], dtype=np.int8),
        rejected=rejected,
    )
