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
import operator
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


_TRANSACTION_KEYS = ("type", "event_id", "transaction_id", "event_time", "customer_id", "terminal_id", "amount")
_LABEL_KEYS = ("type", "event_id", "transaction_id", "event_time", "label")
_get_transaction = operator.itemgetter(*_TRANSACTION_KEYS)
_get_label = operator.itemgetter(*_LABEL_KEYS)
# Exact Python types of a valid event's values, in key order (bool is not int here).
_TRANSACTION_TYPES = {(str, str, int, int, int, int, float), (str, str, int, int, int, int, int)}
_LABEL_TYPES = {(str, str, int, int, int)}


def _fast_rows(values, getter, n_keys: int, kind: str, types: set) -> tuple[list[int], list[tuple], list[int]]:
    """Parse events whose shape and value types are exactly right; return (index, rows, others).

    This is the hot path: one orjson call and a few C-level checks per event. Everything it
    does not accept goes to `others`, where the slow path finds the precise reason.
    """
    index, rows, others = [], [], []
    loads = orjson.loads
    for i, value in enumerate(values):
        try:
            if len(value) > MAX_MESSAGE_BYTES:
                raise ValueError
            event = loads(value)
            if len(event) != n_keys:
                raise ValueError
            row = getter(event)
        except (TypeError, KeyError, ValueError):  # None, bad JSON, a list, a missing key
            others.append(i)
            continue
        if row[0] != kind or tuple(map(type, row)) not in types:
            others.append(i)
            continue
        index.append(i)
        rows.append(row)
    return index, rows, others


def _out_of_range(ids: list[np.ndarray], event_time: np.ndarray, event_ids: tuple) -> np.ndarray:
    bad = (event_time < MIN_EVENT_TIME_MS) | (event_time >= MAX_EVENT_TIME_MS)
    for column in ids:
        bad |= column < 0
    lengths = np.fromiter(map(len, event_ids), dtype=np.int64, count=len(event_ids))
    return bad | (lengths == 0) | (lengths > 128)


def decode_transactions(values: list[bytes | None]) -> TransactionBatch:
    """Decode and validate raw `transactions` message values; invalid ones are listed in ``rejected``."""
    index, rows, others = _fast_rows(values, _get_transaction, len(_TRANSACTION_KEYS), "transaction", _TRANSACTION_TYPES)
    try:
        columns = list(zip(*rows)) if rows else [()] * len(_TRANSACTION_KEYS)
        ints = [np.asarray(columns[k], dtype=np.int64) for k in (2, 3, 4, 5)]
        amount = np.asarray(columns[6], dtype=np.float64)
    except OverflowError:  # an id beyond int64: let the slow path name it
        return _decode_slowly(values, _slow_transaction, len(values))
    bad = _out_of_range([ints[0], ints[2], ints[3]], ints[1], columns[1])
    bad |= ~np.isfinite(amount) | (amount < 0) | (amount > MAX_AMOUNT)
    keep = ~bad
    batch = TransactionBatch(
        index=np.asarray(index, dtype=np.int64)[keep], transaction_id=ints[0][keep], event_time_ms=ints[1][keep],
        customer_id=ints[2][keep], terminal_id=ints[3][keep], amount=amount[keep],
    )
    others += np.asarray(index, dtype=np.int64)[bad].tolist()
    if others:
        extra = _decode_slowly([values[i] for i in others], _slow_transaction, len(others))
        batch = _merge_transactions(batch, extra, others)
    return batch


def decode_labels(values: list[bytes | None]) -> LabelBatch:
    """Decode and validate raw `labels` message values; invalid ones are listed in ``rejected``."""
    index, rows, others = _fast_rows(values, _get_label, len(_LABEL_KEYS), "label", _LABEL_TYPES)
    try:
        columns = list(zip(*rows)) if rows else [()] * len(_LABEL_KEYS)
        ids = np.asarray(columns[2], dtype=np.int64)
        times = np.asarray(columns[3], dtype=np.int64)
        labels = np.asarray(columns[4], dtype=np.int64)
    except OverflowError:
        return _decode_slowly(values, _slow_label, len(values))
    bad = _out_of_range([ids], times, columns[1]) | (labels < 0) | (labels > 1)
    keep = ~bad
    batch = LabelBatch(
        index=np.asarray(index, dtype=np.int64)[keep], transaction_id=ids[keep], event_time_ms=times[keep],
        label=labels[keep].astype(np.int8),
    )
    others += np.asarray(index, dtype=np.int64)[bad].tolist()
    if others:
        extra = _decode_slowly([values[i] for i in others], _slow_label, len(others))
        batch = _merge_labels(batch, extra, others)
    return batch


def _slow_transaction(value: bytes | None) -> tuple:
    event = _parse_object(value, "transaction", TRANSACTION_FIELDS)
    _check_transaction(event)
    return (event["transaction_id"], event["event_time"], event["customer_id"], event["terminal_id"], event["amount"])


def _slow_label(value: bytes | None) -> tuple:
    event = _parse_object(value, "label", LABEL_FIELDS)
    if type(event["label"]) is not int or event["label"] not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {event['label']!r}")
    return (event["transaction_id"], event["event_time"], event["label"])


def _decode_slowly(values: list, parse, n: int):
    """Validate event by event, with a precise reason for each rejection."""
    rows: list[tuple] = []
    index: list[int] = []
    rejected: list[Rejected] = []
    for i, value in enumerate(values):
        try:
            rows.append(parse(value))
            index.append(i)
        except ValueError as exc:
            rejected.append(Rejected(i, str(exc)))
    width = 5 if parse is _slow_transaction else 3
    columns = list(zip(*rows)) if rows else [()] * width
    idx = np.asarray(index, dtype=np.int64)
    if parse is _slow_transaction:
        return TransactionBatch(
            idx, np.asarray(columns[0], np.int64), np.asarray(columns[1], np.int64), np.asarray(columns[2], np.int64),
            np.asarray(columns[3], np.int64), np.asarray(columns[4], np.float64), rejected,
        )
    return LabelBatch(idx, np.asarray(columns[0], np.int64), np.asarray(columns[1], np.int64),
                      np.asarray(columns[2], np.int8), rejected)


def _remap(batch, positions: list[int]):
    """Translate indices of a sub-batch (the slow path's input) back to the full batch."""
    lookup = np.asarray(positions, dtype=np.int64)
    batch.index = lookup[batch.index] if len(batch.index) else batch.index
    batch.rejected = [Rejected(positions[r.index], r.reason) for r in batch.rejected]
    return batch


def _merge_transactions(fast: TransactionBatch, slow: TransactionBatch, positions: list[int]) -> TransactionBatch:
    slow = _remap(slow, positions)
    index = np.concatenate([fast.index, slow.index])
    order = np.argsort(index, kind="stable")
    return TransactionBatch(
        index[order],
        *(np.concatenate([getattr(fast, f), getattr(slow, f)])[order]
          for f in ("transaction_id", "event_time_ms", "customer_id", "terminal_id", "amount")),
        rejected=sorted(slow.rejected, key=lambda r: r.index),
    )


def _merge_labels(fast: LabelBatch, slow: LabelBatch, positions: list[int]) -> LabelBatch:
    slow = _remap(slow, positions)
    index = np.concatenate([fast.index, slow.index])
    order = np.argsort(index, kind="stable")
    return LabelBatch(
        index[order],
        *(np.concatenate([getattr(fast, f), getattr(slow, f)])[order] for f in ("transaction_id", "event_time_ms", "label")),
        rejected=sorted(slow.rejected, key=lambda r: r.index),
    )
