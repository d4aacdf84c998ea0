"""Unit tests of the prequential metrics, the rolling window and the prequential log."""

from __future__ import annotations

import csv
import gzip
import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from streamer.errors import StreamerError
from streamer.evaluation import (
    LOG_COLUMNS,
    MS_PER_DAY,
    EvaluationInputError,
    PrequentialLog,
    PrequentialLogError,
    RollingPrequential,
    average_precision,
    card_precision_at_k_by_day,
    daily_card_precision_at_k,
    roc_auc,
    rolling_window_metric,
)

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DAY_2018_04_01_MS = int(datetime(2018, 4, 1, tzinfo=timezone.utc).timestamp() * 1000)


# --- reference implementations ------------------------------------------------------


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Count every (fraud, genuine) pair: 1 when the fraud scores higher, 1/2 on a tie."""
    fraud_scores = scores[labels == 1]
    genuine_scores = scores[labels == 0]
    wins = 0.0
    for fraud_score in fraud_scores:
        wins += float(np.sum(fraud_score > genuine_scores))
        wins += 0.5 * float(np.sum(fraud_score == genuine_scores))
    return wins / (len(fraud_scores) * len(genuine_scores))


def threshold_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Sum (R_n - R_(n-1)) * P_n with one threshold per distinct score, highest first."""
    positives = labels.sum()
    total = 0.0
    previous_recall = 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= threshold
        true_positives = labels[flagged].sum()
        precision = true_positives / flagged.sum()
        recall = true_positives / positives
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return float(total)


def random_tied_data(seed: int, size: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < 0.2).astype(np.int8)
    # Ten score levels, so most scores are tied with others; frauds lean higher.
    scores = np.clip(rng.integers(0, 10, size) + 3 * labels, 0, 9) / 10.0
    return labels, scores


def make_log_batch(start: int, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    labels = (rng.random(rows) < 0.3).astype(np.int8)
    return {
        "transaction_id": np.arange(start, start + rows, dtype=np.int64),
        "event_time_ms": DAY_2018_04_01_MS + np.arange(start, start + rows) * 3_600_000,
        "customer_id": rng.integers(0, 20, rows),
        "label": labels,
        "live_score": (rng.random(rows) + labels).astype(np.float32),
        "source_score": rng.random(rows).astype(np.float32),
        "model_version": np.full(rows, start // 10, dtype=np.int32),
    }


# --- roc_auc --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_ties_match_pairwise_count(seed):
    labels, scores = random_tied_data(seed)

    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_roc_auc_perfect_ranking_is_one():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_roc_auc_reversed_ranking_is_zero():
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def test_roc_auc_all_tied_is_half():
    assert roc_auc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5


def test_roc_auc_known_small_case():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_roc_auc_accepts_boolean_labels():
    assert roc_auc(np.array([False, True]), np.array([0.2, 0.7], np.float32)) == 1.0


@pytest.mark.parametrize(
    "labels, scores",
    [([0, 0, 0], [0.1, 0.5, 0.9]), ([1, 1], [0.1, 0.9]), ([], [])],
    ids=["only-genuine", "only-fraud", "empty"],
)
def test_roc_auc_single_class_is_nan(labels, scores):
    assert math.isnan(roc_auc(labels, scores))


# --- average_precision ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_ties_match_threshold_sum(seed):
    labels, scores = random_tied_data(seed)

    expected = threshold_average_precision(labels, scores)
    assert average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_average_precision_perfect_ranking_is_one():
    assert average_precision([0, 1, 0, 1], [0.1, 0.8, 0.2, 0.9]) == pytest.approx(1.0)


def test_average_precision_known_small_case():
    # Thresholds 0.8 (P=1, R=1/2), 0.4 (P=1/2, R=1/2), 0.35 (P=2/3, R=1).
    expected = 0.5 * 1.0 + 0.5 * (2 / 3)
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(expected)


def test_average_precision_reversed_ranking():
    # Thresholds 0.9 and 0.8 flag genuines only. Then 0.2 (P=1/3, R=1/2), 0.1 (P=1/2, R=1).
    expected = 0.5 * (1 / 3) + 0.5 * 0.5
    assert average_precision([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(expected)


def test_average_precision_all_tied_is_fraud_rate():
    assert average_precision([0, 1, 0, 0], [0.5] * 4) == pytest.approx(0.25)


def test_average_precision_only_fraud_is_one():
    assert average_precision([1, 1, 1], [0.2, 0.2, 0.9]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "labels, scores", [([0, 0, 0], [0.1, 0.5, 0.9]), ([], [])], ids=["no-fraud", "empty"]
)
def test_average_precision_without_fraud_is_nan(labels, scores):
    assert math.isnan(average_precision(labels, scores))


# --- input validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 2], [0.1, 0.2], "must be 0 \\(genuine\\) or 1"),
        ([0, -1], [0.1, 0.2], "must be 0 \\(genuine\\) or 1"),
        ([0.0, 1.0], [0.1, 0.2], "must be integers 0/1 or booleans"),
        ([0, 1], [0.1, float("nan")], "NaN or infinite"),
        ([0, 1], [0.1, float("inf")], "NaN or infinite"),
        ([0, 1], ["a", "b"], "must be numbers"),
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
    ids=["label-2", "label-negative", "float-labels", "nan", "inf", "strings", "length", "2-d"],
)
def test_metrics_reject_invalid_input(labels, scores, message):
    for metric in (roc_auc, average_precision):
        with pytest.raises(EvaluationInputError, match=message):
            metric(labels, scores)


def test_evaluation_input_error_is_streamer_error():
    assert issubclass(EvaluationInputError, StreamerError)


# --- card precision at k ------------------------------------------------------------


def two_day_cards() -> dict[str, np.ndarray]:
    """Six cards over two UTC days with a known card precision at 2.

    Day 1: card 1 (max 0.9, fraud on its 0.1 transaction), card 2 (0.8, genuine), card 3
    (0.7, fraud). The top two are cards 1 and 2, so the precision is 1/2.
    Day 2: card 1 (0.5, fraud), card 4 (0.4, fraud), card 5 (0.3, genuine). The top two are
    cards 1 and 4, so the precision is 1. The mean is 0.75. Card 5's transaction at the
    last millisecond of day 1 counts for day 1, where it is card 5's lowest score.
    """
    day1 = DAY_2018_04_01_MS
    day2 = day1 + MS_PER_DAY
    rows = [
        # (event_time_ms, customer_id, label, score)
        (day1 + 1_000, 1, 0, 0.9),
        (day1 + 2_000, 1, 1, 0.1),
        (day1 + 3_000, 2, 0, 0.8),
        (day1 + 4_000, 3, 1, 0.7),
        (day2 - 1, 5, 0, 0.05),
        (day2, 1, 1, 0.5),
        (day2 + 5_000, 4, 1, 0.4),
        (day2 + 6_000, 5, 0, 0.3),
        (day2 + 7_000, 4, 0, 0.2),
    ]
    times, customers, labels, scores = zip(*rows)
    return {
        "event_time_ms": np.array(times, np.int64),
        "customer_id": np.array(customers, np.int64),
        "labels": np.array(labels, np.int8),
        "scores": np.array(scores),
    }


def test_card_precision_two_days_known_mean():
    cards = two_day_cards()

    assert daily_card_precision_at_k(**cards, k=2) == pytest.approx(0.75)


def test_card_precision_two_days_per_day_values():
    cards = two_day_cards()

    days, precisions = card_precision_at_k_by_day(**cards, k=2)

    first_day = DAY_2018_04_01_MS // MS_PER_DAY
    assert days.tolist() == [first_day, first_day + 1]
    assert precisions.tolist() == pytest.approx([0.5, 1.0])


def test_card_precision_ignores_input_order():
    cards = two_day_cards()
    order = np.random.default_rng(3).permutation(len(cards["labels"]))
    shuffled = {name: values[order] for name, values in cards.items()}

    assert daily_card_precision_at_k(**shuffled, k=2) == pytest.approx(0.75)


def test_card_precision_day_with_fewer_cards_than_k():
    cards = two_day_cards()

    # Day 1 has 4 cards (1, 2, 3, 5) with 2 frauds; day 2 has 3 cards (1, 4, 5) with 2 frauds.
    expected = (2 / 4 + 2 / 3) / 2
    assert daily_card_precision_at_k(**cards, k=100) == pytest.approx(expected)


def test_card_precision_kth_place_tie_fraction():
    # Cards 1 and 2 tie for the single place; one of them had a fraud.
    times = np.full(3, DAY_2018_04_01_MS)

    result = daily_card_precision_at_k(times, [1, 2, 3], [1, 0, 1], [0.6, 0.6, 0.1], k=1)

    assert result == pytest.approx(0.5)


def test_card_precision_empty_input_is_nan():
    assert math.isnan(daily_card_precision_at_k([], [], [], [], k=100))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_card_precision_rejects_invalid_k(k):
    cards = two_day_cards()

    with pytest.raises(EvaluationInputError, match="k must be a positive integer"):
        daily_card_precision_at_k(**cards, k=k)


def read_handbook_days(days: int) -> dict[str, np.ndarray]:
    """Read the first `days` days of April 2018 from the fraud handbook's transactions."""
    end = datetime(2018, 4, 1 + days)
    columns = defaultdict(list)
    path = DATA_DIR / "fraud-handbook" / "transactions-2018-04.csv.gz"
    with gzip.open(path, "rt", newline="") as file:
        for row in csv.DictReader(file):
            moment = datetime.fromisoformat(row["tx_datetime"])
            if moment >= end:
                break
            columns["event_time_ms"].append(
                int(moment.replace(tzinfo=timezone.utc).timestamp() * 1000)
            )
            columns["customer_id"].append(int(row["customer_id"]))
            columns["labels"].append(int(row["tx_fraud"]))
            columns["scores"].append(float(row["tx_amount"]))
    return {
        "event_time_ms": np.array(columns["event_time_ms"], np.int64),
        "customer_id": np.array(columns["customer_id"], np.int64),
        "labels": np.array(columns["labels"], np.int8),
        "scores": np.array(columns["scores"]),
    }


def dict_card_precision(columns: dict[str, np.ndarray], k: int) -> list[float]:
    """Card precision at k per day with dictionaries and sorting, tie rule included."""
    cards: dict[int, dict[int, list]] = defaultdict(dict)
    for time, customer, label, score in zip(*columns.values()):
        day = int(time) // MS_PER_DAY
        best = cards[day].setdefault(int(customer), [-math.inf, 0])
        best[0] = max(best[0], float(score))
        best[1] = max(best[1], int(label))
    precisions = []
    for day in sorted(cards):
        entries = sorted(cards[day].values(), key=lambda entry: entry[0], reverse=True)
        if len(entries) <= k:
            precisions.append(sum(fraud for _, fraud in entries) / len(entries))
            continue
        kth_score = entries[k - 1][0]
        above = [fraud for score, fraud in entries if score > kth_score]
        tied = [fraud for score, fraud in entries if score == kth_score]
        hits = sum(above) + (k - len(above)) * sum(tied) / len(tied)
        precisions.append(hits / k)
    return precisions


def test_card_precision_handbook_week_reference():
    columns = read_handbook_days(7)

    days, precisions = card_precision_at_k_by_day(**columns, k=100)

    assert len(days) == 7
    assert precisions.tolist() == pytest.approx(dict_card_precision(columns, k=100))


# --- rolling_window_metric ------------------------------------------------------------


def test_rolling_window_metric_matches_direct_windows():
    rng = np.random.default_rng(11)
    times = DAY_2018_04_01_MS + rng.integers(0, 10 * MS_PER_DAY, 2_000)
    labels = (rng.random(2_000) < 0.1).astype(np.int8)
    scores = rng.random(2_000) + labels

    ends, values = rolling_window_metric(
        times, labels, scores, window_ms=3 * MS_PER_DAY, step_ms=MS_PER_DAY
    )

    assert ends.tolist() == [DAY_2018_04_01_MS + day * MS_PER_DAY for day in range(1, 11)]
    for end, value in zip(ends, values):
        inside = (times >= end - 3 * MS_PER_DAY) & (times < end)
        assert value == pytest.approx(average_precision(labels[inside], scores[inside]))


def test_rolling_window_metric_window_without_fraud_is_nan():
    times = DAY_2018_04_01_MS + np.array([0, 1, MS_PER_DAY + 5])
    labels = np.array([1, 0, 0], np.int8)

    _, values = rolling_window_metric(
        times, labels, [0.9, 0.1, 0.3], window_ms=MS_PER_DAY, step_ms=MS_PER_DAY
    )

    assert values[0] == pytest.approx(1.0)
    assert math.isnan(values[1])


def test_rolling_window_metric_rejects_too_many_windows():
    times = DAY_2018_04_01_MS + np.array([0, 30 * MS_PER_DAY])

    with pytest.raises(EvaluationInputError, match="use a larger step"):
        rolling_window_metric(times, [0, 1], [0.1, 0.2], window_ms=MS_PER_DAY, step_ms=60_000)


# --- RollingPrequential -----------------------------------------------------------------


def test_rolling_prequential_keeps_only_last_window():
    rng = np.random.default_rng(5)
    rolling = RollingPrequential(window=100)
    all_labels, all_scores = [], []

    for size in [7, 30, 1, 64, 99, 0, 13, 50]:
        labels = (rng.random(size) < 0.3).astype(np.int8)
        scores = rng.integers(0, 20, size) / 20.0 + 0.2 * labels
        rolling.update(labels, scores)
        all_labels.append(labels)
        all_scores.append(scores)

        tail_labels = np.concatenate(all_labels)[-100:]
        tail_scores = np.concatenate(all_scores)[-100:]
        assert rolling.count == len(tail_labels)
        assert rolling.auc() == pytest.approx(roc_auc(tail_labels, tail_scores), nan_ok=True)
        assert rolling.average_precision() == pytest.approx(
            average_precision(tail_labels, tail_scores), nan_ok=True
        )

    assert rolling.total_count == 264


def test_rolling_prequential_batch_larger_than_window():
    rolling = RollingPrequential(window=4)
    rolling.update([0, 0], [0.5, 0.6])

    rolling.update([1, 1, 0, 0, 1, 0], [0.0, 0.0, 0.1, 0.2, 0.9, 0.3])

    # Only the last four remain: labels [0, 0, 1, 0] with the fraud scored highest.
    assert rolling.count == 4
    assert rolling.total_count == 8
    assert rolling.auc() == 1.0


def test_rolling_prequential_empty_is_nan():
    rolling = RollingPrequential(window=10)

    assert math.isnan(rolling.auc())
    assert math.isnan(rolling.average_precision())
    assert rolling.count == 0


def test_rolling_prequential_invalid_batch_unchanged():
    rolling = RollingPrequential(window=10)
    rolling.update([0, 1], [0.1, 0.9])

    with pytest.raises(EvaluationInputError):
        rolling.update([0, 1], [0.1, float("nan")])

    assert rolling.count == 2
    assert rolling.total_count == 2


@pytest.mark.parametrize("window", [0, -5, 1.5, True])
def test_rolling_prequential_rejects_invalid_window(window):
    with pytest.raises(EvaluationInputError, match="window must be a positive integer"):
        RollingPrequential(window=window)


# --- PrequentialLog -------------------------------------------------------------------


def filled_log(batch_sizes=(5, 3, 9, 1, 12), chunk_rows=8) -> tuple[PrequentialLog, dict]:
    rng = np.random.default_rng(2)
    log = PrequentialLog(chunk_rows=chunk_rows)
    batches = []
    start = 0
    for size in batch_sizes:
        batch = make_log_batch(start, size, rng)
        log.append(**batch)
        batches.append(batch)
        start += size
    expected = {name: np.concatenate([batch[name] for batch in batches]) for name in LOG_COLUMNS}
    return log, expected


def test_prequential_log_arrays_equal_appended_batches():
    log, expected = filled_log()

    columns = log.arrays()

    assert len(log) == 30
    for name, dtype in LOG_COLUMNS.items():
        assert columns[name].dtype == dtype, name
        np.testing.assert_array_equal(columns[name], expected[name], err_msg=name)


def test_prequential_log_appends_after_arrays():
    log, expected = filled_log()
    log.arrays()
    extra = make_log_batch(30, 4, np.random.default_rng(9))

    log.append(**extra)

    np.testing.assert_array_equal(
        log.arrays()["transaction_id"],
        np.concatenate([expected["transaction_id"], extra["transaction_id"]]),
    )


def test_prequential_log_arrays_are_read_only():
    log, _ = filled_log()

    with pytest.raises(ValueError):
        log.arrays()["label"][0] = 1


def test_prequential_log_empty_arrays_have_column_dtypes():
    columns = PrequentialLog().arrays()

    assert {name: values.dtype for name, values in columns.items()} == LOG_COLUMNS
    assert all(len(values) == 0 for values in columns.values())


def test_prequential_log_scalar_column_is_repeated():
    log = PrequentialLog()
    batch = make_log_batch(0, 3, np.random.default_rng(1))
    batch["model_version"] = 7

    log.append(**batch)

    assert log.arrays()["model_version"].tolist() == [7, 7, 7]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": None}, "missing \\['label'\\]"),
        ({"score": np.zeros(3)}, "unknown \\['score'\\]"),
        ({"customer_id": np.zeros(2, np.int64)}, "differ in length"),
        ({"customer_id": np.zeros(3)}, "customer_id must be integers"),
        ({"live_score": np.array([0.1, np.nan, 0.2])}, "live_score: 1 of 3 values are NaN"),
        ({"model_version": np.array([2**40] * 3)}, "model_version must fit in int32"),
        ({"label": np.array([0, 1, 3])}, "label must be 0"),
    ],
    ids=["missing", "unknown", "length", "float-id", "nan-score", "version-range", "label-3"],
)
def test_prequential_log_rejects_invalid_batch(change, message):
    log = PrequentialLog()
    batch = make_log_batch(0, 3, np.random.default_rng(1))
    for name, values in change.items():
        if values is None:
            del batch[name]
        else:
            batch[name] = values

    with pytest.raises(EvaluationInputError, match=message):
        log.append(**batch)

    assert len(log) == 0


def test_prequential_log_save_load_round_trip(tmp_path):
    log, expected = filled_log()
    path = tmp_path / "prequential.npz"

    log.save(path)
    loaded = PrequentialLog.load(path)

    assert len(loaded) == len(expected["label"])
    for name, dtype in LOG_COLUMNS.items():
        assert loaded.arrays()[name].dtype == dtype, name
        np.testing.assert_array_equal(loaded.arrays()[name], expected[name], err_msg=name)
    assert [entry.name for entry in tmp_path.iterdir()] == ["prequential.npz"]


def test_prequential_log_loaded_accepts_appends(tmp_path):
    log, expected = filled_log()
    log.save(tmp_path / "log.npz")
    loaded = PrequentialLog.load(tmp_path / "log.npz")

    loaded.append(**make_log_batch(30, 2, np.random.default_rng(4)))

    assert len(loaded) == 32
    assert loaded.arrays()["transaction_id"][-1] == 31


def test_prequential_log_save_keeps_suffix(tmp_path):
    log, _ = filled_log()

    written = log.save(tmp_path / "log.data")

    assert written == tmp_path / "log.data"
    assert written.is_file()


def test_prequential_log_load_missing_file(tmp_path):
    with pytest.raises(PrequentialLogError, match="not found"):
        PrequentialLog.load(tmp_path / "absent.npz")


def test_prequential_log_load_rejects_missing_column(tmp_path):
    log, _ = filled_log()
    columns = dict(log.arrays())
    del columns["source_score"]
    path = tmp_path / "partial.npz"
    np.savez(path, format_version=np.array(1), **columns)

    with pytest.raises(PrequentialLogError, match="source_score"):
        PrequentialLog.load(path)


def test_prequential_log_load_rejects_object_arrays(tmp_path):
    log, _ = filled_log()
    columns = dict(log.arrays())
    columns["customer_id"] = np.array([object()] * len(log), dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, format_version=np.array(1), **columns)

    with pytest.raises(PrequentialLogError, match="pickled|allow_pickle"):
        PrequentialLog.load(path)


def test_prequential_log_load_rejects_wrong_dtype(tmp_path):
    log, _ = filled_log()
    columns = dict(log.arrays())
    columns["live_score"] = columns["live_score"].astype(np.float64)
    path = tmp_path / "float64.npz"
    np.savez(path, format_version=np.array(1), **columns)

    with pytest.raises(PrequentialLogError, match="live_score is float64"):
        PrequentialLog.load(path)


def test_prequential_log_load_rejects_other_format_version(tmp_path):
    log, _ = filled_log()
    path = tmp_path / "future.npz"
    np.savez(path, format_version=np.array(2), **log.arrays())

    with pytest.raises(PrequentialLogError, match="format version"):
        PrequentialLog.load(path)


def test_prequential_log_load_rejects_non_archive(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("not an archive")

    with pytest.raises(PrequentialLogError, match="cannot read"):
        PrequentialLog.load(path)


def test_prequential_log_window_is_half_open():
    log, expected = filled_log()
    start = int(expected["event_time_ms"][4])
    end = int(expected["event_time_ms"][10])

    subset = log.window(start, end)

    np.testing.assert_array_equal(subset["transaction_id"], expected["transaction_id"][4:10])
    np.testing.assert_array_equal(subset["live_score"], expected["live_score"][4:10])


def test_prequential_log_window_open_ends():
    log, expected = filled_log()
    middle = int(expected["event_time_ms"][12])

    assert len(log.window(None, middle)["label"]) == 12
    assert len(log.window(middle, None)["label"]) == 18
    assert len(log.window()["label"]) == 30


def test_prequential_log_summary_matches_direct_metrics():
    log, expected = filled_log(batch_sizes=(40, 25, 35), chunk_rows=16)
    start = int(expected["event_time_ms"][20])
    end = int(expected["event_time_ms"][90])
    inside = slice(20, 90)
    labels = expected["label"][inside]

    summary = log.summary(start, end, k=3)

    assert summary["rows"] == 70
    assert summary["frauds"] == int(labels.sum())
    assert summary["k"] == 3
    for side in ("live", "source"):
        scores = expected[f"{side}_score"][inside]
        assert summary[side]["roc_auc"] == roc_auc(labels, scores)
        assert summary[side]["average_precision"] == average_precision(labels, scores)
        assert summary[side]["card_precision_at_k"] == daily_card_precision_at_k(
            expected["event_time_ms"][inside], expected["customer_id"][inside], labels, scores, 3
        )


def test_prequential_log_summary_empty_range_is_nan():
    log, _ = filled_log()

    summary = log.summary(0, 1)

    assert summary["rows"] == 0
    assert math.isnan(summary["live"]["roc_auc"])
    assert math.isnan(summary["source"]["average_precision"])
    assert math.isnan(summary["live"]["card_precision_at_k"])
