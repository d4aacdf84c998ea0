"""Offline access to handbook-schema transaction files, and their features as the stream computes them.

Used by `streamer pretrain` and by benchmarks and tests; the streaming workers never read files.
"""

from __future__ import annotations

import csv
import gzip
import io
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from .errors import ConfigurationError
from .features import FEATURE_NAMES, FeatureState

REQUIRED_COLUMNS = ("transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud")
DAY_MS = 86_400_000


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def day_start_ms(day: date | str) -> int:
    """Unix milliseconds of 00:00 UTC on ``day`` (a date or an ISO date string)."""
    if isinstance(day, str):
        day = date.fromisoformat(day)
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp() * 1000)


def load_transactions(paths: list[Path], start: str | None = None, end: str | None = None) -> dict[str, np.ndarray]:
    """Read CSV files (plain or gzip, in the given order) into column arrays.

    ``start`` and ``end`` are ISO dates; rows with ``start <= day < end`` are kept. Event
    times (ISO 8601 without zone) are taken as UTC and returned as Unix milliseconds.
    """
    lo = day_start_ms(start) if start else None
    hi = day_start_ms(end) if end else None
    parts: list[dict[str, np.ndarray]] = []
    for path in map(Path, paths):
        with _open_text(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, None) or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ConfigurationError(f"{path}: missing columns {missing}; expected the handbook schema {REQUIRED_COLUMNS}")
            index = [header.index(c) for c in REQUIRED_COLUMNS]
            rows = [[row[i] for i in index] for row in reader if row]
        if not rows:
            continue
        cols = list(zip(*rows))
        times = np.array(cols[1], dtype="datetime64[ms]").astype(np.int64)
        part = {
            "transaction_id": np.array(cols[0], dtype=np.int64),
            "event_time_ms": times,
            "customer_id": np.array(cols[2], dtype=np.int64),
            "terminal_id": np.array(cols[3], dtype=np.int64),
            "amount": np.array(cols[4], dtype=np.float64),
            "fraud": np.array(cols[5], dtype=np.int8),
        }
        keep = np.ones(len(times), dtype=bool)
        if lo is not None:
            keep &= times >= lo
        if hi is not None:
            keep &= times < hi
        parts.append({k: v[keep] for k, v in part.items()})
    if not parts:
        return {k: np.zeros(0, dtype=np.int64) for k in ("transaction_id", "event_time_ms", "customer_id", "terminal_id")} | {
            "amount": np.zeros(0), "fraud": np.zeros(0, dtype=np.int8)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def stream_features(
    data: dict[str, np.ndarray], *, label_delay_days: float = 7.0, chunk: int = 2000
) -> tuple[np.ndarray, FeatureState]:
    """Features of every transaction as the streaming workers compute them, labels arriving after a delay.

    Transactions are fed in chunks. Before each chunk, the labels whose arrival time
    (transaction time + delay) is at or before the chunk's last transaction are applied,
    which is the order the workers use (labels of a poll first). Returns the features
    and the feature state at the end, which the workers can start from.
    """
    state = FeatureState()
    n = len(data["event_time_ms"])
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    label_time = data["event_time_ms"] + int(label_delay_days * DAY_MS)
    next_label = 0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        until = data["event_time_ms"][hi - 1]
        stop = int(np.searchsorted(label_time, until, side="right"))
        stop = min(stop, lo)  # a label never precedes its own transaction
        if stop > next_label:
            sl = slice(next_label, stop)
            state.observe_labels(data["event_time_ms"][sl], data["terminal_id"][sl], data["fraud"][sl])
            next_label = stop
        out[lo:hi] = state.transform_transactions(
            data["event_time_ms"][lo:hi], data["customer_id"][lo:hi], data["terminal_id"][lo:hi], data["amount"][lo:hi]
        )
    # The labels still on their way at the end of the period go into the final state too.
    # With a label delay up to the terminal windows' 7-day delay this uses no label early: a
    # window of a transaction at t ends at t - 7 days, so it only counts transactions whose
    # labels arrived by t. With a longer label delay these labels are left out instead.
    if next_label < n and label_delay_days <= 7.0:
        sl = slice(next_label, n)
        state.observe_labels(data["event_time_ms"][sl], data["terminal_id"][sl], data["fraud"][sl])
    if n:
        state.prune(int(data["event_time_ms"][-1]))  # the workers need only the last 37 days
    return out, state
