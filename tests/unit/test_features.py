"""Tests of streamer.features: window semantics, state round trip, pruning, input checks.

The reference for every feature is a brute-force recount with plain numpy over all rows
seen so far, on real handbook transactions and on random out-of-order streams.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from streamer.errors import CheckpointError, ConfigurationError
from streamer.features import DAY_MS, FEATURE_NAMES, FeatureInputError, FeatureState

# Test folders are not packages, so the shared helper module is imported from its folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers  # noqa: E402

HOUR_MS = 3_600_000
DELAY_MS = 7 * DAY_MS
# 2018-04-02 00:00:00 UTC, a Monday.
MONDAY_MS = 1_522_627_200_000
COLUMN = {name: index for index, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def handbook() -> helpers.HandbookTransactions:
    # 40 days: from 2018-04-01 to 2018-05-10 included, about 384,000 transactions.
    return helpers.read_handbook_transactions(("2018-04", "2018-05"), "2018-05-11")


@dataclass
class Chunk:
    """Rows of the handbook data whose labels, then transactions, form one stream chunk."""

    label_rows: np.ndarray
    transaction_rows: np.ndarray


def cut_stream(data: helpers.HandbookTransactions, chunk_events: int) -> list[Chunk]:
    """Replay transactions with each label arriving 7 days later, in chunks of events.

    At equal times labels come before transactions, and transactions keep file order.
    """
    count = len(data)
    arrival = np.concatenate([data.event_time_ms + DELAY_MS, data.event_time_ms])
    kinds = np.concatenate([np.zeros(count, np.int8), np.ones(count, np.int8)])
    order = np.lexsort((np.tile(np.arange(count), 2), kinds, arrival))
    chunks = []
    for start in range(0, len(order), chunk_events):
        events = order[start : start + chunk_events]
        chunks.append(Chunk(events[events < count], events[events >= count] - count))
    return chunks


def apply_chunks(
    state: FeatureState,
    data: helpers.HandbookTransactions,
    chunks: list[Chunk],
    features: np.ndarray,
    prune_every: int = 0,
) -> None:
    """Apply each chunk's labels, then its transactions, writing rows of ``features``."""
    for number, chunk in enumerate(chunks):
        labels = chunk.label_rows
        state.observe_labels(
            data.event_time_ms[labels], data.terminal_id[labels], data.fraud[labels]
        )
        rows = chunk.transaction_rows
        if len(rows) == 0:
            continue
        features[rows] = state.transform_transactions(
            data.event_time_ms[rows],
            data.customer_id[rows],
            data.terminal_id[rows],
            data.amount[rows],
        )
        if prune_every and number % prune_every == 0:
            # Data is sorted by time, so no later transaction is older than this one.
            state.prune(int(data.event_time_ms[rows[-1]]))


def replay(
    data: helpers.HandbookTransactions,
    chunk_events: int = 300,
    prune_every: int = 0,
    **state_options: object,
) -> tuple[np.ndarray, FeatureState]:
    state = FeatureState(**state_options)
    features = np.full((len(data), len(state.feature_names)), np.nan, dtype=np.float32)
    apply_chunks(state, data, cut_stream(data, chunk_events), features, prune_every)
    return features, state


def calendar_flags(time_ms: int) -> tuple[float, float]:
    moment = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return float(moment.weekday() >= 5), float(moment.hour <= 6)


def recount_handbook(data: helpers.HandbookTransactions, rows: np.ndarray) -> np.ndarray:
    """Recount the features of ``rows`` from all earlier rows, as the handbook defines them.

    Every label of a transaction in a terminal window arrived by the time of the query,
    because the window ends 7 days (the label delay) before it.
    """
    by_customer = KeyIndex(data.customer_id)
    by_terminal = KeyIndex(data.terminal_id)
    expected = np.zeros((len(rows), len(FEATURE_NAMES)), dtype=np.float64)
    for out, row in enumerate(rows.tolist()):
        time = int(data.event_time_ms[row])
        expected[out, 0] = data.amount[row]
        expected[out, 1], expected[out, 2] = calendar_flags(time)

        seen = by_customer.rows_until(data.customer_id[row], row)
        seen_times = data.event_time_ms[seen]
        for column, days in ((3, 1), (5, 7), (7, 30)):
            inside = (seen_times > time - days * DAY_MS) & (seen_times <= time)
            expected[out, column] = inside.sum()
            expected[out, column + 1] = data.amount[seen][inside].mean()

        seen = by_terminal.rows_until(data.terminal_id[row], row)
        seen_times = data.event_time_ms[seen]
        for column, days in ((9, 1), (11, 7), (13, 30)):
            inside = (seen_times > time - DELAY_MS - days * DAY_MS) & (
                seen_times <= time - DELAY_MS
            )
            count = inside.sum()
            expected[out, column] = count
            expected[out, column + 1] = data.fraud[seen][inside].sum() / count if count else 0.0
    return expected


class KeyIndex:
    """Rows grouped by key, each group in file (stream) order."""

    def __init__(self, keys: np.ndarray) -> None:
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def rows_until(self, key: int, last_row: int) -> np.ndarray:
        """Return the rows with this key up to and including ``last_row``."""
        start = int(np.searchsorted(self.sorted_keys, key, side="left"))
        end = int(np.searchsorted(self.sorted_keys, key, side="right"))
        rows = self.order[start:end]
        return rows[rows <= last_row]


def transform(state: FeatureState, rows: list[tuple[int, int, int, float]]) -> np.ndarray:
    """Transform (time, customer, terminal, amount) tuples as one call."""
    times, customers, terminals, amounts = zip(*rows)
    return state.transform_transactions(
        np.array(times, dtype=np.int64),
        np.array(customers, dtype=np.int64),
        np.array(terminals, dtype=np.int64),
        np.array(amounts, dtype=np.float64),
    )


def test_features_match_recount_on_handbook_data(handbook):
    features, _ = replay(handbook, chunk_events=300, prune_every=100)
    # Days 38 to 40: every 30-day window plus the 7-day delay lies inside the data.
    late_rows = np.flatnonzero(handbook.event_time_ms >= handbook.event_time_ms[0] + 37 * DAY_MS)
    sample = np.sort(np.random.default_rng(7).choice(late_rows, size=3000, replace=False))

    expected = recount_handbook(handbook, sample)

    assert len(late_rows) > 20_000
    assert expected[:, COLUMN["terminal_fraud_rate_30d"]].max() > 0
    for name, column in COLUMN.items():
        np.testing.assert_allclose(
            features[sample, column], expected[:, column], rtol=1e-6, atol=0, err_msg=name
        )


def test_features_match_recount_out_of_order():
    for seed in range(6):
        run = run_random_stream(seed)

        assert run.late_transactions > 0, f"seed={seed}"
        assert run.frauds > 0, f"seed={seed}"
        for column, name in enumerate(run.feature_names):
            np.testing.assert_allclose(
                run.actual[:, column],
                run.expected[:, column],
                rtol=1e-6,
                atol=1e-9,
                err_msg=f"seed={seed} feature={name}",
            )


@dataclass
class RandomRun:
    """Features of a random stream from FeatureState and from the brute-force recount."""

    actual: np.ndarray
    expected: np.ndarray
    feature_names: tuple[str, ...]
    late_transactions: int  # older than a transaction before them in the stream
    frauds: int


def run_random_stream(seed: int) -> RandomRun:
    """Feed a random stream with late events, ties and 64-bit keys; recount it by brute force.

    Times sit on a one-hour grid, so many fall exactly on window boundaries. Windows are
    0.5 and 2 days per customer, 1 and 3 days per terminal after a 1-day delay.
    """
    rng = np.random.default_rng(seed)
    customer_keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=4)
    terminal_keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=3)
    state = FeatureState(
        customer_windows_days=(0.5, 2), terminal_windows_days=(1, 3), terminal_delay_days=1
    )
    customer_windows = (DAY_MS // 2, 2 * DAY_MS)
    terminal_windows = (DAY_MS, 3 * DAY_MS)

    applied: list[tuple[int, int, int, float]] = []
    frauds: list[tuple[int, int]] = []
    unlabelled: list[int] = []
    actual_rows, expected_rows = [], []
    clock = MONDAY_MS
    for _ in range(40):
        label_picks = [index for index in unlabelled if rng.random() < 0.3]
        unlabelled = [index for index in unlabelled if index not in label_picks]
        labels = [int(rng.random() < 0.5) for _ in label_picks]
        state.observe_labels(
            np.array([applied[index][0] for index in label_picks], dtype=np.int64),
            np.array([applied[index][2] for index in label_picks], dtype=np.int64),
            np.array(labels, dtype=np.int64),
        )
        frauds += [
            (applied[index][0], applied[index][2])
            for index, label in zip(label_picks, labels)
            if label
        ]

        batch = []
        for _ in range(int(rng.integers(1, 15))):
            clock += int(rng.integers(0, 3)) * HOUR_MS
            lateness = int(rng.integers(0, 60)) * HOUR_MS if rng.random() < 0.25 else 0
            batch.append(
                (
                    clock - lateness,
                    int(rng.choice(customer_keys)),
                    int(rng.choice(terminal_keys)),
                    float(np.round(rng.uniform(1, 300), 2)),
                )
            )
        actual_rows.append(transform(state, batch))
        for row in batch:
            unlabelled.append(len(applied))
            applied.append(row)
            expected_rows.append(
                recount_seen(applied, frauds, customer_windows, terminal_windows, DAY_MS)
            )
    times = np.array([row[0] for row in applied])
    return RandomRun(
        actual=np.concatenate(actual_rows),
        expected=np.array(expected_rows),
        feature_names=state.feature_names,
        late_transactions=int((times < np.maximum.accumulate(times)).sum()),
        frauds=len(frauds),
    )


def recount_seen(
    applied: list[tuple[int, int, int, float]],
    frauds: list[tuple[int, int]],
    customer_windows: tuple[int, ...],
    terminal_windows: tuple[int, ...],
    delay: int,
) -> list[float]:
    """Recount the features of the last applied transaction from everything seen so far."""
    time, customer, terminal, amount = applied[-1]
    times = np.array([row[0] for row in applied], dtype=np.int64)
    customers = np.array([row[1] for row in applied], dtype=np.int64)
    terminals = np.array([row[2] for row in applied], dtype=np.int64)
    amounts = np.array([row[3] for row in applied], dtype=np.float64)
    fraud_times = np.array([row[0] for row in frauds], dtype=np.int64)
    fraud_terminals = np.array([row[1] for row in frauds], dtype=np.int64)

    values = [amount, *calendar_flags(time)]
    for window in customer_windows:
        inside = (customers == customer) & (times > time - window) & (times <= time)
        values += [inside.sum(), amounts[inside].mean()]
    for window in terminal_windows:
        low, high = time - delay - window, time - delay
        count = ((terminals == terminal) & (times > low) & (times <= high)).sum()
        fraud_count = (
            (fraud_terminals == terminal) & (fraud_times > low) & (fraud_times <= high)
        ).sum()
        values += [count, fraud_count / count if count else 0.0]
    return values


def test_feature_names_default_order():
    assert FeatureState().feature_names == FEATURE_NAMES
    assert len(FEATURE_NAMES) == 15
    assert FEATURE_NAMES[3:5] == ("customer_count_1d", "customer_mean_amount_1d")
    assert FEATURE_NAMES[-1] == "terminal_fraud_rate_30d"


def test_customer_window_ties_in_one_call():
    features = transform(
        FeatureState(), [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS, 1, 9, 20.0), (MONDAY_MS, 1, 9, 60.0)]
    )

    assert features[:, COLUMN["customer_count_1d"]].tolist() == [1, 2, 3]
    assert features[:, COLUMN["customer_mean_amount_1d"]].tolist() == [10, 15, 30]


def test_customer_window_ties_across_calls():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0)])

    features = transform(state, [(MONDAY_MS, 1, 9, 30.0)])

    assert features[0, COLUMN["customer_count_1d"]] == 2
    assert features[0, COLUMN["customer_mean_amount_1d"]] == 20


def test_customer_window_excludes_lower_boundary():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0)])

    features = transform(state, [(MONDAY_MS + DAY_MS, 1, 9, 30.0)])

    assert features[0, COLUMN["customer_count_1d"]] == 1
    assert features[0, COLUMN["customer_mean_amount_1d"]] == 30
    assert features[0, COLUMN["customer_count_7d"]] == 2


def test_customer_window_includes_one_ms_inside():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0)])

    features = transform(state, [(MONDAY_MS + DAY_MS - 1, 1, 9, 30.0)])

    assert features[0, COLUMN["customer_count_1d"]] == 2


def test_customer_window_late_transaction_ignores_newer_ones():
    state = FeatureState()
    transform(state, [(MONDAY_MS + 5 * HOUR_MS, 1, 9, 100.0)])

    features = transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + 6 * HOUR_MS, 1, 9, 40.0)])

    assert features[:, COLUMN["customer_count_1d"]].tolist() == [1, 3]
    assert features[:, COLUMN["customer_mean_amount_1d"]].tolist() == [10, 50]


@pytest.mark.parametrize(
    ("offset_ms", "expected_1d", "expected_7d"),
    [
        (DELAY_MS - 1, 0, 0),  # the window ends just before the first transaction
        (DELAY_MS, 1, 1),  # the window end t - d is included
        (DELAY_MS + DAY_MS - 1, 1, 1),
        (DELAY_MS + DAY_MS, 0, 1),  # the window start t - d - w is excluded
    ],
)
def test_terminal_window_boundaries(offset_ms, expected_1d, expected_7d):
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0)])

    features = transform(state, [(MONDAY_MS + offset_ms, 2, 9, 10.0)])

    assert features[0, COLUMN["terminal_count_1d"]] == expected_1d
    assert features[0, COLUMN["terminal_count_7d"]] == expected_7d


def test_terminal_empty_window_rate_is_zero():
    features = transform(FeatureState(), [(MONDAY_MS, 1, 9, 10.0)])

    for days in (1, 7, 30):
        assert features[0, COLUMN[f"terminal_count_{days}d"]] == 0
        assert features[0, COLUMN[f"terminal_fraud_rate_{days}d"]] == 0


def test_terminal_fraud_rate_uses_observed_labels():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + HOUR_MS, 2, 9, 10.0)])
    query = [(MONDAY_MS + DELAY_MS + 2 * HOUR_MS, 3, 9, 10.0)]
    before_label = transform(state, query)

    state.observe_labels(np.array([MONDAY_MS]), np.array([9]), np.array([1]))
    after_label = transform(state, query)

    assert before_label[0, COLUMN["terminal_fraud_rate_1d"]] == 0
    assert after_label[0, COLUMN["terminal_count_1d"]] == 2
    assert after_label[0, COLUMN["terminal_fraud_rate_1d"]] == 0.5


def test_terminal_fraud_rate_ignores_genuine_labels():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0)])
    state.observe_labels(np.array([MONDAY_MS]), np.array([9]), np.array([0]))

    features = transform(state, [(MONDAY_MS + DELAY_MS, 2, 9, 10.0)])

    assert features[0, COLUMN["terminal_fraud_rate_1d"]] == 0
    assert state.num_entries == 4  # two transactions, each in the customer and terminal tables


@pytest.mark.parametrize(
    ("moment", "is_weekend", "is_night"),
    [
        ("2018-04-06T00:00:00.000", 0, 1),  # Friday midnight
        ("2018-04-06T23:59:59.999", 0, 0),
        ("2018-04-07T06:59:59.999", 1, 1),  # Saturday, last night millisecond
        ("2018-04-07T07:00:00.000", 1, 0),
        ("2018-04-08T23:59:59.999", 1, 0),  # Sunday
        ("2018-04-09T00:00:00.000", 0, 1),  # Monday
        ("1969-12-28T03:00:00.000", 1, 1),  # Sunday before the epoch: negative times
    ],
)
def test_calendar_flags_on_known_dates(moment, is_weekend, is_night):
    time = int(np.datetime64(moment, "ms").astype(np.int64))

    features = transform(FeatureState(), [(time, 1, 9, 10.0)])

    assert features[0, COLUMN["is_weekend"]] == is_weekend
    assert features[0, COLUMN["is_night"]] == is_night


def test_state_dict_round_trip_continues_identically(handbook, tmp_path):
    data = _first_days(handbook, days=12)
    chunks = cut_stream(data, chunk_events=500)
    uninterrupted = np.full((len(data), len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    apply_chunks(FeatureState(), data, chunks, uninterrupted)

    resumed = np.full_like(uninterrupted, np.nan)
    first = FeatureState()
    half = len(chunks) // 2
    apply_chunks(first, data, chunks[:half], resumed)
    np.savez(tmp_path / "features.npz", **first.state_dict())
    with np.load(tmp_path / "features.npz", allow_pickle=False) as saved:
        second = FeatureState.from_state_dict(dict(saved))
    apply_chunks(second, data, chunks[half:], resumed)

    assert second.num_entries == first.num_entries + 2 * len(data) - 2 * _transactions_in(
        chunks[:half]
    ) + (_frauds_in(data, chunks[half:]))
    assert np.array_equal(resumed, uninterrupted)


def _transactions_in(chunks: list[Chunk]) -> int:
    return sum(len(chunk.transaction_rows) for chunk in chunks)


def _frauds_in(data: helpers.HandbookTransactions, chunks: list[Chunk]) -> int:
    return sum(int(data.fraud[chunk.label_rows].sum()) for chunk in chunks)


def _first_days(data: helpers.HandbookTransactions, days: int) -> helpers.HandbookTransactions:
    end = int(np.searchsorted(data.event_time_ms, data.event_time_ms[0] + days * DAY_MS))
    return helpers.HandbookTransactions(
        transaction_id=data.transaction_id[:end],
        event_time_ms=data.event_time_ms[:end],
        customer_id=data.customer_id[:end],
        terminal_id=data.terminal_id[:end],
        amount=data.amount[:end],
        fraud=data.fraud[:end],
    )


def test_state_dict_holds_numeric_arrays_only(handbook):
    _, state = replay(_first_days(handbook, days=2))

    arrays = state.state_dict()

    assert all(isinstance(values, np.ndarray) for values in arrays.values())
    assert {values.dtype.kind for values in arrays.values()} <= {"i", "f"}


def test_state_dict_of_empty_state_round_trips():
    restored = FeatureState.from_state_dict(FeatureState().state_dict())

    assert restored.num_keys == 0
    assert restored.num_entries == 0


def test_from_state_dict_rejects_other_windows():
    state = FeatureState().state_dict()

    with pytest.raises(CheckpointError, match="customer_windows_ms"):
        FeatureState.from_state_dict(state, customer_windows_days=(1, 7))


def test_from_state_dict_rejects_other_delay():
    state = FeatureState().state_dict()

    with pytest.raises(CheckpointError, match="terminal_delay_ms"):
        FeatureState.from_state_dict(state, terminal_delay_days=3)


def test_from_state_dict_rejects_missing_array():
    state = FeatureState().state_dict()
    del state["terminal_times"]

    with pytest.raises(CheckpointError, match="terminal_times"):
        FeatureState.from_state_dict(state)


def test_from_state_dict_rejects_inconsistent_lengths():
    original = FeatureState()
    transform(original, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS, 2, 9, 10.0)])
    state = original.state_dict()
    state["customer_times"] = state["customer_times"][:1]

    with pytest.raises(CheckpointError, match="customer_times"):
        FeatureState.from_state_dict(state)


def test_from_state_dict_rejects_unsorted_times():
    original = FeatureState()
    transform(
        original,
        [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + 1, 1, 8, 10.0), (MONDAY_MS - 5, 2, 8, 10.0)],
    )
    state = original.state_dict()
    assert state["customer_times"].tolist() == [MONDAY_MS, MONDAY_MS + 1, MONDAY_MS - 5]
    state["customer_times"] = state["customer_times"][[1, 0, 2]]

    with pytest.raises(CheckpointError, match="'customer_times' is not sorted"):
        FeatureState.from_state_dict(state)


def test_from_state_dict_accepts_decrease_between_keys():
    original = FeatureState()
    transform(original, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS - 5, 2, 8, 10.0)])

    restored = FeatureState.from_state_dict(original.state_dict())

    assert restored.num_entries == original.num_entries


def test_from_state_dict_rejects_duplicate_keys():
    original = FeatureState()
    transform(original, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS, 2, 8, 10.0)])
    state = original.state_dict()
    state["terminal_keys"] = np.array([9, 9], dtype=np.int64)

    with pytest.raises(CheckpointError, match="duplicate keys"):
        FeatureState.from_state_dict(state)


def test_prune_keeps_features_identical(handbook):
    # Short windows, so that 10 days of data reach far beyond what windows cover.
    data = _first_days(handbook, days=10)
    options = {
        "customer_windows_days": (0.5, 2),
        "terminal_windows_days": (1, 2),
        "terminal_delay_days": 1,
    }

    unpruned, unpruned_state = replay(data, chunk_events=400, **options)
    pruned, pruned_state = replay(data, chunk_events=400, prune_every=10, **options)

    assert np.array_equal(pruned, unpruned)
    assert pruned_state.num_entries < unpruned_state.num_entries


def test_prune_customer_horizon_is_exact():
    pruned, unpruned = FeatureState(), FeatureState()
    for state in (pruned, unpruned):
        transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + 1, 1, 9, 20.0)])
    watermark = MONDAY_MS + 30 * DAY_MS

    pruned.prune(watermark)
    query = [(watermark, 1, 8, 30.0)]

    assert pruned.num_entries == 3  # only the customer entry at MONDAY_MS goes
    assert np.array_equal(transform(pruned, query), transform(unpruned, query))


def test_prune_terminal_horizon_is_exact():
    pruned, unpruned = FeatureState(), FeatureState()
    for state in (pruned, unpruned):
        transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + 1, 2, 9, 20.0)])
        state.observe_labels(
            np.array([MONDAY_MS, MONDAY_MS + 1]), np.array([9, 9]), np.array([1, 1])
        )
    watermark = MONDAY_MS + DELAY_MS + 30 * DAY_MS

    pruned.prune(watermark)
    # Both customer entries go, and the terminal and fraud entries at MONDAY_MS.
    entries_after_prune = pruned.num_entries
    query = [(watermark, 3, 9, 30.0)]
    features = transform(pruned, query)

    assert entries_after_prune == 2
    assert features[0, COLUMN["terminal_fraud_rate_30d"]] == 1
    assert features[0, COLUMN["terminal_count_30d"]] == 1
    assert np.array_equal(features, transform(unpruned, query))


def test_prune_rebases_large_amount_sums():
    pruned, unpruned = FeatureState(), FeatureState()
    for state in (pruned, unpruned):
        transform(state, [(MONDAY_MS + day * DAY_MS, 1, 9, 3e9 + day) for day in range(4)])
    watermark = MONDAY_MS + 31 * DAY_MS

    # Drops days 0 and 1, so the kept running sums start above 2**32 and are shifted back.
    pruned.prune(watermark)
    kept_sums_start = pruned.state_dict()["customer_sums"][0]
    query = [(watermark, 1, 9, 5.0)]
    features = transform(pruned, query)

    expected_mean = (3e9 + 2 + 3e9 + 3 + 5.0) / 3
    assert kept_sums_start == 0
    assert features[0, COLUMN["customer_count_30d"]] == 3
    assert features[0, COLUMN["customer_mean_amount_30d"]] == np.float32(expected_mean)
    assert np.array_equal(features, transform(unpruned, query))


def test_prune_bounds_entries_to_reachable_ones():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + 40 * DAY_MS, 1, 8, 10.0)])
    state.observe_labels(np.array([MONDAY_MS]), np.array([9]), np.array([1]))

    state.prune(MONDAY_MS + 40 * DAY_MS)

    # Customer 1 keeps its newest entry; terminal 9 and its fraud are beyond 7 + 30 days.
    assert state.num_entries == 2
    assert state.num_keys == 2


def test_prune_far_ahead_empties_state():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS + HOUR_MS, 2, 8, 10.0)])

    state.prune(MONDAY_MS + 100 * DAY_MS)

    assert state.num_keys == 0
    assert state.num_entries == 0


def test_num_keys_and_entries_count_tables():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 9, 10.0), (MONDAY_MS, 1, 8, 10.0), (MONDAY_MS, 2, 9, 10.0)])
    state.observe_labels(np.array([MONDAY_MS]), np.array([9]), np.array([1]))

    assert state.num_keys == 5  # customers 1, 2; terminals 8, 9; frauds of terminal 9
    assert state.num_entries == 7


def test_transform_does_not_mutate_inputs(handbook):
    data = _first_days(handbook, days=1)
    inputs = [
        data.event_time_ms.copy(),
        data.customer_id.copy(),
        data.terminal_id.copy(),
        data.amount.copy(),
    ]
    originals = [values.copy() for values in inputs]

    FeatureState().transform_transactions(*inputs)

    for name, values, original in zip(
        ("time", "customer", "terminal", "amount"), inputs, originals
    ):
        assert np.array_equal(values, original), name


def test_observe_labels_does_not_mutate_inputs():
    inputs = [np.array([MONDAY_MS, MONDAY_MS - 5]), np.array([9, 9]), np.array([1, 1])]
    originals = [values.copy() for values in inputs]

    FeatureState().observe_labels(*inputs)

    for values, original in zip(inputs, originals):
        assert np.array_equal(values, original)


def test_transform_empty_batch():
    features = FeatureState().transform_transactions(
        np.array([], np.int64),
        np.array([], np.int64),
        np.array([], np.int64),
        np.array([], np.float64),
    )

    assert features.shape == (0, 15)
    assert features.dtype == np.float32


def test_transform_accepts_other_integer_dtypes():
    features = FeatureState().transform_transactions(
        np.array([MONDAY_MS], np.uint64),
        np.array([1], np.int32),
        np.array([9], np.uint16),
        np.array([5], np.int64),
    )

    assert features[0, COLUMN["amount"]] == 5


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (([MONDAY_MS, MONDAY_MS], [1], [9], [1.0]), "equal lengths"),
        (([float(MONDAY_MS)], [1], [9], [1.0]), "event_time_ms must have an integer dtype"),
        (([MONDAY_MS], [1.5], [9], [1.0]), "customer_id must have an integer dtype"),
        (([MONDAY_MS], [1], [9], [float("nan")]), "amount must be finite"),
        (([MONDAY_MS], [1], [9], [float("inf")]), "amount must be finite"),
        (([MONDAY_MS], [1], [9], ["1.0"]), "amount must have a numeric dtype"),
        (([[MONDAY_MS]], [[1]], [[9]], [[1.0]]), "one-dimensional"),
        (([MONDAY_MS], [1], [2**64 - 1], [1.0]), "int64 maximum"),
    ],
)
def test_transform_rejects_invalid_input(arrays, message):
    state = FeatureState()

    with pytest.raises(FeatureInputError, match=message):
        state.transform_transactions(*(np.array(values) for values in arrays))

    assert state.num_entries == 0


def test_observe_labels_rejects_non_binary_label():
    with pytest.raises(FeatureInputError, match="label must be 0 or 1, got 2"):
        FeatureState().observe_labels(
            np.array([MONDAY_MS, MONDAY_MS]), np.array([9, 9]), np.array([1, 2])
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"customer_windows_days": (7, 1)},
        {"customer_windows_days": (1, 1)},
        {"customer_windows_days": ()},
        {"terminal_windows_days": (0, 7)},
        {"terminal_windows_days": (float("nan"),)},
        {"terminal_delay_days": -1},
        {"terminal_delay_days": True},
    ],
)
def test_state_rejects_invalid_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        FeatureState(**kwargs)


# -- peek_transaction ------------------------------------------------------------------------


def _handbook_row(data: helpers.HandbookTransactions, row: int) -> tuple[int, int, int, float]:
    return (int(data.event_time_ms[row]), int(data.customer_id[row]), int(data.terminal_id[row]),
            float(data.amount[row]))


def _state_after_days(data: helpers.HandbookTransactions, days: int) -> tuple[FeatureState, int]:
    """A state that has seen the first ``days`` days (labels 7 days late); return it and the next row."""
    head = _first_days(data, days)
    _, state = replay(head, chunk_events=500)
    return state, len(head)


def test_peek_transaction_equals_transform_on_handbook(handbook):
    state, first = _state_after_days(handbook, days=10)
    mismatched = []
    # Each row is peeked, then added, so later rows meet customers and terminals seen before.
    for row in range(first, first + 2000):
        values = _handbook_row(handbook, row)
        peeked = state.peek_transaction(*values)
        added = transform(state, [values])
        if not np.array_equal(peeked, added):
            mismatched.append(row)
    assert mismatched == []


def test_peek_transaction_leaves_state_unchanged(handbook):
    state, first = _state_after_days(handbook, days=10)
    before = state.state_dict()
    entries = state.num_entries
    for row in range(first, first + 200):
        state.peek_transaction(*_handbook_row(handbook, row))
    after = state.state_dict()
    assert after.keys() == before.keys()
    assert [name for name in before if not np.array_equal(before[name], after[name])] == []
    assert state.num_entries == entries


def test_peek_transaction_late_event_equals_transform():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 10, 10.0), (MONDAY_MS + 2 * HOUR_MS, 1, 10, 20.0),
                      (MONDAY_MS + 5 * HOUR_MS, 1, 10, 40.0)])
    late = (MONDAY_MS + 2 * HOUR_MS, 1, 10, 5.0)  # ties with the second entry, older than the third
    peeked = state.peek_transaction(*late)
    assert np.array_equal(peeked, transform(state, [late]))


def test_peek_transaction_unknown_customer_and_terminal():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 10, 10.0)])
    peeked = state.peek_transaction(MONDAY_MS + HOUR_MS, 2, 20, 30.0)
    assert peeked[0, COLUMN["customer_count_30d"]] == 1
    assert peeked[0, COLUMN["customer_mean_amount_30d"]] == 30.0
    assert peeked[0, COLUMN["terminal_count_30d"]] == 0


def test_peek_transaction_counts_observed_frauds():
    state = FeatureState()
    transform(state, [(MONDAY_MS, 1, 10, 10.0), (MONDAY_MS + HOUR_MS, 2, 10, 10.0)])
    state.observe_labels(np.array([MONDAY_MS]), np.array([10]), np.array([1]))
    values = (MONDAY_MS + 8 * DAY_MS, 3, 10, 1.0)
    peeked = state.peek_transaction(*values)
    assert peeked[0, COLUMN["terminal_fraud_rate_7d"]] == 0.5
    assert np.array_equal(peeked, transform(state, [values]))


def test_peek_transaction_without_delay_counts_itself():
    state = FeatureState(terminal_delay_days=0)
    transform(state, [(MONDAY_MS, 1, 10, 10.0)])
    values = (MONDAY_MS + HOUR_MS, 2, 10, 5.0)
    peeked = state.peek_transaction(*values)
    assert peeked[0, COLUMN["terminal_count_1d"]] == 2
    assert np.array_equal(peeked, transform(state, [values]))


@pytest.mark.parametrize(
    "values, message",
    [
        ((1.5, 1, 1, 1.0), "event_time_ms must have an integer dtype"),
        ((MONDAY_MS, "7", 1, 1.0), "customer_id must have an integer dtype"),
        ((MONDAY_MS, 1, 1, float("nan")), "amount must be finite"),
    ],
)
def test_peek_transaction_rejects_invalid_input(values, message):
    with pytest.raises(FeatureInputError, match=message):
        FeatureState().peek_transaction(*values)
