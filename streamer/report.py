"""The demo's final report: plain-text tables and a chart of rolling average precision.

The tables compare the live fine-tuned model with the frozen source model on the
metrics of ``PrequentialLog.summary`` and list the run's counts. The chart shows the
average precision of both models over trailing event-time windows.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.dates as mdates
import numpy as np

# The Agg canvas is attached to each figure directly, and pyplot is never imported, so
# the chart needs no display and leaves the process's matplotlib backend as it was.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomicfile import write_atomically
from .errors import StreamerError
from .evaluation import MS_PER_DAY, average_precision, rolling_window_metric

logger = logging.getLogger(__name__)

MISSING_VALUE = "n/a"
METRIC_TABLE_HEADERS = ("metric", "live fine-tuned", "frozen source")
# Columns of a prequential log that the chart reads.
CHART_COLUMNS = ("event_time_ms", "label", "live_score", "source_score")


class ReportError(StreamerError):
    """A report table or chart cannot be built from the given data."""


def format_cell(value: object, digits: int = 4) -> str:
    """Format one table cell.

    Integers get thousands separators, floats get ``digits`` decimals, NaN and None
    become ``n/a`` and strings are kept as they are.
    """
    if value is None:
        return MISSING_VALUE
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return MISSING_VALUE
        return f"{float(value):.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 4) -> str:
    """Format rows as a plain-text table with a header line and a dashed rule.

    The first column is left-aligned and the others are right-aligned, two spaces apart.
    Cells are formatted by ``format_cell``. Every line has the same width.
    """
    width = len(headers)
    cells = [[format_cell(header) for header in headers]]
    for row in rows:
        if len(row) != width:
            raise ReportError(f"table row {row!r} has {len(row)} cells, expected {width}")
        cells.append([format_cell(value, digits) for value in row])
    for line in cells:
        for cell in line:
            if "\n" in cell or "\r" in cell:
                raise ReportError(f"table cell {cell!r} contains a line break")

    widths = [max(len(line[column]) for line in cells) for column in range(width)]
    rule = ["-" * column_width for column_width in widths]
    lines = [_join_cells(line, widths) for line in (cells[0], rule, *cells[1:])]
    return "\n".join(lines)


def _join_cells(cells: Sequence[str], widths: Sequence[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = [cell.rjust(column_width) for cell, column_width in zip(cells[1:], widths[1:])]
    return "  ".join([first, *rest])


def format_key_value_table(
    rows: Sequence[tuple[str, object]], headers: tuple[str, str] = ("quantity", "value")
) -> str:
    """Format (name, value) pairs, such as the run's counts, as a two-column table."""
    return format_table(headers, rows)


def format_metric_table(
    rows: Sequence[tuple[str, object, object]],
    headers: tuple[str, str, str] = METRIC_TABLE_HEADERS,
    digits: int = 4,
) -> str:
    """Format (metric, live value, source value) rows as a three-column table."""
    return format_table(headers, rows, digits)


def metric_rows(summary: Mapping) -> list[tuple[str, float, float]]:
    """Build the metric table's rows from the dictionary of ``PrequentialLog.summary``."""
    try:
        live, source, k = summary["live"], summary["source"], summary["k"]
        return [
            ("ROC AUC", live["roc_auc"], source["roc_auc"]),
            ("average precision", live["average_precision"], source["average_precision"]),
            (
                f"daily card precision@{k}",
                live["card_precision_at_k"],
                source["card_precision_at_k"],
            ),
        ]
    except (KeyError, TypeError) as exc:
        raise ReportError(
            f"summary lacks {exc}; pass the dictionary returned by PrequentialLog.summary"
        ) from exc


def _chart_columns(log_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [name for name in CHART_COLUMNS if name not in log_arrays]
    if missing:
        raise ReportError(
            f"log arrays miss the columns {missing}; pass PrequentialLog.arrays()"
        )
    columns = {name: np.asarray(log_arrays[name]) for name in CHART_COLUMNS}
    if columns["label"].size == 0:
        raise ReportError("the prequential log is empty, so there is no judged score to plot")
    return columns


def _fraud_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(labels.mean()) if labels.size else math.nan


def plot_rolling_average_precision(
    log_arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    window_days: float = 7,
    step_days: float = 1,
    title: str | None = None,
) -> Path:
    """Draw the rolling average precision of the live and the source scores as a PNG.

    Each point is the average precision over the trailing ``window_days`` of event time,
    evaluated every ``step_days``, as computed by ``rolling_window_metric``. The points
    within ``window_days`` of the stream's start cover less than a full window. A window
    without fraud has no average precision and leaves a gap. The fraud rate of each
    window is drawn too, because it is the average precision of a random score.

    ``log_arrays`` contains the columns of ``PrequentialLog.arrays()``. The PNG is written
    to a temporary file beside ``path`` and renamed over it. Returns the path.
    """
    if not window_days > 0 or not step_days > 0:
        raise ReportError(
            f"window_days and step_days must be positive, got {window_days} and {step_days}"
        )
    columns = _chart_columns(log_arrays)
    window_ms = int(round(window_days * MS_PER_DAY))
    step_ms = int(round(step_days * MS_PER_DAY))

    series = {}
    for name, scores, metric in (
        ("live", columns["live_score"], average_precision),
        ("source", columns["source_score"], average_precision),
        ("fraud rate", columns["live_score"], _fraud_rate),
    ):
        ends, values = rolling_window_metric(
            columns["event_time_ms"],
            columns["label"],
            scores,
            window_ms=window_ms,
            step_ms=step_ms,
            metric=metric,
        )
        series[name] = values
    dates = ends.astype("datetime64[ms]")

    figure = _draw_chart(dates, series, window_days, title)
    target = _write_png_atomically(figure, Path(path))
    logger.info("wrote rolling average precision chart path=%s points=%d", target, len(dates))
    return target


def _draw_chart(
    dates: np.ndarray, series: Mapping[str, np.ndarray], window_days: float, title: str | None
) -> Figure:
    figure = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(dates, series["live"], marker=".", label="live fine-tuned model")
    axes.plot(dates, series["source"], marker=".", label="frozen source model")
    axes.plot(
        dates,
        series["fraud rate"],
        linestyle=":",
        color="grey",
        label="fraud rate (average precision of a random score)",
    )

    locator = mdates.AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes.set_xlabel(f"event time (UTC), end of the trailing {window_days:g}-day window")
    axes.set_ylabel("average precision")
    axes.set_ylim(bottom=0)
    axes.set_title(
        title or f"Prequential average precision over a trailing {window_days:g}-day window"
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    return figure


def _write_png_atomically(figure: Figure, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(target, lambda file: figure.savefig(file, format="png"))
