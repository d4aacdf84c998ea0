"""Prequential (test-then-train) evaluation of fraud scores.

Each transaction is scored at its event time by the model that is live at that moment
and by the frozen source model. The score is judged when the transaction's label
arrives, days later. This module contains the metrics (ROC AUC, average precision,
daily card precision at k), a rolling window of judged scores for live metrics, and a
log of every judged transaction for reports.

Labels are 1 for fraud and 0 for genuine, and a higher score means more likely fraud.
Event times are Unix milliseconds, UTC. Only numpy is used.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .atomicfile import write_atomically
from .errors import StreamerError

logger = logging.getLogger(__name__)

MS_PER_DAY = 86_400_000
# Rolling metrics evaluate one window per step, so a tiny step over a long stream could
# run for hours. This bound keeps a chart of five months at hourly steps possible.
MAX_ROLLING_WINDOWS = 10_000

LOG_COLUMNS: dict[str, np.dtype] = {
    "transaction_id": np.dtype(np.int64),
    "event_time_ms": np.dtype(np.int64),
    "customer_id": np.dtype(np.int64),
    "label": np.dtype(np.int8),
    "live_score": np.dtype(np.float32),
    "source_score": np.dtype(np.float32),
    "model_version": np.dtype(np.int32),
}
# Version of the column layout that PrequentialLog.save writes. load rejects any other.
LOG_FORMAT_VERSION = 1


class EvaluationInputError(StreamerError, ValueError):
    """Labels, scores or log columns passed to an evaluation function are invalid."""


class PrequentialLogError(StreamerError):
    """A saved prequential log cannot be read or does not have the expected columns."""


# --- input validation ---------------------------------------------------------------


def _as_1d(values: object, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise EvaluationInputError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.size == 0:
        # An empty list becomes float64; an empty input is valid whatever its dtype.
        return np.empty(0, np.int8)
    return array


def _as_labels(values: object, name: str = "labels") -> np.ndarray:
    array = _as_1d(values, name)
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise EvaluationInputError(
            f"{name} must be integers 0/1 or booleans, got dtype {array.dtype}; "
            "cast the labels to int8"
        )
    if array.size and (array.min() < 0 or array.max() > 1):
        bad = array[(array < 0) | (array > 1)]
        raise EvaluationInputError(
            f"{name} must be 0 (genuine) or 1 (fraud), got {bad.size} other values such as {bad[0]}"
        )
    return array.astype(np.int8, copy=False)


def _as_scores(values: object, name: str = "scores", dtype: type = np.float64) -> np.ndarray:
    array = _as_1d(values, name)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise EvaluationInputError(f"{name} must be numbers, got dtype {array.dtype}")
    array = array.astype(dtype, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        raise EvaluationInputError(
            f"{name}: {int((~finite).sum())} of {array.size} values are NaN or infinite, "
            "but every judged transaction needs a finite score"
        )
    return array


def _as_integers(values: object, name: str, dtype: np.dtype = np.dtype(np.int64)) -> np.ndarray:
    array = _as_1d(values, name)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise EvaluationInputError(f"{name} must be integers, got dtype {array.dtype}")
    if not np.can_cast(array.dtype, dtype, casting="safe") and array.size:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise EvaluationInputError(
                f"{name} must fit in {dtype}, got values from {array.min()} to {array.max()}"
            )
    return array.astype(dtype, copy=False)


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise EvaluationInputError(f"arrays must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _validate_labels_and_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    label_array = _as_labels(labels)
    score_array = _as_scores(scores)
    _check_same_length(labels=label_array, scores=score_array)
    return label_array, score_array


# --- ranking metrics ----------------------------------------------------------------


def roc_auc(labels: object, scores: object) -> float:
    """Compute the ROC AUC, counting a tie between a fraud and a genuine score as half.

    This equals the Mann-Whitney U statistic over average ranks divided by the number of
    (fraud, genuine) pairs. Returns NaN when only one class, or nothing, is present.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    label_array, score_array = _validate_labels_and_scores(labels, scores)
    return _roc_auc_unchecked(label_array, score_array)


def _roc_auc_unchecked(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan

    _, group, group_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    # Tied scores share the average of the 1-based ranks they span.
    average_ranks = np.cumsum(group_sizes) - (group_sizes - 1) / 2.0
    positives_per_group = np.bincount(group, weights=labels, minlength=len(group_sizes))
    positive_rank_sum = float(positives_per_group @ average_ranks)

    u_statistic = positive_rank_sum - positives * (positives + 1) / 2.0
    return u_statistic / (positives * negatives)


def average_precision(labels: object, scores: object) -> float:
    """Compute the average precision: the sum over thresholds of (R_n - R_(n-1)) * P_n.

    Thresholds are the distinct scores from the highest down, so tied scores form one
    threshold. This is the definition of scikit-learn's ``average_precision_score``
    (no interpolation). Returns NaN when there is no fraud.

    >>> round(average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
    0.8333
    """
    label_array, score_array = _validate_labels_and_scores(labels, scores)
    return _average_precision_unchecked(label_array, score_array)


def _average_precision_unchecked(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = int(labels.sum())
    if positives == 0:
        return math.nan

    _, group, group_sizes = np.unique(scores, return_inverse=True, return_counts=True)
    positives_per_group = np.bincount(group, weights=labels, minlength=len(group_sizes))

    # np.unique sorts ascending; the thresholds run from the highest score down.
    positives_per_group = positives_per_group[::-1]
    true_positives = np.cumsum(positives_per_group)
    flagged = np.cumsum(group_sizes[::-1])
    precision = true_positives / flagged
    recall_increase = positives_per_group / positives
    return float(recall_increase @ precision)


# --- card precision -----------------------------------------------------------------


def card_precision_at_k_by_day(
    event_time_ms: object,
    customer_id: object,
    labels: object,
    scores: object,
    k: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the card precision at k of each UTC day.

    A card (customer id) gets one entry per day: its maximum score that day, and fraud
    if at least one of its transactions that day is fraud. The day's precision is the
    share of fraud cards among its k highest-scored cards. A day with fewer than k cards
    uses all of its cards, so its precision is the share of its cards that had a fraud.
    When cards tied at the k-th highest score do not all fit, each tied card counts
    with the fraction of the remaining places, which is the expected precision under a
    random tie-break.

    Returns the days (days since 1970-01-01, int64) and their precisions (float64), in
    ascending day order. Only days with at least one transaction appear.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise EvaluationInputError(f"k must be a positive integer, got {k!r}")
    times = _as_integers(event_time_ms, "event_time_ms")
    customers = _as_integers(customer_id, "customer_id")
    label_array = _as_labels(labels)
    score_array = _as_scores(scores)
    count = _check_same_length(
        event_time_ms=times, customer_id=customers, labels=label_array, scores=score_array
    )
    if count == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)

    card_day, card_score, card_fraud = _cards_per_day(times, customers, label_array, score_array)

    day_starts = np.flatnonzero(np.r_[True, card_day[1:] != card_day[:-1]])
    day_ends = np.r_[day_starts[1:], len(card_day)]
    precisions = np.empty(len(day_starts), np.float64)
    for i, (start, end) in enumerate(zip(day_starts, day_ends)):
        precisions[i] = _precision_at_k(card_score[start:end], card_fraud[start:end], int(k))
    return card_day[day_starts], precisions


def _cards_per_day(
    times: np.ndarray, customers: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce transactions to (day, card) rows with the max score and label, sorted by day."""
    days = np.floor_divide(times, MS_PER_DAY)
    order = np.lexsort((customers, days))
    days, customers = days[order], customers[order]
    new_card = (days[1:] != days[:-1]) | (customers[1:] != customers[:-1])
    starts = np.flatnonzero(np.r_[True, new_card])
    card_score = np.maximum.reduceat(scores[order], starts)
    card_fraud = np.maximum.reduceat(labels[order], starts)
    return days[starts], card_score, card_fraud


def _precision_at_k(scores: np.ndarray, frauds: np.ndarray, k: int) -> float:
    count = len(scores)
    if count <= k:
        return float(frauds.mean())

    kth_highest = np.partition(scores, count - k)[count - k]
    above = scores > kth_highest
    tied = scores == kth_highest
    places_for_tied = k - int(above.sum())
    hits = frauds[above].sum() + places_for_tied * frauds[tied].sum() / tied.sum()
    return float(hits / k)


def daily_card_precision_at_k(
    event_time_ms: object,
    customer_id: object,
    labels: object,
    scores: object,
    k: int = 100,
) -> float:
    """Compute the card precision at k of each UTC day and return its mean over the days.

    See ``card_precision_at_k_by_day`` for the per-day definition, including days with
    fewer than k cards and ties. Every day with a transaction has equal weight. Returns
    NaN for empty input.
    """
    _, precisions = card_precision_at_k_by_day(event_time_ms, customer_id, labels, scores, k)
    if precisions.size == 0:
        return math.nan
    return float(precisions.mean())


# --- metrics over event-time windows ---------------------------------------------------


def rolling_window_metric(
    event_time_ms: object,
    labels: object,
    scores: object,
    *,
    window_ms: int,
    step_ms: int,
    metric: Callable[[np.ndarray, np.ndarray], float] = average_precision,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute a metric over trailing event-time windows, one window per step.

    Window ends start at the UTC midnight before the earliest event plus one step and
    advance by ``step_ms`` until the first end after the latest event. The window of end
    ``e`` contains the events with ``e - window_ms <= event_time_ms < e``. So the windows
    within ``window_ms`` of the start contain less than a full window of data.

    ``metric`` receives the labels and scores of a window and may return NaN, for
    example average precision on a window without fraud.

    Returns the window ends (Unix ms, int64) and the metric values (float64).
    """
    if window_ms <= 0 or step_ms <= 0:
        raise EvaluationInputError(
            f"window_ms and step_ms must be positive, got {window_ms} and {step_ms}"
        )
    times = _as_integers(event_time_ms, "event_time_ms")
    label_array, score_array = _validate_labels_and_scores(labels, scores)
    _check_same_length(event_time_ms=times, labels=label_array)
    if times.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)

    order = np.argsort(times, kind="stable")
    times, label_array, score_array = times[order], label_array[order], score_array[order]

    origin = (int(times[0]) // MS_PER_DAY) * MS_PER_DAY
    window_count = (int(times[-1]) - origin) // step_ms + 1
    if window_count > MAX_ROLLING_WINDOWS:
        raise EvaluationInputError(
            f"step_ms={step_ms} gives {window_count} windows, more than {MAX_ROLLING_WINDOWS}; "
            "use a larger step"
        )
    ends = origin + step_ms * np.arange(1, window_count + 1, dtype=np.int64)
    firsts = np.searchsorted(times, ends - window_ms, side="left")
    stops = np.searchsorted(times, ends, side="left")

    values = np.empty(window_count, np.float64)
    for i, (first, stop) in enumerate(zip(firsts, stops)):
        values[i] = metric(label_array[first:stop], score_array[first:stop])
    return ends, values


# --- rolling window of judged scores ------------------------------------------------------


class RollingPrequential:
    """The last ``window`` judged (label, score) pairs in a ring buffer, for live metrics.

    ``update`` costs O(batch size) and is cheap enough to call per micro-batch.
    ``auc`` and ``average_precision`` sort the window, O(window log window), so call
    them at a lower rate, for example once per second.
    """

    def __init__(self, window: int = 20_000) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise EvaluationInputError(f"window must be a positive integer, got {window!r}")
        self.window = int(window)
        self._labels = np.zeros(self.window, np.int8)
        self._scores = np.zeros(self.window, np.float64)
        self._next = 0  # ring position of the next write
        self._filled = 0
        self._total = 0

    def update(self, labels: object, scores: object) -> None:
        """Add judged scores, dropping the oldest ones beyond the window."""
        label_array, score_array = _validate_labels_and_scores(labels, scores)
        count = len(label_array)
        self._total += count
        if count >= self.window:
            self._labels[:] = label_array[-self.window :]
            self._scores[:] = score_array[-self.window :]
            self._next = 0
            self._filled = self.window
            return

        # At most two slices: up to the end of the ring, then from its start.
        head = min(count, self.window - self._next)
        self._labels[self._next : self._next + head] = label_array[:head]
        self._scores[self._next : self._next + head] = score_array[:head]
        tail = count - head
        self._labels[:tail] = label_array[head:]
        self._scores[:tail] = score_array[head:]
        self._next = (self._next + count) % self.window
        self._filled = min(self._filled + count, self.window)

    @property
    def count(self) -> int:
        """Number of judged scores in the window."""
        return self._filled

    @property
    def total_count(self) -> int:
        """Number of judged scores passed to ``update`` since creation."""
        return self._total

    def auc(self) -> float:
        """Return the ROC AUC of the window, NaN while it contains a single class."""
        # Until the ring wraps, the scores fill positions 0 .. count-1.
        return _roc_auc_unchecked(self._labels[: self._filled], self._scores[: self._filled])

    def average_precision(self) -> float:
        """Return the average precision of the window, NaN while it contains no fraud."""
        return _average_precision_unchecked(
            self._labels[: self._filled], self._scores[: self._filled]
        )


# --- log of every judged transaction ------------------------------------------------------


def _coerce_log_batch(columns: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Validate one batch of log columns and cast each to its LOG_COLUMNS dtype.

    A scalar (0-d) value is repeated for every row, for example one model_version.
    """
    missing = sorted(LOG_COLUMNS.keys() - columns.keys())
    unknown = sorted(columns.keys() - LOG_COLUMNS.keys())
    if missing or unknown:
        raise EvaluationInputError(
            f"prequential log columns must be exactly {list(LOG_COLUMNS)}; "
            f"missing {missing}, unknown {unknown}"
        )

    raw = {name: np.asarray(columns[name]) for name in LOG_COLUMNS}
    lengths = {name: array.shape[0] for name, array in raw.items() if array.ndim == 1}
    if not lengths:
        raise EvaluationInputError("at least one prequential log column must be a 1-D array")
    if len(set(lengths.values())) > 1:
        raise EvaluationInputError(f"prequential log columns differ in length: {lengths}")
    rows = next(iter(lengths.values()))
    raw = {
        name: np.full(rows, array) if array.ndim == 0 else array for name, array in raw.items()
    }

    return {
        "transaction_id": _as_integers(raw["transaction_id"], "transaction_id"),
        "event_time_ms": _as_integers(raw["event_time_ms"], "event_time_ms"),
        "customer_id": _as_integers(raw["customer_id"], "customer_id"),
        "label": _as_labels(raw["label"], "label"),
        "live_score": _as_scores(raw["live_score"], "live_score", np.float32),
        "source_score": _as_scores(raw["source_score"], "source_score", np.float32),
        "model_version": _as_integers(
            raw["model_version"], "model_version", LOG_COLUMNS["model_version"]
        ),
    }


class PrequentialLog:
    """Columns of every judged transaction, in append order, for reports.

    The columns and dtypes are those of ``LOG_COLUMNS``. Rows are appended in batches into
    chunks of at least ``chunk_rows`` rows, so an append copies only its own batch.
    ``arrays`` joins the chunks into one array per column, O(rows), and keeps the result,
    so repeated calls without appends in between are cheap.
    """

    def __init__(self, chunk_rows: int = 65_536) -> None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise EvaluationInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self._chunk_rows = chunk_rows
        self._sealed: dict[str, list[np.ndarray]] = {name: [] for name in LOG_COLUMNS}
        self._buffer: dict[str, np.ndarray] | None = None
        self._buffer_rows = 0
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def append(self, **columns: object) -> None:
        """Append a batch of judged transactions, one keyword per LOG_COLUMNS column.

        Each column is a 1-D array of the batch length, or a scalar repeated for every row.
        Raises EvaluationInputError, and appends nothing, when a column is missing,
        unknown, of the wrong kind or length, or when a score is not finite.
        """
        batch = _coerce_log_batch(columns)
        rows = len(batch["transaction_id"])
        if rows == 0:
            return

        if self._buffer is None or self._buffer_rows + rows > len(self._buffer["label"]):
            self._seal_buffer()
            capacity = max(self._chunk_rows, rows)
            self._buffer = {name: np.empty(capacity, dtype) for name, dtype in LOG_COLUMNS.items()}
        for name, values in batch.items():
            self._buffer[name][self._buffer_rows : self._buffer_rows + rows] = values
        self._buffer_rows += rows
        self._rows += rows

    def _seal_buffer(self) -> None:
        if self._buffer is not None and self._buffer_rows:
            for name, values in self._buffer.items():
                # The view keeps the whole buffer alive. Its unused tail is smaller than
                # the batch that did not fit, so the memory wasted per chunk is bounded.
                self._sealed[name].append(values[: self._buffer_rows])
        self._buffer = None
        self._buffer_rows = 0

    def arrays(self) -> dict[str, np.ndarray]:
        """Return every column as one read-only array, keyed by column name."""
        self._seal_buffer()
        result = {}
        for name, dtype in LOG_COLUMNS.items():
            chunks = self._sealed[name]
            if len(chunks) != 1 or chunks[0].flags.writeable:
                joined = np.concatenate(chunks) if chunks else np.empty(0, dtype)
                joined.flags.writeable = False
                self._sealed[name] = [joined]
            result[name] = self._sealed[name][0]
        return result

    def window(
        self, start_ms: int | None = None, end_ms: int | None = None
    ) -> dict[str, np.ndarray]:
        """Return copies of the rows with ``start_ms <= event_time_ms < end_ms``.

        None leaves that side of the range open.
        """
        columns = self.arrays()
        times = columns["event_time_ms"]
        selected = np.ones(len(times), dtype=bool)
        if start_ms is not None:
            selected &= times >= start_ms
        if end_ms is not None:
            selected &= times < end_ms
        return {name: values[selected] for name, values in columns.items()}

    def summary(
        self, start_ms: int | None = None, end_ms: int | None = None, *, k: int = 100
    ) -> dict:
        """Compute the metrics of the live and the source scores on an event-time range.

        The range is as in ``window``. Returns ``rows``, ``frauds``, ``k`` and, under
        ``live`` and ``source``, the ``roc_auc``, ``average_precision`` and
        ``card_precision_at_k`` (daily, see ``daily_card_precision_at_k``). A metric is
        NaN where it is undefined, for example with no fraud in the range.

        NOTE: card precision averages over UTC calendar days. A range whose bounds are
        not at midnight UTC has a partial day at each end, which weighs as a full day.
        """
        columns = self.window(start_ms, end_ms)
        result: dict = {
            "rows": len(columns["label"]),
            "frauds": int(columns["label"].sum()),
            "k": k,
        }
        for side in ("live", "source"):
            scores = columns[f"{side}_score"]
            result[side] = {
                "roc_auc": roc_auc(columns["label"], scores),
                "average_precision": average_precision(columns["label"], scores),
                "card_precision_at_k": daily_card_precision_at_k(
                    columns["event_time_ms"], columns["customer_id"], columns["label"], scores, k
                ),
            }
        return result

    def save(self, path: str | os.PathLike) -> Path:
        """Write the log to ``path`` as an uncompressed .npz archive and return the path.

        The file is written to a temporary file beside ``path``, flushed to disk and
        renamed over ``path``, so a reader never sees a partial file. ``path`` is used
        as given, without adding ``.npz``.
        """
        target = Path(path)
        columns = self.arrays()
        write_atomically(
            target, lambda file: np.savez(file, format_version=np.array(LOG_FORMAT_VERSION), **columns)
        )
        logger.info("saved prequential log path=%s rows=%d", target, self._rows)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, *, chunk_rows: int = 65_536) -> PrequentialLog:
        """Read a log written by ``save``. Object arrays (pickles) are never loaded."""
        source = Path(path)
        columns = _read_log_archive(source)
        log = cls(chunk_rows=chunk_rows)
        for name, values in columns.items():
            values.flags.writeable = False
            log._sealed[name] = [values]
        log._rows = len(columns["label"])
        logger.info("loaded prequential log path=%s rows=%d", source, log._rows)
        return log


def _read_log_archive(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise PrequentialLogError(
            f"prequential log not found: {path}; "
            "check the path, or write the log with PrequentialLog.save"
        ) from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PrequentialLogError(f"cannot read prequential log {path}: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PrequentialLogError(
            f"prequential log {path} is a single .npy array, not an .npz archive"
        )

    with archive:
        names = set(archive.files)
        expected = set(LOG_COLUMNS) | {"format_version"}
        if not expected <= names:
            raise PrequentialLogError(
                f"prequential log {path} is missing the arrays {sorted(expected - names)}, "
                "so it was not written by PrequentialLog.save"
            )
        try:
            version = archive["format_version"]
            columns = {name: archive[name] for name in LOG_COLUMNS}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise PrequentialLogError(f"cannot read prequential log {path}: {exc}") from exc

    if (
        version.shape != ()
        or not np.issubdtype(version.dtype, np.integer)
        or int(version) != LOG_FORMAT_VERSION
    ):
        raise PrequentialLogError(
            f"prequential log {path} has format version {version!r}, expected {LOG_FORMAT_VERSION}"
        )
    for name, dtype in LOG_COLUMNS.items():
        if columns[name].dtype != dtype or columns[name].ndim != 1:
            raise PrequentialLogError(
                f"prequential log {path}: column {name} is {columns[name].dtype} "
                f"with shape {columns[name].shape}, expected 1-D {dtype}"
            )
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise PrequentialLogError(f"prequential log {path}: columns differ in length: {lengths}")
    return columns
