"""Handbook fraud features, computed incrementally from the event stream in keyed state.

The feature set is the baseline of *Machine Learning for Credit Card Fraud Detection -
Practical Handbook* (Le Borgne et al.). It contains the amount, weekend and night flags,
per customer the count and mean amount over the last 1, 7 and 30 days, and per terminal
the count and fraud rate over 1, 7 and 30-day windows. Terminal windows end a delay
(7 days) before the transaction, because fraud labels arrive late. Offline pretraining,
the streaming updater and the inference worker all use :class:`FeatureState`, so
training and serving cannot drift apart.

Window semantics, with ``t`` the transaction's event time (Unix milliseconds, UTC):

- customer window of ``w``: the customer's transactions seen so far with event time in
  ``(t - w, t]``, the current one included. A transaction with the same event time
  that comes later in the stream is not included.
- terminal window of ``w`` with delay ``d``: the terminal's transactions seen so far with
  event time in ``(t - d - w, t - d]``. The fraud rate is the number of those whose
  fraud label was observed as 1, divided by their count, and 0 for an empty window.

On a stream sorted by event time these equal the handbook's pandas code (time-based
``rolling`` windows, closed on the right).

The state is one sorted array of event times per key (with running sums of amounts for
customers), queried with ``bisect``. Each transaction costs a few ``bisect`` calls.
"""

from __future__ import annotations

import logging
import math
from array import array
from bisect import bisect_right, insort_right
from collections.abc import Sequence

import numpy as np

from streamer.errors import CheckpointError, ConfigurationError, StreamerError

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# 1970-01-01 was a Thursday, so (days since the epoch + 3) % 7 is the weekday with Monday = 0.
_EPOCH_WEEKDAY = 3
_LAST_NIGHT_HOUR = 6
# Running sums of one customer are shifted back to 0 when they exceed this, so that the
# difference of two sums keeps about 1e-9 relative precision (float64) however long the
# customer stays active.
_CUMSUM_REBASE_LIMIT = 2.0**32
STATE_FORMAT_VERSION = 1

FEATURE_NAMES: tuple[str, ...] = (
    "amount",
    "is_weekend",
    "is_night",
    "customer_count_1d",
    "customer_mean_amount_1d",
    "customer_count_7d",
    "customer_mean_amount_7d",
    "customer_count_30d",
    "customer_mean_amount_30d",
    "terminal_count_1d",
    "terminal_fraud_rate_1d",
    "terminal_count_7d",
    "terminal_fraud_rate_7d",
    "terminal_count_30d",
    "terminal_fraud_rate_30d",
)


class FeatureInputError(StreamerError, ValueError):
    """Arrays passed to FeatureState have an invalid shape, type or value."""


class FeatureState:
    """Keyed state of the handbook features, updated transaction by transaction.

    Ordering contract: the caller applies, for each batch of the stream, the batch's
    labels (:meth:`observe_labels`) before its transactions
    (:meth:`transform_transactions`), and labels before transactions of equal event time.
    This is exact when every label arrives at most ``d`` (the terminal delay) after its
    transaction, as in the handbook's setting. Take a label that arrives at time ``L``,
    and a transaction of the same batch at time ``t`` that precedes it in the stream,
    so ``t <= L``. Its window ends at ``t - d <= L - d``, and the labelled transaction
    happened at or after ``L - d``, so outside that window (at equal times the label
    comes first anyway). A label that arrives later than ``d`` becomes visible to the
    transactions of its own batch that precede it, so at most one batch early.

    Each fraud label must be observed once: duplicates are counted twice, so the caller
    removes them (by event id) first. A label whose transaction this state never saw
    still counts, so the rate can exceed 1 when the state starts after the transaction.

    State grows with every transaction until :meth:`prune` drops what no window can reach.

    Example::

        >>> state = FeatureState()
        >>> state.transform_transactions(
        ...     np.array([1522540831000]), np.array([596]), np.array([3156]), np.array([57.16])
        ... )[0, :5].tolist()
        [57.15999984741211, 1.0, 1.0, 1.0, 57.15999984741211]
    """

    def __init__(
        self,
        *,
        customer_windows_days: Sequence[float] = (1, 7, 30),
        terminal_windows_days: Sequence[float] = (1, 7, 30),
        terminal_delay_days: float = 7.0,
    ) -> None:
        self.customer_windows_ms = _windows_to_ms("customer_windows_days", customer_windows_days)
        self.terminal_windows_ms = _windows_to_ms("terminal_windows_days", terminal_windows_days)
        self.terminal_delay_ms = _delay_to_ms(terminal_delay_days)
        self.feature_names = _feature_names(customer_windows_days, terminal_windows_days)
        # customer id -> (event times, running sums of amounts). Sums have one more item:
        # sums[i] is the total amount of the entries before index i.
        self._customers: dict[int, tuple[array, array]] = {}
        # terminal id -> event times of its transactions / of its transactions labelled fraud.
        self._terminal_times: dict[int, array] = {}
        self._terminal_frauds: dict[int, array] = {}
        self._entry_count = 0

    @property
    def num_keys(self) -> int:
        """Number of keys in the customer, terminal and terminal-fraud tables, added up."""
        return len(self._customers) + len(self._terminal_times) + len(self._terminal_frauds)

    @property
    def num_entries(self) -> int:
        """Number of stored event times across all keys (one per transaction or fraud label)."""
        return self._entry_count

    def transform_transactions(
        self,
        event_time_ms: np.ndarray,
        customer_id: np.ndarray,
        terminal_id: np.ndarray,
        amount: np.ndarray,
    ) -> np.ndarray:
        """Add transactions to the state in stream order and return their features.

        The four arrays have one item per transaction, in stream order. Row ``i`` of the
        float32 result of shape ``(n, len(feature_names))`` is computed as of transaction
        ``i``: it includes rows before it in the same call, not rows after it. The input
        arrays are not modified.

        Raises:
            FeatureInputError: the arrays differ in length, are not one-dimensional, have a
                non-integer time or id, or a non-finite amount.
        """
        times = _as_int64("event_time_ms", event_time_ms)
        customers = _as_int64("customer_id", customer_id)
        terminals = _as_int64("terminal_id", terminal_id)
        amounts = _as_finite_float64("amount", amount)
        _raise_if_lengths_differ(
            event_time_ms=times, customer_id=customers, terminal_id=terminals, amount=amounts
        )

        times_list = times.tolist()
        counts, sums = self._update_customers(times_list, customers.tolist(), amounts.tolist())
        terminal_counts, fraud_counts = self._update_terminals(times_list, terminals.tolist())
        self._entry_count += 2 * len(times_list)
        return self._assemble(times, amounts, counts, sums, terminal_counts, fraud_counts)

    def peek_transaction(
        self, event_time_ms: int, customer_id: int, terminal_id: int, amount: float
    ) -> np.ndarray:
        """Compute the features of one transaction as if it came next, without adding it to the state.

        The float32 result of shape ``(1, len(feature_names))`` equals the row that
        :meth:`transform_transactions` would return for this transaction now, but the state
        stays as it was, so a transaction that is only looked at (for example an HTTP
        scoring request) never counts in the windows of later ones.

        Raises:
            FeatureInputError: the time or an id is not an integer, or the amount is not finite.
        """
        times = _as_int64("event_time_ms", np.asarray([event_time_ms]))
        customers = _as_int64("customer_id", np.asarray([customer_id]))
        terminals = _as_int64("terminal_id", np.asarray([terminal_id]))
        amounts = _as_finite_float64("amount", np.asarray([amount]))
        time_ms = int(times[0])
        counts, sums = self._peek_customer(time_ms, int(customers[0]), float(amounts[0]))
        terminal_counts, fraud_counts = self._peek_terminal(time_ms, int(terminals[0]))
        return self._assemble(times, amounts, counts, sums, terminal_counts, fraud_counts)

    def _peek_customer(self, time: int, customer: int, amount: float) -> tuple[list[int], list[float]]:
        # The same arithmetic, in the same order, as _update_customers after inserting the
        # transaction behind the entries of equal time, so the float sums match exactly.
        entry = self._customers.get(customer)
        if entry is None:
            return [1] * len(self.customer_windows_ms), [amount] * len(self.customer_windows_ms)
        entry_times, entry_sums = entry
        end = bisect_right(entry_times, time)
        total = entry_sums[end] + amount
        counts, sums = [], []
        for window in self.customer_windows_ms:
            start = bisect_right(entry_times, time - window, 0, end)
            counts.append(end - start + 1)
            sums.append(total - entry_sums[start])
        return counts, sums

    def _peek_terminal(self, time: int, terminal: int) -> tuple[list[int], list[int]]:
        windows = self.terminal_windows_ms
        window_end = time - self.terminal_delay_ms
        counts = _window_counts(self._terminal_times.get(terminal, array("q")), window_end, windows)
        if self.terminal_delay_ms == 0:
            # Without a delay the window (t - w, t] contains the transaction itself.
            counts = [count + 1 for count in counts]
        fraud_counts = _window_counts(self._terminal_frauds.get(terminal, array("q")), window_end, windows)
        return counts, fraud_counts

    def observe_labels(
        self, transaction_time_ms: np.ndarray, terminal_id: np.ndarray, label: np.ndarray
    ) -> None:
        """Record fraud labels of earlier transactions, given each transaction's time and terminal.

        ``label`` is 1 for fraud and 0 for genuine. Only frauds change the state.

        Raises:
            FeatureInputError: the arrays differ in length, are not one-dimensional or
                integer, or a label is not 0 or 1.
        """
        times = _as_int64("transaction_time_ms", transaction_time_ms)
        terminals = _as_int64("terminal_id", terminal_id)
        labels = _as_int64("label", label)
        _raise_if_lengths_differ(transaction_time_ms=times, terminal_id=terminals, label=labels)
        invalid = (labels != 0) & (labels != 1)
        if invalid.any():
            raise FeatureInputError(
                f"label must be 0 or 1, got {labels[invalid][0]} at index "
                f"{int(np.flatnonzero(invalid)[0])}; pass 1 for fraud and 0 for genuine"
            )

        is_fraud = labels == 1
        frauds = self._terminal_frauds
        for time, terminal in zip(times[is_fraud].tolist(), terminals[is_fraud].tolist()):
            fraud_times = frauds.get(terminal)
            if fraud_times is None:
                frauds[terminal] = array("q", (time,))
            elif time >= fraud_times[-1]:
                fraud_times.append(time)
            else:
                insort_right(fraud_times, time)
        self._entry_count += int(is_fraud.sum())

    def prune(self, watermark_ms: int) -> None:
        """Drop the entries that no window of a transaction at or after ``watermark_ms`` reaches.

        Customer entries at or before ``watermark_ms - max(customer window)`` and terminal
        entries at or before ``watermark_ms - delay - max(terminal window)`` go, and so do
        keys left empty. Features of transactions with event time at or after the watermark
        stay the same. The one exception is float64 rounding: a customer's running amount
        sums are shifted back to 0 once they exceed 2**32. A late transaction before the
        watermark may miss dropped entries. The cost is linear in the number of keys
        (milliseconds for 15,000 keys), so call it from time to time, not per batch.
        """
        watermark = int(watermark_ms)
        customer_horizon = watermark - max(self.customer_windows_ms)
        terminal_horizon = watermark - self.terminal_delay_ms - max(self.terminal_windows_ms)
        entries_before = self._entry_count
        self._entry_count -= _prune_customers(self._customers, customer_horizon)
        self._entry_count -= _prune_times(self._terminal_times, terminal_horizon)
        self._entry_count -= _prune_times(self._terminal_frauds, terminal_horizon)
        logger.debug(
            "pruned feature state watermark_ms=%s dropped_entries=%s entries=%s keys=%s",
            watermark,
            entries_before - self._entry_count,
            self._entry_count,
            self.num_keys,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return the state as flat numeric arrays, for ``np.savez`` and ``allow_pickle=False``.

        For each table, ``*_keys`` lists the keys, ``*_lengths`` the number of entries
        of each key, and ``*_times`` (and ``customer_sums``, one more item per key) the
        per-key arrays concatenated in the order of ``*_keys``.
        """
        customer_keys = list(self._customers)
        customer_times = [self._customers[key][0] for key in customer_keys]
        customer_sums = [self._customers[key][1] for key in customer_keys]
        state = {
            "format_version": np.array([STATE_FORMAT_VERSION], dtype=np.int64),
            "customer_windows_ms": np.array(self.customer_windows_ms, dtype=np.int64),
            "terminal_windows_ms": np.array(self.terminal_windows_ms, dtype=np.int64),
            "terminal_delay_ms": np.array([self.terminal_delay_ms], dtype=np.int64),
            "customer_keys": np.array(customer_keys, dtype=np.int64),
            "customer_lengths": _lengths(customer_times),
            "customer_times": _concatenate(customer_times, np.int64),
            "customer_sums": _concatenate(customer_sums, np.float64),
        }
        for prefix, table in (("terminal", self._terminal_times), ("fraud", self._terminal_frauds)):
            keys = list(table)
            values = [table[key] for key in keys]
            state[f"{prefix}_keys"] = np.array(keys, dtype=np.int64)
            state[f"{prefix}_lengths"] = _lengths(values)
            state[f"{prefix}_times"] = _concatenate(values, np.int64)
        return state

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, np.ndarray],
        *,
        customer_windows_days: Sequence[float] = (1, 7, 30),
        terminal_windows_days: Sequence[float] = (1, 7, 30),
        terminal_delay_days: float = 7.0,
    ) -> FeatureState:
        """Rebuild a state from :meth:`state_dict` output, with the same keyword arguments.

        Raises:
            CheckpointError: an array is missing or inconsistent, or the state was saved
                with other windows or another delay.
        """
        restored = cls(
            customer_windows_days=customer_windows_days,
            terminal_windows_days=terminal_windows_days,
            terminal_delay_days=terminal_delay_days,
        )
        _raise_if_config_differs(restored, state)

        keys, lengths = _read_keys_and_lengths(state, "customer")
        times = _read_times(state, "customer", lengths)
        sums = _split(
            _read_array(state, "customer_sums", np.float64), lengths + 1, "d", "customer_sums"
        )
        restored._customers = dict(zip(keys.tolist(), zip(times, sums)))
        restored._terminal_times = _read_time_table(state, "terminal")
        restored._terminal_frauds = _read_time_table(state, "fraud")
        restored._entry_count = (
            int(lengths.sum())
            + len(_read_array(state, "terminal_times", np.int64))
            + len(_read_array(state, "fraud_times", np.int64))
        )
        return restored

    def _update_customers(
        self, times: list[int], customers: list[int], amounts: list[float]
    ) -> tuple[list[int], list[float]]:
        # Hot loop. Per transaction: one dict lookup, one append, and one bisect per window.
        # Returns window counts and amount sums, row-major with one column per window.
        windows = self.customer_windows_ms
        table = self._customers
        counts: list[int] = []
        sums: list[float] = []
        add_count = counts.append
        add_sum = sums.append
        for time, customer, amount in zip(times, customers, amounts):
            entry = table.get(customer)
            if entry is None:
                table[customer] = (array("q", (time,)), array("d", (0.0, amount)))
                for _ in windows:
                    add_count(1)
                    add_sum(amount)
                continue
            entry_times, entry_sums = entry
            if time >= entry_times[-1]:
                entry_times.append(time)
                entry_sums.append(entry_sums[-1] + amount)
                end = len(entry_times)
            else:
                end = _insert_late_customer_entry(entry_times, entry_sums, time, amount)
            total = entry_sums[end]
            start = end
            # Windows are increasing, so each start lies at or before the previous one.
            for window in windows:
                start = bisect_right(entry_times, time - window, 0, start)
                add_count(end - start)
                add_sum(total - entry_sums[start])
        return counts, sums

    def _update_terminals(
        self, times: list[int], terminals: list[int]
    ) -> tuple[list[int], list[int]]:
        # Returns transaction counts and fraud counts per terminal window, row-major.
        windows = self.terminal_windows_ms
        delay = self.terminal_delay_ms
        table = self._terminal_times
        frauds = self._terminal_frauds
        no_frauds = [0] * len(windows)
        counts: list[int] = []
        fraud_counts: list[int] = []
        add_count = counts.append
        add_fraud_counts = fraud_counts.extend
        for time, terminal in zip(times, terminals):
            terminal_times = table.get(terminal)
            if terminal_times is None:
                table[terminal] = terminal_times = array("q", (time,))
            elif time >= terminal_times[-1]:
                terminal_times.append(time)
            else:
                insort_right(terminal_times, time)

            # Same search as _window_counts, written out because this loop is the hot path.
            window_end = time - delay
            end = bisect_right(terminal_times, window_end)
            start = end
            for window in windows:
                start = bisect_right(terminal_times, window_end - window, 0, start)
                add_count(end - start)

            fraud_times = frauds.get(terminal)
            if fraud_times is None:
                add_fraud_counts(no_frauds)
            else:
                add_fraud_counts(_window_counts(fraud_times, window_end, windows))
        return counts, fraud_counts

    def _assemble(
        self,
        times: np.ndarray,
        amounts: np.ndarray,
        counts: list[int],
        sums: list[float],
        terminal_counts: list[int],
        fraud_counts: list[int],
    ) -> np.ndarray:
        rows = len(times)
        customer_columns = len(self.customer_windows_ms)
        terminal_columns = len(self.terminal_windows_ms)
        features = np.empty((rows, len(self.feature_names)), dtype=np.float32)
        features[:, 0] = amounts
        features[:, 1], features[:, 2] = _calendar_flags(times)

        customer_counts = np.array(counts, dtype=np.float64).reshape(rows, customer_columns)
        customer_sums = np.array(sums, dtype=np.float64).reshape(rows, customer_columns)
        customer_end = 3 + 2 * customer_columns
        features[:, 3:customer_end:2] = customer_counts
        # Counts are at least 1 because the current transaction is in every window.
        features[:, 4:customer_end:2] = customer_sums / customer_counts

        window_counts = np.array(terminal_counts, dtype=np.float64).reshape(rows, terminal_columns)
        window_frauds = np.array(fraud_counts, dtype=np.float64).reshape(rows, terminal_columns)
        rates = np.zeros_like(window_counts)
        np.divide(window_frauds, window_counts, out=rates, where=window_counts > 0)
        features[:, customer_end::2] = window_counts
        features[:, customer_end + 1 :: 2] = rates
        return features


def _window_counts(sorted_times: array, window_end: int, windows: tuple[int, ...]) -> list[int]:
    """Count the times in (window_end - w, window_end] for each increasing window w."""
    end = bisect_right(sorted_times, window_end)
    start = end
    counts = []
    for window in windows:
        start = bisect_right(sorted_times, window_end - window, 0, start)
        counts.append(end - start)
    return counts


def _insert_late_customer_entry(times: array, sums: array, time: int, amount: float) -> int:
    """Insert an entry older than the customer's newest one and return the end of its window.

    Entries with the same time stay in stream order, so the new one goes after them. The
    running sums after it all grow by ``amount``, which costs a pass over the newer entries.
    """
    position = bisect_right(times, time)
    times.insert(position, time)
    sums.insert(position + 1, sums[position] + amount)
    for index in range(position + 2, len(sums)):
        sums[index] += amount
    return position + 1


def _prune_customers(table: dict[int, tuple[array, array]], horizon_ms: int) -> int:
    dropped = 0
    emptied = []
    rebased = []
    for key, (times, sums) in table.items():
        if times[0] > horizon_ms:
            continue
        count = bisect_right(times, horizon_ms)
        dropped += count
        if count == len(times):
            emptied.append(key)
            continue
        del times[:count]
        del sums[:count]
        if abs(sums[0]) > _CUMSUM_REBASE_LIMIT:
            rebased.append(key)
    for key in emptied:
        del table[key]
    for key in rebased:
        times, sums = table[key]
        base = sums[0]
        table[key] = (times, array("d", [value - base for value in sums]))
    return dropped


def _prune_times(table: dict[int, array], horizon_ms: int) -> int:
    dropped = 0
    emptied = []
    for key, times in table.items():
        if times[0] > horizon_ms:
            continue
        count = bisect_right(times, horizon_ms)
        dropped += count
        if count == len(times):
            emptied.append(key)
        else:
            del times[:count]
    for key in emptied:
        del table[key]
    return dropped


def _calendar_flags(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the weekend (Saturday or Sunday) and night (hour <= 6) flags, both in UTC."""
    days, time_of_day = np.divmod(times, DAY_MS)
    weekday = (days + _EPOCH_WEEKDAY) % 7
    is_weekend = weekday >= 5
    is_night = time_of_day // HOUR_MS <= _LAST_NIGHT_HOUR
    return is_weekend, is_night


def _feature_names(
    customer_windows_days: Sequence[float], terminal_windows_days: Sequence[float]
) -> tuple[str, ...]:
    names = ["amount", "is_weekend", "is_night"]
    for days in customer_windows_days:
        names += [f"customer_count_{days:g}d", f"customer_mean_amount_{days:g}d"]
    for days in terminal_windows_days:
        names += [f"terminal_count_{days:g}d", f"terminal_fraud_rate_{days:g}d"]
    return tuple(names)


def _windows_to_ms(name: str, windows_days: Sequence[float]) -> tuple[int, ...]:
    windows = tuple(_days_to_ms(name, days) for days in windows_days)
    if not windows or any(ms <= 0 for ms in windows):
        raise ConfigurationError(
            f"{name} must list at least one positive window in days, got {tuple(windows_days)!r}"
        )
    if any(later <= earlier for earlier, later in zip(windows, windows[1:])):
        raise ConfigurationError(
            f"{name} must be strictly increasing, got {tuple(windows_days)!r}; sort them"
        )
    return windows


def _delay_to_ms(delay_days: float) -> int:
    delay = _days_to_ms("terminal_delay_days", delay_days)
    if delay < 0:
        raise ConfigurationError(f"terminal_delay_days must be 0 or more days, got {delay_days!r}")
    return delay


def _days_to_ms(name: str, days: float) -> int:
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not math.isfinite(days):
        raise ConfigurationError(f"{name} must contain finite numbers of days, got {days!r}")
    return round(days * DAY_MS)


def _as_int64(name: str, values: np.ndarray) -> np.ndarray:
    array_ = np.asarray(values)
    if array_.ndim != 1:
        raise FeatureInputError(f"{name} must be a one-dimensional array, got shape {array_.shape}")
    if array_.dtype.kind not in "iu":
        raise FeatureInputError(f"{name} must have an integer dtype, got {array_.dtype}")
    if array_.dtype == np.uint64 and array_.size and array_.max() > np.iinfo(np.int64).max:
        raise FeatureInputError(f"{name} has a value above the int64 maximum: {array_.max()}")
    return array_.astype(np.int64, copy=False)


def _as_finite_float64(name: str, values: np.ndarray) -> np.ndarray:
    array_ = np.asarray(values)
    if array_.ndim != 1:
        raise FeatureInputError(f"{name} must be a one-dimensional array, got shape {array_.shape}")
    if array_.dtype.kind not in "iuf":
        raise FeatureInputError(f"{name} must have a numeric dtype, got {array_.dtype}")
    array_ = array_.astype(np.float64, copy=False)
    finite = np.isfinite(array_)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise FeatureInputError(f"{name} must be finite, got {array_[index]} at index {index}")
    return array_


def _raise_if_lengths_differ(**arrays: np.ndarray) -> None:
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise FeatureInputError(f"arrays must have equal lengths, got {lengths}")


def _lengths(arrays: list[array]) -> np.ndarray:
    return np.array([len(values) for values in arrays], dtype=np.int64)


def _concatenate(arrays: list[array], dtype: type) -> np.ndarray:
    return np.frombuffer(b"".join(arrays), dtype=dtype).copy()


def _raise_if_config_differs(restored: FeatureState, state: dict[str, np.ndarray]) -> None:
    version = _read_array(state, "format_version", np.int64)
    if version.tolist() != [STATE_FORMAT_VERSION]:
        raise CheckpointError(
            f"feature state has format version {version.tolist()}, expected "
            f"[{STATE_FORMAT_VERSION}]; rebuild the state by replaying the stream"
        )
    expected = {
        "customer_windows_ms": list(restored.customer_windows_ms),
        "terminal_windows_ms": list(restored.terminal_windows_ms),
        "terminal_delay_ms": [restored.terminal_delay_ms],
    }
    for name, values in expected.items():
        saved = _read_array(state, name, np.int64).tolist()
        if saved != values:
            raise CheckpointError(
                f"feature state was saved with {name}={saved}, but this run uses {values}; "
                "restore with the same windows and delay, or rebuild the state by replaying"
            )


def _read_array(state: dict[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
    if name not in state:
        raise CheckpointError(f"feature state is missing the array {name!r}")
    values = np.asarray(state[name])
    if values.ndim != 1 or values.dtype != dtype:
        raise CheckpointError(
            f"feature state array {name!r} must be one-dimensional {np.dtype(dtype)}, "
            f"got shape {values.shape} and dtype {values.dtype}"
        )
    return values


def _read_keys_and_lengths(
    state: dict[str, np.ndarray], prefix: str
) -> tuple[np.ndarray, np.ndarray]:
    keys = _read_array(state, f"{prefix}_keys", np.int64)
    if len(np.unique(keys)) != len(keys):
        raise CheckpointError(f"feature state array '{prefix}_keys' contains duplicate keys")
    lengths = _read_array(state, f"{prefix}_lengths", np.int64)
    if len(lengths) != len(keys) or (lengths <= 0).any():
        raise CheckpointError(
            f"feature state array '{prefix}_lengths' must contain one positive length per key "
            f"({len(keys)} keys), got {len(lengths)} values"
        )
    return keys, lengths


def _read_times(state: dict[str, np.ndarray], prefix: str, lengths: np.ndarray) -> list[array]:
    name = f"{prefix}_times"
    times = _read_array(state, name, np.int64)
    per_key = _split(times, lengths, "q", name)
    decreasing = np.diff(times) < 0
    # A decrease where the next key's entries begin is allowed.
    decreasing[np.cumsum(lengths)[:-1] - 1] = False
    if decreasing.any():
        raise CheckpointError(f"feature state array {name!r} is not sorted within each key")
    return per_key


def _split(values: np.ndarray, lengths: np.ndarray, typecode: str, name: str) -> list[array]:
    if len(values) != int(lengths.sum()):
        raise CheckpointError(
            f"feature state array {name!r} has {len(values)} values, but its lengths add "
            f"up to {int(lengths.sum())}"
        )
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return [array(typecode, values[start:end].tobytes()) for start, end in zip(starts, ends)]


def _read_time_table(state: dict[str, np.ndarray], prefix: str) -> dict[int, array]:
    keys, lengths = _read_keys_and_lengths(state, prefix)
    return dict(zip(keys.tolist(), _read_times(state, prefix, lengths)))
