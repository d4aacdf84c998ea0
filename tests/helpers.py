"""Shared test helpers: reading the fraud-handbook transactions into column arrays."""

from __future__ import annotations

import csv
import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.features import FEATURE_NAMES, FeatureState
from streamer.model import FraudMLP, ScoreModule
from streamer.replay import Transaction

# CI clones the repository into a folder with shared/ beside it, as on developer machines.
HANDBOOK_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fraud-handbook"


@dataclass(frozen=True)
class HandbookTransactions:
    """Column arrays of handbook transactions, in file order (sorted by event time)."""

    transaction_id: np.ndarray  # int64
    event_time_ms: np.ndarray  # int64, Unix milliseconds, UTC
    customer_id: np.ndarray  # int64
    terminal_id: np.ndarray  # int64
    amount: np.ndarray  # float64
    fraud: np.ndarray  # int64, 1 fraudulent, 0 genuine

    def __len__(self) -> int:
        return len(self.transaction_id)


@functools.lru_cache(maxsize=4)
def read_handbook_transactions(months: tuple[str, ...], before: str) -> HandbookTransactions:
    """Read the transactions of ``months`` (like ``"2018-04"``) with tx_datetime before ``before``.

    ``before`` is an ISO 8601 prefix such as ``"2018-05-11"``. Rows are sorted by
    tx_datetime, so reading a file stops at the first row at or after it. Times have no
    zone in the files and are read as UTC. Results are cached, so callers must not modify
    the arrays.
    """
    columns: dict[str, list[str]] = {name: [] for name in _COLUMNS}
    for month in months:
        with gzip.open(HANDBOOK_DIR / f"transactions-{month}.csv.gz", "rt", newline="") as file:
            reader = csv.DictReader(file)
            for row in reader:
                if row["tx_datetime"] >= before:
                    break
                for name in _COLUMNS:
                    columns[name].append(row[name])

    event_time = np.array(columns["tx_datetime"], dtype="datetime64[ms]")
    return HandbookTransactions(
        transaction_id=np.array(columns["transaction_id"], dtype=np.int64),
        event_time_ms=event_time.astype(np.int64),
        customer_id=np.array(columns["customer_id"], dtype=np.int64),
        terminal_id=np.array(columns["terminal_id"], dtype=np.int64),
        amount=np.array(columns["tx_amount"], dtype=np.float64),
        fraud=np.array(columns["tx_fraud"], dtype=np.int64),
    )


_COLUMNS = ("transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud")


async def read_topic(settings, topic: str, partitions: int, timeout_seconds: float = 60.0) -> list:
    """Read every record of a topic, from the beginning to its end offsets, without a consumer group."""
    import time

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streamer.kafka import consumer_kwargs, end_offsets

    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends = await end_offsets(settings, tps)
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=None))
    await consumer.start()
    records: list = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_seconds
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end offsets {ends} timed out")
            for part in (await consumer.getmany(timeout_ms=200)).values():
                records += part
    finally:
        await consumer.stop()
    return records


# Grafana's own variables in the dashboard queries, and what a query sent straight to
# Prometheus uses instead. A 1m range contains at least two samples at Prometheus's default 15 s
# scrape interval, so rate() has a value.
GRAFANA_QUERY_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m"}


def panel_queries(dashboard: dict) -> list[str]:
    """Return the PromQL expression of every panel target, Grafana variables replaced.

    Rows with nested panels are included. The result can be sent to Prometheus's
    /api/v1/query as is.
    """
    queries = []
    for panel in _all_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            for variable, value in GRAFANA_QUERY_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(expr)
    return queries


def _all_panels(panels: list[dict]) -> list[dict]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _all_panels(panel.get("panels", []))
    return found


@dataclass
class Record:
    """The fields of an aiokafka ConsumerRecord that the pipeline, the worker state and the decoders read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def offline_features(rows: list[Transaction]) -> np.ndarray:
    """Compute the features of ``rows`` in file order from an empty state, as a worker without a source model does."""
    return FeatureState().transform_transactions(
        np.array([r.event_time_ms for r in rows]), np.array([r.customer_id for r in rows]),
        np.array([r.terminal_id for r in rows]), np.array([r.amount for r in rows]),
    )


def build_model(seed: int, features: np.ndarray) -> ScoreModule:
    """Build an untrained MLP normalised on real features; different seeds give models that score differently."""
    torch.manual_seed(seed)
    model = FraudMLP(len(FEATURE_NAMES))
    model.set_normalisation(torch.from_numpy(features.mean(axis=0)), torch.from_numpy(features.std(axis=0)))
    return ScoreModule(model.eval())
