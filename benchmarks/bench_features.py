"""Measure FeatureState throughput on the fraud-handbook transactions.

Replays the transactions as a stream in which each fraud label arrives 7 days after its
transaction. Each batch contains ``--batch-size`` transactions and the labels that arrive
among them, and its labels are applied first, as the updater does. State is pruned every
``--prune-interval-days`` of event time. A prune costs time in proportion to the number of
keys (about 15,000 here), and the handbook data has only about 9,600 transactions a day,
so a short interval adds a visible share. The timed part is observe_labels +
transform_transactions + prune. Reading the CSV and cutting batches are not timed.
Prints transactions/s and microseconds per transaction (wall clock), the median of
``--runs`` runs for each batch size, and the median CPU time of the process, which is
less disturbed by other load on a shared machine.

Usage::

    python benchmarks/bench_features.py --months 2018-04 2018-05 --batch-sizes 500 1000 5000
"""

from __future__ import annotations

import argparse
import csv
import gzip
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.features import DAY_MS, FeatureState

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fraud-handbook"
LABEL_DELAY_MS = 7 * DAY_MS


@dataclass
class Batch:
    """One batch of the replayed stream: its labels, then its transactions."""

    label_time_ms: np.ndarray
    label_terminal_id: np.ndarray
    label: np.ndarray
    event_time_ms: np.ndarray
    customer_id: np.ndarray
    terminal_id: np.ndarray
    amount: np.ndarray


def read_transactions(data_dir: Path, months: list[str]) -> dict[str, np.ndarray]:
    """Read whole months of handbook transactions into column arrays (times as UTC ms)."""
    columns: dict[str, list[str]] = {
        "tx_datetime": [],
        "customer_id": [],
        "terminal_id": [],
        "tx_amount": [],
        "tx_fraud": [],
    }
    for month in months:
        with gzip.open(data_dir / f"transactions-{month}.csv.gz", "rt", newline="") as file:
            for row in csv.DictReader(file):
                for name, values in columns.items():
                    values.append(row[name])
    return {
        "time": np.array(columns["tx_datetime"], dtype="datetime64[ms]").astype(np.int64),
        "customer": np.array(columns["customer_id"], dtype=np.int64),
        "terminal": np.array(columns["terminal_id"], dtype=np.int64),
        "amount": np.array(columns["tx_amount"], dtype=np.float64),
        "fraud": np.array(columns["tx_fraud"], dtype=np.int64),
    }


def cut_batches(data: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    """Merge transactions and their labels into one stream and cut it into batches.

    A label arrives at its transaction's time + 7 days, before transactions of equal time.
    Each batch ends after ``batch_size`` transactions.
    """
    count = len(data["time"])
    label_arrival = data["time"] + LABEL_DELAY_MS
    # Stream position of transaction i among all events, labels first at equal times.
    arrival_times = np.concatenate([label_arrival, data["time"]])
    kinds = np.concatenate([np.zeros(count, np.int8), np.ones(count, np.int8)])
    order = np.lexsort((np.tile(np.arange(count), 2), kinds, arrival_times))
    is_transaction = order >= count
    source_row = np.where(is_transaction, order - count, order)

    batches = []
    transaction_positions = np.flatnonzero(is_transaction)
    ends = transaction_positions[batch_size - 1 :: batch_size] + 1
    if len(ends) == 0 or ends[-1] != transaction_positions[-1] + 1:
        ends = np.append(ends, transaction_positions[-1] + 1)
    start = 0
    for end in ends.tolist():
        rows = source_row[start:end]
        kinds_in_batch = is_transaction[start:end]
        labels, transactions = rows[~kinds_in_batch], rows[kinds_in_batch]
        batches.append(
            Batch(
                label_time_ms=data["time"][labels],
                label_terminal_id=data["terminal"][labels],
                label=data["fraud"][labels],
                event_time_ms=data["time"][transactions],
                customer_id=data["customer"][transactions],
                terminal_id=data["terminal"][transactions],
                amount=data["amount"][transactions],
            )
        )
        start = end
    return batches


def replay(batches: list[Batch], prune_interval_ms: int) -> tuple[float, float, FeatureState]:
    """Run one replay and return its wall and CPU time in seconds and the final state."""
    state = FeatureState()
    next_prune_ms = int(batches[0].event_time_ms[0]) + prune_interval_ms
    started = time.perf_counter()
    cpu_started = time.process_time()
    for batch in batches:
        state.observe_labels(batch.label_time_ms, batch.label_terminal_id, batch.label)
        state.transform_transactions(
            batch.event_time_ms, batch.customer_id, batch.terminal_id, batch.amount
        )
        watermark = int(batch.event_time_ms[-1])
        if watermark >= next_prune_ms:
            state.prune(watermark)
            next_prune_ms = watermark + prune_interval_ms
    return time.perf_counter() - started, time.process_time() - cpu_started, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder with transactions-YYYY-MM.csv.gz files",
    )
    parser.add_argument(
        "--months", nargs="+", default=["2018-04", "2018-05"], help="months to replay, as YYYY-MM"
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[500, 1000, 5000],
        help="transactions per batch, one measurement each",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="runs per batch size, of which the median is printed"
    )
    parser.add_argument(
        "--prune-interval-days",
        type=float,
        default=7.0,
        help="event time between two prune calls, in days",
    )
    args = parser.parse_args()

    data = read_transactions(args.data_dir, args.months)
    count = len(data["time"])
    prune_interval_ms = round(args.prune_interval_days * DAY_MS)
    print(
        f"transactions: {count} ({', '.join(args.months)}), labels arrive 7 days later, "
        f"prune every {args.prune_interval_days:g} days of event time, {args.runs} runs"
    )
    print(
        f"{'batch':>6} {'transactions/s':>15} {'us/transaction':>15} {'min us':>8} "
        f"{'max us':>8} {'cpu us':>8} {'entries':>9}"
    )
    for batch_size in args.batch_sizes:
        batches = cut_batches(data, batch_size)
        wall_us, cpu_us = [], []
        for _ in range(args.runs):
            wall_seconds, cpu_seconds, state = replay(batches, prune_interval_ms)
            wall_us.append(wall_seconds / count * 1e6)
            cpu_us.append(cpu_seconds / count * 1e6)
        median = statistics.median(wall_us)
        print(
            f"{batch_size:>6} {1e6 / median:>15,.0f} {median:>15.3f} {min(wall_us):>8.3f} "
            f"{max(wall_us):>8.3f} {statistics.median(cpu_us):>8.3f} {state.num_entries:>9}"
        )


if __name__ == "__main__":
    main()
