"""Unit tests of the report tables and the rolling average precision chart."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest

from streamer.errors import StreamerError
from streamer.evaluation import MS_PER_DAY, PrequentialLog
from streamer.report import (
    ReportError,
    format_cell,
    format_key_value_table,
    format_metric_table,
    format_table,
    metric_rows,
    plot_rolling_average_precision,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
START_MS = 1_522_540_800_000  # 2018-04-01T00:00:00Z


def synthetic_log_arrays(days: int = 20, rows_per_day: int = 400) -> dict[str, np.ndarray]:
    """Build prequential log columns where the live score separates frauds better."""
    rng = np.random.default_rng(8)
    rows = days * rows_per_day
    labels = (rng.random(rows) < 0.05).astype(np.int8)
    log = PrequentialLog()
    log.append(
        transaction_id=np.arange(rows),
        event_time_ms=START_MS + np.sort(rng.integers(0, days * MS_PER_DAY, rows)),
        customer_id=rng.integers(0, 300, rows),
        label=labels,
        live_score=(rng.random(rows) + 1.5 * labels).astype(np.float32),
        source_score=(rng.random(rows) + 0.3 * labels).astype(np.float32),
        model_version=1,
    )
    return log.arrays()


# --- tables ---------------------------------------------------------------------------


def test_metric_table_contains_values():
    table = format_metric_table(
        [("ROC AUC", 0.91234, 0.85), ("average precision", 0.5, 0.25)]
    )

    assert "0.9123" in table
    assert "0.8500" in table
    assert "0.5000" in table
    assert "0.2500" in table
    assert "average precision" in table


def test_metric_table_has_headers_and_rule():
    lines = format_metric_table([("ROC AUC", 0.9, 0.8)]).splitlines()

    assert lines[0].split("  ")[0].strip() == "metric"
    assert "live fine-tuned" in lines[0]
    assert "frozen source" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}


def test_metric_table_lines_have_equal_width():
    table = format_metric_table(
        [("ROC AUC", 0.9, 0.8), ("daily card precision@100", 0.25, float("nan"))]
    )

    assert len({len(line) for line in table.splitlines()}) == 1


def test_metric_table_right_aligns_numbers():
    lines = format_metric_table([("a", 0.5, 0.25), ("longer metric", 12.5, 1.0)]).splitlines()

    assert lines[2].endswith("0.2500")
    assert lines[3].endswith("1.0000")
    assert lines[2].index("0.5000") == lines[3].index("12.5000") + 1


def test_metric_table_nan_shows_missing():
    table = format_metric_table([("ROC AUC", float("nan"), 0.8)])

    assert "n/a" in table
    assert "nan" not in table


def test_metric_table_digits_option():
    assert "0.912" in format_metric_table([("ROC AUC", 0.91234, 0.8)], digits=3)
    assert "0.9123" not in format_metric_table([("ROC AUC", 0.91234, 0.8)], digits=3)


def test_key_value_table_contains_counts():
    table = format_key_value_table(
        [
            ("events", 1_466_282),
            ("labels", np.int64(1_400_000)),
            ("snapshots published", 40),
            ("snapshots served", "38"),
        ]
    )

    assert "1,466,282" in table
    assert "1,400,000" in table
    assert "snapshots published" in table
    assert table.splitlines()[-1].endswith("38")


def test_table_rejects_row_of_wrong_width():
    with pytest.raises(ReportError, match="has 2 cells, expected 3"):
        format_table(("metric", "live", "source"), [("ROC AUC", 0.9)])


def test_table_rejects_line_break_in_cell():
    with pytest.raises(ReportError, match="line break"):
        format_key_value_table([("events\nlabels", 3)])


def test_report_error_is_streamer_error():
    assert issubclass(ReportError, StreamerError)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "n/a"),
        ("text", "text"),
        (True, "True"),
        (1234, "1,234"),
        (np.int32(-5), "-5"),
        (0.5, "0.5000"),
        (np.float32(0.25), "0.2500"),
        (float("nan"), "n/a"),
    ],
)
def test_format_cell_cases(value, expected):
    assert format_cell(value) == expected


def test_metric_rows_from_summary():
    summary = {
        "rows": 10,
        "frauds": 2,
        "k": 100,
        "live": {"roc_auc": 0.9, "average_precision": 0.6, "card_precision_at_k": 0.3},
        "source": {"roc_auc": 0.8, "average_precision": 0.4, "card_precision_at_k": 0.2},
    }

    rows = metric_rows(summary)

    assert rows == [
        ("ROC AUC", 0.9, 0.8),
        ("average precision", 0.6, 0.4),
        ("daily card precision@100", 0.3, 0.2),
    ]


def test_metric_rows_from_log_summary_format():
    log = PrequentialLog()
    log.append(
        transaction_id=[1, 2, 3],
        event_time_ms=[START_MS, START_MS + 1, START_MS + 2],
        customer_id=[1, 2, 3],
        label=[0, 1, 0],
        live_score=[0.1, 0.9, 0.2],
        source_score=[0.3, 0.2, 0.1],
        model_version=1,
    )

    table = format_metric_table(metric_rows(log.summary()))

    # Live ranks the fraud first; source ranks it second of three.
    assert "1.0000" in table
    assert "0.5000" in table
    assert "0.3333" in table
    assert "daily card precision@100" in table


def test_metric_rows_rejects_incomplete_summary():
    with pytest.raises(ReportError, match="PrequentialLog.summary"):
        metric_rows({"live": {}, "source": {}, "k": 100})


# --- chart ------------------------------------------------------------------------------


def test_chart_is_valid_png(tmp_path):
    path = tmp_path / "reports" / "rolling-ap.png"

    written = plot_rolling_average_precision(synthetic_log_arrays(), path)

    assert written == path
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE)
    # With matplotlib 3.11 this chart is about 50 kB, bare axes of the same size about
    # 9 kB and an empty figure about 3 kB.
    assert len(content) > 20_000


def test_chart_has_expected_pixel_size(tmp_path):
    path = plot_rolling_average_precision(synthetic_log_arrays(), tmp_path / "ap.png")

    pixels = matplotlib.image.imread(path)

    assert pixels.shape[:2] == (500, 1000)


def test_chart_leaves_no_temporary_file(tmp_path):
    plot_rolling_average_precision(synthetic_log_arrays(), tmp_path / "ap.png")

    assert [entry.name for entry in tmp_path.iterdir()] == ["ap.png"]


def test_chart_replaces_existing_file(tmp_path):
    path = tmp_path / "ap.png"
    path.write_bytes(b"old")

    plot_rolling_average_precision(
        synthetic_log_arrays(days=5), path, window_days=2, step_days=0.5, title="short run"
    )

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_chart_accepts_window_without_fraud(tmp_path):
    arrays = dict(synthetic_log_arrays(days=6))
    labels = arrays["label"].copy()
    labels[arrays["event_time_ms"] < START_MS + 3 * MS_PER_DAY] = 0
    arrays["label"] = labels

    path = plot_rolling_average_precision(arrays, tmp_path / "ap.png", window_days=1)

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_chart_rejects_missing_column(tmp_path):
    arrays = dict(synthetic_log_arrays(days=2))
    del arrays["source_score"]

    with pytest.raises(ReportError, match="source_score"):
        plot_rolling_average_precision(arrays, tmp_path / "ap.png")


def test_chart_rejects_empty_log(tmp_path):
    with pytest.raises(ReportError, match="empty"):
        plot_rolling_average_precision(PrequentialLog().arrays(), tmp_path / "ap.png")

    assert not (tmp_path / "ap.png").exists()


@pytest.mark.parametrize("window_days, step_days", [(0, 1), (7, 0), (-1, 1), (math.nan, 1)])
def test_chart_rejects_invalid_window(tmp_path, window_days, step_days):
    with pytest.raises(ReportError, match="must be positive"):
        plot_rolling_average_precision(
            synthetic_log_arrays(days=2),
            tmp_path / "ap.png",
            window_days=window_days,
            step_days=step_days,
        )
