"""Unit tests of the label join: on-time, late, early, repeated and missing labels, growth, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest

from streamer.labeljoin import DAY_MS, PENDING_COLUMNS, Joined, JoinCounts, LabelJoin

N_FEATURES = 15
START_MS = 1_522_540_800_000  # 2018-04-01T00:00:00Z
HOUR_MS = 3_600_000
COLUMN_DTYPES = PENDING_COLUMNS


def make_transactions(ids, times, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Build transaction columns and features with distinct random values in every row."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    columns = {
        "transaction_id": np.asarray(ids, dtype=np.int64),
        "event_time_ms": np.asarray(times, dtype=np.int64),
        "customer_id": rng.integers(0, 10_000, n, dtype=np.int64),
        "terminal_id": rng.integers(0, 10_000, n, dtype=np.int64),
        "live_score": rng.random(n, dtype=np.float32),
        "source_score": rng.random(n, dtype=np.float32),
        "model_version": rng.integers(0, 50, n).astype(np.int32),
    }
    features = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    return columns, features


def make_labels(ids, values, times) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(values, dtype=np.int8),
        np.asarray(times, dtype=np.int64),
    )


def rows_of(columns: dict[str, np.ndarray], ids) -> np.ndarray:
    """Return the row indices of ``ids`` in ``columns``, in the order of ``ids``."""
    position = {tx: i for i, tx in enumerate(columns["transaction_id"].tolist())}
    return np.asarray([position[tx] for tx in ids], dtype=np.int64)


def assert_joined_rows(joined: Joined, columns: dict[str, np.ndarray], features: np.ndarray, ids) -> None:
    """Check that ``joined`` contains exactly the stored rows of ``ids``, in that order, with their dtypes."""
    rows = rows_of(columns, ids)
    assert set(joined.columns) == set(COLUMN_DTYPES)
    for name, dtype in COLUMN_DTYPES.items():
        assert joined.columns[name].dtype == dtype, name
        np.testing.assert_array_equal(joined.columns[name], columns[name][rows], err_msg=name)
    assert joined.features.dtype == np.float32
    np.testing.assert_array_equal(joined.features, features[rows])


def assert_joined_equal(actual: Joined, expected: Joined) -> None:
    assert actual.expired == expected.expired
    np.testing.assert_array_equal(actual.label, expected.label)
    np.testing.assert_array_equal(actual.features, expected.features)
    assert set(actual.columns) == set(expected.columns)
    for name in expected.columns:
        np.testing.assert_array_equal(actual.columns[name], expected.columns[name], err_msg=name)


# --- labels on time -------------------------------------------------------------------------


def test_add_labels_joins_stored_rows():
    join = LabelJoin(N_FEATURES)
    ids = list(range(100, 110))
    columns, features = make_transactions(ids, START_MS + np.arange(10) * 1000)
    join.add_transactions(columns, features)

    joined, counts = join.add_labels(*make_labels([107, 102, 105], [1, 0, 1], [START_MS + DAY_MS] * 3))

    assert_joined_rows(joined, columns, features, [107, 102, 105])
    assert joined.label.dtype == np.int8
    np.testing.assert_array_equal(joined.label, [1, 0, 1])
    assert joined.expired is False
    assert counts.joined == 3
    assert join.pending == 7


def test_add_transactions_without_labels_joins_nothing():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 2, 3], [START_MS] * 3)

    joined, counts = join.add_transactions(columns, features)

    assert len(joined) == 0
    assert joined.features.shape == (0, N_FEATURES)
    assert counts.joined == 0
    assert join.pending == 3


def test_add_labels_joins_each_row_once():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 2], [START_MS] * 2)
    join.add_transactions(columns, features)

    join.add_labels(*make_labels([1], [1], [START_MS + HOUR_MS]))
    joined, counts = join.add_labels(*make_labels([2], [0], [START_MS + HOUR_MS]))

    assert_joined_rows(joined, columns, features, [2])
    assert counts.joined == 1
    assert join.pending == 0


def test_late_label_joins_after_many_transactions():
    join = LabelJoin(N_FEATURES, initial_capacity=64)
    first_columns, first_features = make_transactions([7], [START_MS], seed=1)
    join.add_transactions(first_columns, first_features)
    for batch in range(20):
        ids = 1_000 + batch * 100 + np.arange(100)
        columns, features = make_transactions(ids, START_MS + (batch + 1) * HOUR_MS + np.arange(100), seed=batch + 2)
        join.add_transactions(columns, features)
        join.add_labels(*make_labels(ids[:90], np.zeros(90), np.full(90, START_MS + 2 * DAY_MS)))

    joined, counts = join.add_labels(*make_labels([7], [1], [START_MS + 5 * DAY_MS]))

    assert_joined_rows(joined, first_columns, first_features, [7])
    np.testing.assert_array_equal(joined.label, [1])
    assert counts.joined == 1
    assert join.pending == 20 * 10


# --- labels before their transaction --------------------------------------------------------


def test_early_label_is_held():
    join = LabelJoin(N_FEATURES)

    joined, counts = join.add_labels(*make_labels([5], [1], [START_MS]))

    assert len(joined) == 0
    assert counts.early_labels == 1
    assert counts.joined == 0
    assert join.pending_early_labels == 1


def test_early_label_joins_when_transaction_arrives():
    join = LabelJoin(N_FEATURES)
    join.add_labels(*make_labels([5, 8], [1, 0], [START_MS, START_MS]))
    columns, features = make_transactions([4, 5, 6, 8], [START_MS + 1000] * 4)

    joined, counts = join.add_transactions(columns, features)

    assert_joined_rows(joined, columns, features, [5, 8])
    np.testing.assert_array_equal(joined.label, [1, 0])
    assert joined.expired is False
    assert counts.joined == 2
    assert join.pending == 2
    assert join.pending_early_labels == 0


def test_label_repeated_after_early_join_is_duplicate():
    join = LabelJoin(N_FEATURES)
    join.add_labels(*make_labels([5], [1], [START_MS]))
    join.add_transactions(*make_transactions([5], [START_MS + 1000]))

    joined, counts = join.add_labels(*make_labels([5], [1], [START_MS + 2000]))

    assert len(joined) == 0
    assert counts.duplicate_labels == 1


def test_early_duplicate_label_is_counted():
    join = LabelJoin(N_FEATURES)
    join.add_labels(*make_labels([5], [1], [START_MS]))

    _, counts = join.add_labels(*make_labels([5], [1], [START_MS + 1]))

    assert counts.duplicate_labels == 1
    assert counts.early_labels == 0
    assert join.pending_early_labels == 1


def test_early_conflicting_label_keeps_first():
    join = LabelJoin(N_FEATURES)
    join.add_labels(*make_labels([5], [1], [START_MS]))

    _, counts = join.add_labels(*make_labels([5], [0], [START_MS + 1]))
    joined, _ = join.add_transactions(*make_transactions([5], [START_MS + 1000]))

    assert counts.conflicting_labels == 1
    assert counts.conflicting_transaction_ids == [5]
    np.testing.assert_array_equal(joined.label, [1])


# --- repeated labels and transactions -------------------------------------------------------


def test_duplicate_label_not_joined_twice():
    join = LabelJoin(N_FEATURES)
    join.add_transactions(*make_transactions([1, 2], [START_MS] * 2))
    join.add_labels(*make_labels([1], [1], [START_MS + HOUR_MS]))

    joined, counts = join.add_labels(*make_labels([1], [1], [START_MS + 2 * HOUR_MS]))

    assert len(joined) == 0
    assert counts.duplicate_labels == 1
    assert counts.conflicting_labels == 0
    assert counts.joined == 0


def test_duplicate_label_in_one_call_joined_once():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 2], [START_MS] * 2)
    join.add_transactions(columns, features)

    joined, counts = join.add_labels(*make_labels([1, 1], [0, 0], [START_MS + HOUR_MS] * 2))

    assert_joined_rows(joined, columns, features, [1])
    assert counts.duplicate_labels == 1


def test_conflicting_label_reports_transaction_id():
    join = LabelJoin(N_FEATURES)
    join.add_transactions(*make_transactions([1, 2, 3], [START_MS] * 3))
    join.add_labels(*make_labels([1, 3], [0, 1], [START_MS + HOUR_MS] * 2))

    joined, counts = join.add_labels(*make_labels([3, 1, 2], [0, 0, 1], [START_MS + 2 * HOUR_MS] * 3))

    assert counts.conflicting_labels == 1
    assert counts.conflicting_transaction_ids == [3]
    assert counts.duplicate_labels == 1
    np.testing.assert_array_equal(joined.columns["transaction_id"], [2])


def test_duplicate_transaction_ignored_while_pending():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 2], [START_MS] * 2, seed=1)
    join.add_transactions(columns, features)

    _, counts = join.add_transactions(*make_transactions([2, 3], [START_MS + 5] * 2, seed=2))
    joined, _ = join.add_labels(*make_labels([2], [1], [START_MS + HOUR_MS]))

    assert counts.duplicate_transactions == 1
    assert join.pending == 2
    assert_joined_rows(joined, columns, features, [2])


def test_duplicate_transaction_in_one_call_stored_once():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 1, 2], [START_MS] * 3)

    _, counts = join.add_transactions(columns, features)
    joined, _ = join.add_labels(*make_labels([1], [0], [START_MS + HOUR_MS]))

    assert counts.duplicate_transactions == 1
    assert join.pending == 1
    np.testing.assert_array_equal(joined.features, features[:1])


def test_duplicate_transaction_after_join_ignored():
    join = LabelJoin(N_FEATURES)
    join.add_transactions(*make_transactions([1], [START_MS]))
    join.add_labels(*make_labels([1], [1], [START_MS + HOUR_MS]))

    _, counts = join.add_transactions(*make_transactions([1], [START_MS]))

    assert counts.duplicate_transactions == 1
    assert join.pending == 0


# --- missing labels -------------------------------------------------------------------------


def test_expire_genuine_returns_overdue_as_label_zero():
    join = LabelJoin(N_FEATURES, deadline_days=1, policy="genuine")
    times = [START_MS, START_MS + HOUR_MS, START_MS + 2 * DAY_MS]
    columns, features = make_transactions([1, 2, 3], times)
    join.add_transactions(columns, features)

    joined, counts = join.expire(START_MS + DAY_MS + 2 * HOUR_MS)

    assert_joined_rows(joined, columns, features, [1, 2])
    assert joined.label.dtype == np.int8
    np.testing.assert_array_equal(joined.label, [0, 0])
    assert joined.expired is True
    assert counts.expired == 2
    assert counts.expired_dropped == 0
    assert join.pending == 1


def test_expire_keeps_transaction_at_deadline():
    join = LabelJoin(N_FEATURES, deadline_days=1)
    join.add_transactions(*make_transactions([1], [START_MS]))

    joined, counts = join.expire(START_MS + DAY_MS)

    assert len(joined) == 0
    assert counts.expired == 0
    assert join.pending == 1


def test_expire_drop_returns_nothing_but_counts():
    join = LabelJoin(N_FEATURES, deadline_days=1, policy="drop")
    join.add_transactions(*make_transactions([1, 2, 3], [START_MS, START_MS + HOUR_MS, START_MS + 2 * DAY_MS]))

    joined, counts = join.expire(START_MS + DAY_MS + 2 * HOUR_MS)

    assert len(joined) == 0
    assert joined.features.shape == (0, N_FEATURES)
    assert counts.expired == 2
    assert counts.expired_dropped == 2
    assert join.pending == 1


@pytest.mark.parametrize("policy", ["genuine", "drop"])
def test_label_after_expiry_not_joined(policy):
    join = LabelJoin(N_FEATURES, deadline_days=1, policy=policy)
    join.add_transactions(*make_transactions([1], [START_MS]))
    join.expire(START_MS + 2 * DAY_MS)

    joined, counts = join.add_labels(*make_labels([1], [0], [START_MS + 3 * DAY_MS]))

    assert len(joined) == 0
    assert counts.joined == 0
    assert counts.early_labels == 0


def test_expire_releases_in_event_time_order():
    join = LabelJoin(N_FEATURES, deadline_days=1, initial_capacity=4)
    join.add_transactions(*make_transactions([1, 2, 3, 4], START_MS + np.arange(4)))
    join.add_labels(*make_labels([1, 2], [0, 0], [START_MS + 5] * 2))
    # The freed slots of 1 and 2 are reused by 5 and 6, which come later in event time.
    join.add_transactions(*make_transactions([5, 6], START_MS + 10 + np.arange(2)))

    joined, _ = join.expire(START_MS + 2 * DAY_MS)

    np.testing.assert_array_equal(joined.columns["transaction_id"], [3, 4, 5, 6])


def test_orphan_early_label_expires():
    join = LabelJoin(N_FEATURES, deadline_days=1)
    join.add_labels(*make_labels([5, 6], [1, 0], [START_MS, START_MS + 2 * DAY_MS]))

    _, counts = join.expire(START_MS + DAY_MS + HOUR_MS)
    joined, _ = join.add_transactions(*make_transactions([5], [START_MS - HOUR_MS]))

    assert counts.orphan_labels == 1
    assert join.pending_early_labels == 1
    assert len(joined) == 0
    assert join.pending == 1


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="policy"):
        LabelJoin(N_FEATURES, policy="fraud")


# --- capacity ------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_capacity", [0, 1, 4])
def test_growth_keeps_pending_rows(initial_capacity):
    join = LabelJoin(N_FEATURES, initial_capacity=initial_capacity)
    all_columns, all_features = make_transactions(np.arange(50), START_MS + np.arange(50))
    for start in range(0, 50, 7):
        part = slice(start, start + 7)
        join.add_transactions({k: v[part] for k, v in all_columns.items()}, all_features[part])

    ids = list(range(49, -1, -1))
    joined, counts = join.add_labels(*make_labels(ids, np.ones(50), np.full(50, START_MS + DAY_MS)))

    assert_joined_rows(joined, all_columns, all_features, ids)
    assert counts.joined == 50
    assert join.pending == 0


def test_growth_after_reuse_keeps_pending_rows():
    join = LabelJoin(N_FEATURES, initial_capacity=8)
    columns, features = make_transactions(np.arange(8), START_MS + np.arange(8), seed=1)
    join.add_transactions(columns, features)
    join.add_labels(*make_labels([0, 3, 6], [0, 0, 0], [START_MS + HOUR_MS] * 3))
    more_columns, more_features = make_transactions(np.arange(100, 120), START_MS + 100 + np.arange(20), seed=2)
    join.add_transactions(more_columns, more_features)

    old_joined, _ = join.add_labels(*make_labels([7, 1, 2, 4, 5], np.ones(5), [START_MS + DAY_MS] * 5))
    new_ids = list(range(119, 99, -1))
    new_joined, _ = join.add_labels(*make_labels(new_ids, np.ones(20), [START_MS + DAY_MS] * 20))

    assert_joined_rows(old_joined, columns, features, [7, 1, 2, 4, 5])
    assert_joined_rows(new_joined, more_columns, more_features, new_ids)


# --- checkpoint state -----------------------------------------------------------------------


def build_scenario(seed: int = 3) -> list[tuple]:
    """Build a stream of transaction, label and expire calls with late, early, repeated and missing labels."""
    rng = np.random.default_rng(seed)
    n = 400
    ids = np.arange(10_000, 10_000 + n)
    tx_times = START_MS + np.sort(rng.integers(0, 8 * DAY_MS, n))
    columns, features = make_transactions(ids, tx_times, seed)
    values = (rng.random(n) < 0.2).astype(np.int8)
    # About a fifth of labels never come, and about a sixth come up to 1.5 days before their transaction.
    delay = rng.integers(0, 3 * DAY_MS, n)
    early = rng.random(n) < 0.15
    delay[early] = -rng.integers(HOUR_MS, 3 * DAY_MS // 2, early.sum())
    label_times = tx_times + delay
    labelled = rng.random(n) < 0.8

    # Events are (time, kind, key, label) tuples. Kind 0 is a transaction keyed by its row, and
    # kind 1 is a label keyed by its transaction id.
    events = [(int(t), 0, i, 0) for i, t in enumerate(tx_times)]
    for i in np.flatnonzero(labelled):
        events.append((int(label_times[i]), 1, int(ids[i]), int(values[i])))
    for i in rng.choice(np.flatnonzero(labelled), 30, replace=False):
        events.append((int(label_times[i]) + HOUR_MS, 1, int(ids[i]), int(values[i])))
    for i in rng.choice(np.flatnonzero(labelled), 10, replace=False):
        events.append((int(label_times[i]) + 2 * HOUR_MS, 1, int(ids[i]), 1 - int(values[i])))
    for i in rng.choice(n, 15, replace=False):
        events.append((int(tx_times[i]) + 3 * HOUR_MS, 0, i, 0))
    for k, t in enumerate(START_MS + rng.integers(0, 6 * DAY_MS, 8)):
        events.append((int(t), 1, 90_000 + k, 1))  # labels of transactions that never come
    events.sort()

    calls, watermark, start = [], 0, 0
    while start < len(events):
        kind = events[start][1]
        stop = start
        while stop < len(events) and stop - start < 25 and events[stop][1] == kind:
            stop += 1
        chunk = events[start:stop]
        keys = np.asarray([e[2] for e in chunk], dtype=np.int64)
        if kind == 0:
            calls.append(("transactions", {k: v[keys] for k, v in columns.items()}, features[keys]))
        else:
            calls.append(("labels", *make_labels(keys, [e[3] for e in chunk], [e[0] for e in chunk])))
        watermark = max(watermark, chunk[-1][0])
        calls.append(("expire", watermark))
        start = stop
    return calls


def run_calls(join: LabelJoin, calls: list[tuple]) -> list[tuple[Joined, JoinCounts]]:
    outputs = []
    for kind, *args in calls:
        if kind == "transactions":
            outputs.append(join.add_transactions(*args))
        elif kind == "labels":
            outputs.append(join.add_labels(*args))
        else:
            outputs.append(join.expire(*args))
    return outputs


def through_npz(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write the state as the checkpoint does and read it back without pickle."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


@pytest.mark.parametrize("policy", ["genuine", "drop"])
@pytest.mark.parametrize("split_fraction", [0.3, 0.7])
def test_state_round_trip_continues_same_joins(policy, split_fraction):
    calls = build_scenario()
    split = int(len(calls) * split_fraction)
    uninterrupted = LabelJoin(N_FEATURES, deadline_days=2, policy=policy, initial_capacity=16)
    expected = run_calls(uninterrupted, calls)[split:]

    first = LabelJoin(N_FEATURES, deadline_days=2, policy=policy, initial_capacity=16)
    run_calls(first, calls[:split])
    resumed = LabelJoin(N_FEATURES, deadline_days=2, policy=policy, initial_capacity=16)
    resumed.load_state_dict(through_npz(first.state_dict()))
    restored_counts = (resumed.pending, resumed.pending_early_labels)
    actual = run_calls(resumed, calls[split:])

    assert first.pending > 0
    assert first.pending_early_labels > 0
    assert restored_counts == (first.pending, first.pending_early_labels)
    assert len(actual) == len(expected)
    for (actual_joined, actual_counts), (expected_joined, expected_counts) in zip(actual, expected):
        assert_joined_equal(actual_joined, expected_joined)
        assert actual_counts == expected_counts
    assert resumed.pending == uninterrupted.pending


def test_scenario_exercises_every_case():
    outputs = run_calls(LabelJoin(N_FEATURES, deadline_days=2, initial_capacity=16), build_scenario())

    totals = JoinCounts()
    for _, counts in outputs:
        for name in ("joined", "early_labels", "duplicate_labels", "conflicting_labels",
                     "duplicate_transactions", "expired", "orphan_labels"):
            setattr(totals, name, getattr(totals, name) + getattr(counts, name))

    assert totals.joined > 0
    assert totals.early_labels > 0
    assert totals.duplicate_labels > 0
    assert totals.conflicting_labels > 0
    assert totals.duplicate_transactions > 0
    assert totals.expired > 0
    assert totals.orphan_labels > 0


def test_state_dict_arrays_are_numeric():
    join = LabelJoin(N_FEATURES)
    join.add_transactions(*make_transactions([1, 2, 3], [START_MS] * 3))
    join.add_labels(*make_labels([1, 9], [1, 0], [START_MS + HOUR_MS] * 2))

    state = join.state_dict()

    for name, array in state.items():
        assert isinstance(array, np.ndarray), name
        assert array.dtype.kind in "biuf", name


def test_state_dict_loads_without_pickle():
    join = LabelJoin(N_FEATURES)
    columns, features = make_transactions([1, 2, 3], [START_MS] * 3)
    join.add_transactions(columns, features)
    join.add_labels(*make_labels([1, 9], [1, 0], [START_MS + HOUR_MS] * 2))

    restored = LabelJoin(N_FEATURES)
    restored.load_state_dict(through_npz(join.state_dict()))
    joined, _ = restored.add_labels(*make_labels([3, 2, 1], [0, 1, 1], [START_MS + DAY_MS] * 3))
    _, counts = restored.add_transactions(*make_transactions([9], [START_MS]))

    assert_joined_rows(joined, columns, features, [3, 2])
    assert restored.pending == 0
    assert counts.joined == 1


def test_state_dict_of_empty_join_round_trips():
    restored = LabelJoin(N_FEATURES)

    restored.load_state_dict(through_npz(LabelJoin(N_FEATURES).state_dict()))

    assert restored.pending == 0
    assert restored.pending_early_labels == 0


def test_load_state_dict_into_used_join_raises():
    join = LabelJoin(N_FEATURES)
    join.add_transactions(*make_transactions([1], [START_MS]))

    with pytest.raises(RuntimeError, match="empty"):
        join.load_state_dict(LabelJoin(N_FEATURES).state_dict())
