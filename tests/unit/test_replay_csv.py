"""CSV reading, event-time filter and merge order of the replay, without a broker."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import logging
from pathlib import Path

import pytest

from streamer.errors import ConfigurationError
from streamer.replay import (
    DAY_MS,
    LABEL,
    TRANSACTION,
    ReplayStats,
    Transaction,
    add_arguments,
    format_progress,
    merge_events,
    read_transactions,
    replay,
    run,
    to_event_time_ms,
)
from streamer.settings import Settings, Topics

HEADER = "transaction_id,tx_datetime,customer_id,terminal_id,tx_amount,tx_fraud,tx_fraud_scenario\n"
ROWS = (
    "1,2018-07-01T00:00:00,10,100,5.50,0,0\n"
    "2,2018-07-01T12:30:00,11,101,250.00,1,1\n"
    "3,2018-07-02T00:00:00,10,102,7.25,0,0\n"
)
# 2018-07-01T00:00:00Z in Unix milliseconds.
JULY_1_MS = 1_530_403_200_000
# A port on which nothing listens: the tests below must fail before connecting.
UNUSED_BOOTSTRAP = "127.0.0.1:1"


def write_csv(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", newline="") as handle:
            handle.write(text)
    else:
        path.write_text(text, newline="")
    return path


def tx(transaction_id: int, time_ms: int, customer_id: int = 1) -> Transaction:
    return Transaction(transaction_id, time_ms, customer_id, 0, 1.0, 0)


def test_read_transactions_plain_csv(tmp_path):
    path = write_csv(tmp_path / "july.csv", HEADER + ROWS)
    rows = list(read_transactions([path]))
    assert rows[0] == Transaction(1, JULY_1_MS, 10, 100, 5.5, 0)
    assert [row.transaction_id for row in rows] == [1, 2, 3]


def test_read_transactions_gzip_equals_plain(tmp_path):
    plain = write_csv(tmp_path / "july.csv", HEADER + ROWS)
    packed = write_csv(tmp_path / "july.csv.gz", HEADER + ROWS)
    assert list(read_transactions([packed])) == list(read_transactions([plain]))


def test_read_transactions_files_in_given_order(tmp_path):
    august = write_csv(tmp_path / "a.csv", HEADER + "9,2018-08-01T00:00:00,1,1,1.00,0,0\n")
    july = write_csv(tmp_path / "b.csv.gz", HEADER + ROWS)
    ids = [row.transaction_id for row in read_transactions([august, july])]
    assert ids == [9, 1, 2, 3]


def test_read_transactions_folder_in_name_order(tmp_path):
    write_csv(tmp_path / "2-later.csv", HEADER + "9,2018-08-01T00:00:00,1,1,1.00,0,0\n")
    write_csv(tmp_path / "1-first.csv.gz", HEADER + ROWS)
    (tmp_path / "notes.txt").write_text("not a CSV file")
    ids = [row.transaction_id for row in read_transactions([tmp_path])]
    assert ids == [1, 2, 3, 9]


def test_read_transactions_ignores_extra_and_reordered_columns(tmp_path):
    text = "note,tx_fraud,tx_amount,terminal_id,customer_id,tx_datetime,transaction_id\nx,1,3.00,7,8,2018-07-01T00:00:00,5\n"
    path = write_csv(tmp_path / "odd.csv", text)
    assert list(read_transactions([path])) == [Transaction(5, JULY_1_MS, 8, 7, 3.0, 1)]


def test_read_transactions_missing_column_names_file(tmp_path):
    path = write_csv(tmp_path / "broken.csv", "transaction_id,tx_datetime,customer_id,tx_amount,tx_fraud\n")
    with pytest.raises(ConfigurationError) as error:
        list(read_transactions([path]))
    assert "broken.csv" in str(error.value)
    assert "terminal_id" in str(error.value)


def test_read_transactions_empty_file_rejected(tmp_path):
    path = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(ConfigurationError, match="empty.csv"):
        list(read_transactions([path]))


def test_read_transactions_invalid_row_names_line(tmp_path):
    path = write_csv(tmp_path / "bad.csv", HEADER + ROWS + "4,yesterday,1,1,1.00,0,0\n")
    with pytest.raises(ConfigurationError) as error:
        list(read_transactions([path]))
    assert "bad.csv, line 5" in str(error.value)


def test_read_transactions_missing_file_rejected(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        list(read_transactions([tmp_path / "absent.csv"]))


def test_read_transactions_start_inclusive_end_exclusive(tmp_path):
    path = write_csv(tmp_path / "july.csv", HEADER + ROWS)
    rows = read_transactions([path], start="2018-07-01T12:30:00", end="2018-07-02")
    assert [row.transaction_id for row in rows] == [2]


def test_read_transactions_zone_offset_respected(tmp_path):
    path = write_csv(tmp_path / "zoned.csv", HEADER + "1,2018-07-01T02:00:00+02:00,1,1,1.00,0,0\n")
    assert next(read_transactions([path])).event_time_ms == JULY_1_MS


def test_read_transactions_handbook_july(handbook_dir):
    rows = [row for _, row in zip(range(1000), read_transactions([handbook_dir / "transactions-2018-07.csv.gz"]))]
    times = [row.event_time_ms for row in rows]
    assert len(rows) == 1000
    assert times == sorted(times)
    assert JULY_1_MS <= times[0] < JULY_1_MS + DAY_MS


def test_to_event_time_ms_date_is_utc_midnight():
    assert to_event_time_ms("2018-07-01") == JULY_1_MS


def test_to_event_time_ms_invalid_names_option():
    with pytest.raises(ConfigurationError, match="start"):
        to_event_time_ms("July", name="start")


def test_merge_events_label_after_delay():
    events = list(merge_events([tx(1, 1000)], label_delay_ms=500))
    assert events == [(1000, TRANSACTION, tx(1, 1000)), (1500, LABEL, tx(1, 1000))]


def test_merge_events_label_before_transaction_at_equal_time():
    events = list(merge_events([tx(1, 1000), tx(2, 1500)], label_delay_ms=500))
    kinds = [(time_ms, kind, t.transaction_id) for time_ms, kind, t in events]
    assert kinds == [(1000, TRANSACTION, 1), (1500, LABEL, 1), (1500, TRANSACTION, 2), (2000, LABEL, 2)]


def test_merge_events_pending_labels_after_last_transaction():
    events = list(merge_events([tx(1, 0), tx(2, 10), tx(3, 20)], label_delay_ms=1000))
    kinds = [kind for _, kind, _ in events]
    assert kinds == [TRANSACTION] * 3 + [LABEL] * 3


def test_merge_events_output_in_time_order():
    transactions = [tx(i, i * 700) for i in range(50)]
    times = [time_ms for time_ms, _, _ in merge_events(transactions, label_delay_ms=2000)]
    assert times == sorted(times)


def test_merge_events_one_label_per_transaction():
    transactions = [tx(i, i * 10) for i in range(20)]
    labelled = [t.transaction_id for _, kind, t in merge_events(transactions, label_delay_ms=35) if kind == LABEL]
    assert labelled == list(range(20))


def test_merge_events_zero_delay_label_follows_its_transaction():
    events = list(merge_events([tx(1, 100), tx(2, 100)], label_delay_ms=0))
    kinds = [(kind, t.transaction_id) for _, kind, t in events]
    assert kinds == [(TRANSACTION, 1), (LABEL, 1), (TRANSACTION, 2), (LABEL, 2)]


def test_merge_events_unsorted_input_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="streamer.replay"):
        list(merge_events([tx(1, 500), tx(2, 100)], label_delay_ms=10))
    assert "not sorted by time" in caplog.text


def test_replay_missing_column_fails_before_connecting(tmp_path):
    path = write_csv(tmp_path / "broken.csv", "transaction_id,tx_datetime\n")
    with pytest.raises(ConfigurationError, match="broken.csv"):
        asyncio.run(replay([path], bootstrap=UNUSED_BOOTSTRAP, topics=Topics(), progress=None))


@pytest.mark.parametrize("option", [{"speedup": 0.0}, {"label_delay_days": -1.0}, {"limit": -1}])
def test_replay_invalid_option_rejected(tmp_path, option):
    path = write_csv(tmp_path / "july.csv", HEADER + ROWS)
    with pytest.raises(ConfigurationError):
        asyncio.run(replay([path], bootstrap=UNUSED_BOOTSTRAP, topics=Topics(), progress=None, **option))


def test_format_progress_contains_counts_and_event_time():
    line = format_progress(ReplayStats(transactions=1500, labels=500, seconds=2.0, last_event_time_ms=JULY_1_MS))
    assert "2,000 events" in line
    assert "1,000 events/s" in line
    assert "2018-07-01 00:00:00" in line


def test_add_arguments_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["july.csv.gz"])
    assert args.files == [Path("july.csv.gz")]
    assert args.label_delay_days == 7.0
    assert args.speedup is None


def test_run_without_bootstrap_rejected(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(write_csv(tmp_path / "july.csv", HEADER + ROWS))])
    with pytest.raises(ConfigurationError, match="STREAMER_KAFKA_BOOTSTRAP"):
        run(args, Settings())
