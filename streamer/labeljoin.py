"""Join delayed fraud labels with the features and scores computed at transaction time.

A transaction waits in the join until its label arrives or the label deadline passes (in
event time, measured by the watermark: the newest event time seen). A label that arrives
before its transaction (the two topics are consumed independently) is held until the
transaction comes or the deadline passes. Transaction ids already joined are remembered in
a bounded window, so a replayed transaction or a repeated label is never trained on twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
# Columns stored with each pending transaction, and their dtypes.
PENDING_COLUMNS = {
    "transaction_id": np.int64,
    "event_time_ms": np.int64,
    "customer_id": np.int64,
    "terminal_id": np.int64,
    "live_score": np.float32,
    "source_score": np.float32,
    "model_version": np.int32,
}


@dataclass
class Joined:
    """Examples leaving the join: columns of equal length, plus the features and the label."""

    columns: dict[str, np.ndarray]
    features: np.ndarray  # float32 (n, n_features)
    label: np.ndarray  # int8
    expired: bool = False  # True for examples whose label deadline passed

    def __len__(self) -> int:
        return len(self.label)


@dataclass(frozen=True)
class LabelOrigin:
    """Partition, offset, key and bytes of a label record, kept with an early label for its dead letter."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class JoinCounts:
    """Counts of what one call did with its events, for metrics and logs."""

    joined: int = 0
    early_labels: int = 0  # labels held because their transaction has not been seen yet
    duplicate_labels: int = 0  # same label again for a joined transaction
    conflicting_labels: int = 0  # a different label for a transaction already joined
    duplicate_transactions: int = 0
    expired: int = 0
    expired_dropped: int = 0
    orphan_labels: int = 0  # early labels whose transaction never came before the deadline
    conflicting_transaction_ids: list[int] = field(default_factory=list)
    conflicting_positions: list[int] = field(default_factory=list)  # positions in the add_labels input
    duplicate_label_positions: list[int] = field(default_factory=list)  # positions in the add_labels input
    # Early labels that expired as orphans, with their origin (None if added without one).
    orphans: list[tuple[int, LabelOrigin | None]] = field(default_factory=list)


class LabelJoin:
    """Pending transactions in slot arrays, indexed by a dict from transaction id to slot."""

    def __init__(
        self,
        n_features: int,
        *,
        deadline_days: float = 14.0,
        policy: str = "genuine",
        joined_memory: int = 500_000,
        initial_capacity: int = 1 << 16,
    ) -> None:
        if policy not in ("genuine", "drop"):
            raise ValueError(f"label deadline policy must be 'genuine' or 'drop', got {policy!r}")
        self.n_features = n_features
        self.deadline_ms = int(deadline_days * DAY_MS)
        self.policy = policy
        self.joined_memory = joined_memory
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._joined: OrderedDict[int, int] = OrderedDict()  # transaction id -> label
        self._early: dict[int, tuple[int, int]] = {}  # transaction id -> (label, label time ms)
        # Origins of early labels; an entry lives exactly as long as its `_early` entry.
        self._early_origin: dict[int, LabelOrigin] = {}
        self._capacity = 0
        self._cols: dict[str, np.ndarray] = {}
        self._features = np.zeros((0, n_features), dtype=np.float32)
        self._active = np.zeros(0, dtype=bool)
        self._grow(initial_capacity)

    @property
    def pending(self) -> int:
        return len(self._slot_of)

    @property
    def pending_early_labels(self) -> int:
        return len(self._early)

    def seen(self, transaction_id: np.ndarray) -> np.ndarray:
        """Return a bool mask of the ids pending, already joined or expired, or repeated earlier in the input.

        Ids that left the join are remembered for the last ``joined_memory`` transactions only,
        so that is the de-duplication window.
        """
        slot_of, joined = self._slot_of, self._joined
        batch: set[int] = set()
        mask = np.zeros(len(transaction_id), dtype=bool)
        for i, tx_id in enumerate(transaction_id.tolist()):
            if tx_id in batch or tx_id in slot_of or tx_id in joined:
                mask[i] = True
            batch.add(tx_id)
        return mask

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        for name, dtype in PENDING_COLUMNS.items():
            grown = np.zeros(capacity, dtype=dtype)
            if old:
                grown[:old] = self._cols[name]
            self._cols[name] = grown
        features = np.zeros((capacity, self.n_features), dtype=np.float32)
        features[:old] = self._features
        self._features = features
        active = np.zeros(capacity, dtype=bool)
        active[:old] = self._active
        self._active = active
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity

    def add_transactions(self, columns: dict[str, np.ndarray], features: np.ndarray) -> tuple[Joined, JoinCounts]:
        """Store transactions until their labels come; join at once those whose label came first."""
        counts = JoinCounts()
        ids = columns["transaction_id"].tolist()
        keep, early_rows, early_labels = [], [], []
        slot_of, joined, early = self._slot_of, self._joined, self._early
        for i, tx_id in enumerate(ids):
            if tx_id in slot_of or tx_id in joined:
                counts.duplicate_transactions += 1
                continue
            if early and tx_id in early:
                label, _ = early.pop(tx_id)
                self._early_origin.pop(tx_id, None)
                early_rows.append(i)
                early_labels.append(label)
                self._remember(tx_id, label)
                continue
            if not self._free:
                self._grow(max(1, self._capacity * 2))
            slot = self._free.pop()
            slot_of[tx_id] = slot
            keep.append((i, slot))
        if keep:
            rows = np.fromiter((i for i, _ in keep), dtype=np.int64, count=len(keep))
            slots = np.fromiter((s for _, s in keep), dtype=np.int64, count=len(keep))
            for name in PENDING_COLUMNS:
                self._cols[name][slots] = columns[name][rows]
            self._features[slots] = features[rows]
            self._active[slots] = True
        rows = np.asarray(early_rows, dtype=np.int64)
        result = Joined(
            {name: np.asarray(columns[name][rows], dtype=dtype) for name, dtype in PENDING_COLUMNS.items()},
            np.asarray(features[rows], dtype=np.float32).reshape(len(rows), self.n_features),
            np.asarray(early_labels, dtype=np.int8),
        )
        counts.joined = len(result)
        return result, counts

    def add_labels(
        self,
        transaction_id: np.ndarray,
        label: np.ndarray,
        label_time_ms: np.ndarray,
        origin_at: Callable[[int], LabelOrigin] | None = None,
    ) -> tuple[Joined, JoinCounts]:
        """Join labels with pending transactions; hold the early ones; count the repeated ones.

        ``origin_at(position)`` returns the origin of the label at that input position. It is
        called for early labels only, and the origin is returned with the label if it expires
        as an orphan.
        """
        counts = JoinCounts()
        taken_slots, taken_labels = [], []
        slot_of, joined = self._slot_of, self._joined
        for position, (tx_id, value, when) in enumerate(
            zip(transaction_id.tolist(), label.tolist(), label_time_ms.tolist())
        ):
            slot = slot_of.pop(tx_id, None)
            if slot is not None:
                taken_slots.append(slot)
                taken_labels.append(value)
                self._remember(tx_id, value)
                continue
            previous = joined.get(tx_id)
            if previous is None:
                previous = self._early.get(tx_id, (None, 0))[0]
            if previous is None:
                self._early[tx_id] = (value, when)
                if origin_at is not None:
                    self._early_origin[tx_id] = origin_at(position)
                counts.early_labels += 1
            elif previous == value:
                counts.duplicate_labels += 1
                counts.duplicate_label_positions.append(position)
            else:
                counts.conflicting_labels += 1
                counts.conflicting_transaction_ids.append(tx_id)
                counts.conflicting_positions.append(position)
        result = self._take(np.asarray(taken_slots, dtype=np.int64), np.asarray(taken_labels, dtype=np.int8))
        counts.joined = len(result)
        return result, counts

    def expire(self, watermark_ms: int) -> tuple[Joined, JoinCounts]:
        """Release transactions whose label is overdue at ``watermark_ms``, per the deadline policy."""
        counts = JoinCounts()
        cutoff = watermark_ms - self.deadline_ms
        overdue = np.flatnonzero(self._active & (self._cols["event_time_ms"] < cutoff))
        # Slot order depends on which slots were freed earlier and changes after a restore. Release
        # in event-time order (ties by transaction id), so that a resumed run trains on the same
        # micro-batches as an uninterrupted one.
        order = np.lexsort((self._cols["transaction_id"][overdue], self._cols["event_time_ms"][overdue]))
        overdue = overdue[order]

        for tx_id in self._cols["transaction_id"][overdue].tolist():
            del self._slot_of[tx_id]
            self._remember(tx_id, 0)
        labels = np.zeros(len(overdue), dtype=np.int8)
        result = self._take(overdue, labels)
        result.expired = True
        counts.expired = len(result)
        if self.policy == "drop":
            counts.expired_dropped = len(result)
            result = self._take(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8))
            result.expired = True
        stale = [tx for tx, (_, when) in self._early.items() if when < cutoff]
        for tx_id in stale:
            del self._early[tx_id]
            counts.orphans.append((tx_id, self._early_origin.pop(tx_id, None)))
        counts.orphan_labels = len(stale)
        if counts.expired or stale:
            logger.info(
                "label deadline passed expired=%d policy=%s orphan_labels=%d watermark_ms=%d",
                counts.expired, self.policy, len(stale), watermark_ms,
            )
        return result, counts

    def _take(self, slots: np.ndarray, labels: np.ndarray) -> Joined:
        columns = {name: self._cols[name][slots].copy() for name in PENDING_COLUMNS}
        features = self._features[slots].copy()
        self._active[slots] = False
        self._free.extend(slots.tolist())
        return Joined(columns, features, labels)

    def _remember(self, tx_id: int, label: int) -> None:
        self._joined[tx_id] = label
        if len(self._joined) > self.joined_memory:
            self._joined.popitem(last=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat numpy arrays of the whole join state, for the updater checkpoint."""
        slots = np.flatnonzero(self._active)
        state = {f"pending_{name}": self._cols[name][slots].copy() for name in PENDING_COLUMNS}
        state["pending_features"] = self._features[slots].copy()
        state["joined_transaction_id"] = np.fromiter(self._joined.keys(), dtype=np.int64, count=len(self._joined))
        state["joined_label"] = np.fromiter(self._joined.values(), dtype=np.int8, count=len(self._joined))
        early = list(self._early.items())
        state["early_transaction_id"] = np.asarray([tx for tx, _ in early], dtype=np.int64)
        state["early_label"] = np.asarray([v[0] for _, v in early], dtype=np.int8)
        state["early_time_ms"] = np.asarray([v[1] for _, v in early], dtype=np.int64)
        state.update(_origins_state([self._early_origin.get(tx) for tx, _ in early]))
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replace the join state with one from `state_dict` (the join must be empty)."""
        if self._slot_of or self._joined or self._early:
            raise RuntimeError("load_state_dict needs an empty LabelJoin")
        columns = {name: state[f"pending_{name}"] for name in PENDING_COLUMNS}
        self.add_transactions(columns, state["pending_features"])
        for tx_id, label in zip(state["joined_transaction_id"].tolist(), state["joined_label"].tolist()):
            self._remember(tx_id, label)
        for tx_id, label, when in zip(
            state["early_transaction_id"].tolist(), state["early_label"].tolist(), state["early_time_ms"].tolist()
        ):
            self._early[tx_id] = (label, when)
        # Checkpoints written before origins were kept have no early_origin_* arrays.
        if "early_origin_known" in state:
            for tx_id, origin in zip(state["early_transaction_id"].tolist(), _origins_from_state(state)):
                if origin is not None:
                    self._early_origin[tx_id] = origin


def _origins_state(origins: list[LabelOrigin | None]) -> dict[str, np.ndarray]:
    """Numeric arrays of early-label origins: bytes are concatenated with their lengths.

    A key length of -1 stands for no key; ``early_origin_known`` is False for a label held
    without an origin.
    """
    known = [o is not None for o in origins]
    present = [o if o is not None else LabelOrigin(0, 0, None, b"") for o in origins]
    return {
        "early_origin_known": np.asarray(known, dtype=bool),
        "early_origin_partition": np.asarray([o.partition for o in present], dtype=np.int32),
        "early_origin_offset": np.asarray([o.offset for o in present], dtype=np.int64),
        "early_origin_value_length": np.asarray([len(o.value) for o in present], dtype=np.int64),
        "early_origin_value_bytes": np.frombuffer(b"".join(o.value for o in present), dtype=np.uint8),
        "early_origin_key_length": np.asarray([-1 if o.key is None else len(o.key) for o in present], dtype=np.int64),
        "early_origin_key_bytes": np.frombuffer(b"".join(o.key or b"" for o in present), dtype=np.uint8),
    }


def _split_bytes(data: np.ndarray, lengths: np.ndarray) -> list[bytes | None]:
    raw = data.tobytes()
    parts: list[bytes | None] = []
    start = 0
    for length in lengths.tolist():
        if length < 0:
            parts.append(None)
            continue
        parts.append(raw[start:start + length])
        start += length
    return parts


def _origins_from_state(state: dict[str, np.ndarray]) -> list[LabelOrigin | None]:
    values = _split_bytes(state["early_origin_value_bytes"], state["early_origin_value_length"])
    keys = _split_bytes(state["early_origin_key_bytes"], state["early_origin_key_length"])
    rows = zip(state["early_origin_known"].tolist(), state["early_origin_partition"].tolist(),
               state["early_origin_offset"].tolist(), values, keys)
    return [
        LabelOrigin(partition, offset, key, value) if known else None
        for known, partition, offset, value, key in rows
    ]


class LabelGate:
    """Labels waiting until the transaction watermark reaches their event time.

    The two topics are consumed independently, so in a fast replay the labels can be read
    days of event time ahead of the transactions. Joining them at once would train on
    labels before they exist in event time. The gate keeps each label, with the partition,
    offset and bytes of its record for a later dead letter, until ``release`` is called
    with a watermark at or after the label's time.
    """

    _FIELDS = {"transaction_id": np.int64, "label": np.int8, "event_time_ms": np.int64,
               "partition": np.int32, "offset": np.int64}

    def __init__(self) -> None:
        self._arrays = {name: np.zeros(0, dtype=dtype) for name, dtype in self._FIELDS.items()}
        self._values = np.zeros(0, dtype=object)
        self._keys = np.zeros(0, dtype=object)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, columns: dict[str, np.ndarray], values: list[bytes], keys: list[bytes | None] | None = None) -> None:
        for name, dtype in self._FIELDS.items():
            self._arrays[name] = np.concatenate([self._arrays[name], np.asarray(columns[name], dtype=dtype)])
        extra = np.empty(len(values), dtype=object)
        extra[:] = values
        self._values = np.concatenate([self._values, extra])
        keys_extra = np.empty(len(values), dtype=object)
        keys_extra[:] = keys if keys is not None else [None] * len(values)
        self._keys = np.concatenate([self._keys, keys_extra])

    def release(self, watermark_ms: int | None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Remove and return (columns, values, keys) of the labels with event time <= watermark (all for None)."""
        if watermark_ms is None:
            ready = np.ones(len(self), dtype=bool)
        else:
            ready = self._arrays["event_time_ms"] <= watermark_ms
        out = {name: arr[ready] for name, arr in self._arrays.items()}
        values, keys = self._values[ready], self._keys[ready]
        if ready.any():
            self._arrays = {name: arr[~ready] for name, arr in self._arrays.items()}
            self._values = self._values[~ready]
            self._keys = self._keys[~ready]
        return out, values, keys

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"gate_{name}": arr.copy() for name, arr in self._arrays.items()}
        # Fixed-width bytes keep the archive free of pickled objects.
        state["gate_values"] = np.array(list(self._values), dtype=bytes) if len(self) else np.zeros(0, dtype="S1")
        # A missing key is stored as b"" with has_key False.
        state["gate_keys"] = np.array([k or b"" for k in self._keys], dtype=bytes) if len(self) else np.zeros(0, dtype="S1")
        state["gate_has_key"] = np.array([k is not None for k in self._keys], dtype=bool)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        columns = {name: state[f"gate_{name}"] for name in self._FIELDS}
        self._arrays = {name: np.zeros(0, dtype=dtype) for name, dtype in self._FIELDS.items()}
        self._values = np.zeros(0, dtype=object)
        self._keys = np.zeros(0, dtype=object)
        keys = None
        if "gate_keys" in state:
            keys = [bytes(k) if has else None for k, has in zip(state["gate_keys"], state["gate_has_key"])]
        self.add(columns, [bytes(v) for v in state["gate_values"]], keys)
