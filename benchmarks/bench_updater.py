"""Benchmark the updater: pipeline alone, and Kafka to trained model, against a raw consume loop.

Prints transactions/s (each transaction comes with its label, so events/s is twice that).
Usage: python benchmarks/bench_updater.py [--transactions N] [--repeats R] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import platform
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fraud-handbook"
sys.path.insert(0, str(REPO))

from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.dataset import DAY_MS, load_transactions  # noqa: E402
from streamer.events import label_event, transaction_event  # noqa: E402
from streamer.kafka import consumer_kwargs, ensure_topics  # noqa: E402
from streamer.model import FraudMLP, ModelCheckpoint  # noqa: E402
from streamer.features import FEATURE_NAMES  # noqa: E402
from streamer.pipeline import UpdaterPipeline  # noqa: E402
from streamer.replay import replay  # noqa: E402
from streamer.settings import Settings  # noqa: E402

BATCH = 4000


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def make_records(n: int, settings: Settings) -> list[Record]:
    """Transactions and labels of July, merged in event-time order as the replay produces them."""
    data = load_transactions([DATA / "transactions-2018-07.csv.gz"])
    events = []
    for i in range(min(n, len(data["transaction_id"]))):
        tx, t = int(data["transaction_id"][i]), int(data["event_time_ms"][i])
        events.append((t, 1, settings.topics.transactions, transaction_event(
            tx, t, int(data["customer_id"][i]), int(data["terminal_id"][i]), float(data["amount"][i]))))
        events.append((t + 7 * DAY_MS, 0, settings.topics.labels, label_event(tx, t + 7 * DAY_MS, int(data["fraud"][i]))))
    events.sort(key=lambda e: (e[0], e[1]))
    offsets = {}
    records = []
    for _, _, topic, event in events:
        offset = offsets.get(topic, 0)
        offsets[topic] = offset + 1
        records.append(Record(topic, 0, offset, b"0", orjson.dumps(event)))
    return records


def source_model() -> ModelCheckpoint:
    torch.manual_seed(0)
    return ModelCheckpoint(FraudMLP(len(FEATURE_NAMES)), list(FEATURE_NAMES), {}, "0" * 64)


def bench_pipeline(records: list[Record], settings: Settings, profile: bool) -> tuple[float, float]:
    """Return transactions/s and the share of the process's CPU time spent in the drift detector."""
    pipeline = UpdaterPipeline(settings, source_model())
    drift_cpu = time_drift_detector(pipeline)
    profiler = cProfile.Profile() if profile else None
    cpu = time.process_time()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    for lo in range(0, len(records), BATCH):
        pipeline.process(records[lo:lo + BATCH])
    pipeline.on_idle()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    rate = pipeline.counters["transactions"] / (time.perf_counter() - started)
    return rate, drift_cpu[0] / (time.process_time() - cpu)


def time_drift_detector(pipeline: UpdaterPipeline) -> list[float]:
    """Wrap the pipeline's drift detector update; the returned list accumulates its CPU seconds."""
    spent = [0.0]
    update = pipeline.drift.update

    def timed_update(*args):
        started = time.process_time()
        try:
            return update(*args)
        finally:
            spent[0] += time.process_time() - started

    pipeline.drift.update = timed_update
    return spent


async def bench_kafka(settings: Settings, transactions: int, with_pipeline: bool) -> float:
    """Consume every transaction and label of the topics; with_pipeline runs the updater's processing."""
    from aiokafka import AIOKafkaConsumer

    pipeline = UpdaterPipeline(settings, source_model()) if with_pipeline else None
    kwargs = consumer_kwargs(settings, group_id=None)
    consumer = AIOKafkaConsumer(settings.topics.transactions, settings.topics.labels, **kwargs)
    await consumer.start()
    seen = 0
    loop = asyncio.get_running_loop()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        while seen < 2 * transactions:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            records = [r for part in batches.values() for r in part]
            seen += len(records)
            if pipeline is not None:
                # The worker hands each poll to its pipeline thread; do the same.
                ends = {(tp.topic, tp.partition): part[-1].offset + 1 for tp, part in batches.items() if part}
                await loop.run_in_executor(None, pipeline.process, records, ends)
            else:
                for r in records:
                    orjson.loads(r.value)
    finally:
        await consumer.stop()
    return transactions / (time.perf_counter() - started), transactions / (time.process_time() - cpu)


async def fill_broker(settings: Settings, transactions: int) -> None:
    await ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    await replay([DATA / "transactions-2018-07.csv.gz"], bootstrap=settings.kafka_bootstrap, topics=settings.topics,
                 limit=transactions, progress=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The untrained benchmark model's loss changes while it learns, and each drift detection
    # would print a warning line between the results.
    logging.getLogger("streamer.drift").setLevel(logging.ERROR)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
          f"torch {torch.__version__}, 1 torch thread")
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), microbatch_size=512)
    records = make_records(args.transactions, settings)
    if args.profile:
        bench_pipeline(records, settings, profile=True)
        return
    pipeline_runs = [bench_pipeline(records, settings, False) for _ in range(args.repeats)]
    pipeline_rates = [rate for rate, _ in pipeline_runs]
    print(f"pipeline only (decode, features, join, scoring, training), {args.transactions:,} transactions + labels: "
          f"median {statistics.median(pipeline_rates):,.0f} transactions/s  runs {[round(r) for r in pipeline_rates]}")
    drift_shares = [share for _, share in pipeline_runs]
    print(f"drift detector (log loss + ADWIN): median {100 * statistics.median(drift_shares):.1f} % of the "
          f"pipeline's CPU time  runs {[round(100 * s, 1) for s in drift_shares]}")
    with EmbeddedBroker() as broker:
        settings = settings.replace(kafka_bootstrap=broker.bootstrap, embedded_broker=True)
        asyncio.run(fill_broker(settings, args.transactions))
        raw, full = [], []
        for _ in range(args.repeats):
            raw.append(asyncio.run(bench_kafka(settings, args.transactions, with_pipeline=False)))
            full.append(asyncio.run(bench_kafka(settings, args.transactions, with_pipeline=True)))
    raw_m, full_m = statistics.median(r[0] for r in raw), statistics.median(r[0] for r in full)
    cpu_m = statistics.median(r[1] for r in full)
    print(f"raw aiokafka getmany + orjson.loads: median {raw_m:,.0f} transactions/s (x2 events)  "
          f"runs {[round(r[0]) for r in raw]}")
    print(f"Kafka to trained model (updater pipeline): median {full_m:,.0f} transactions/s wall, "
          f"{cpu_m:,.0f} per CPU-second  runs {[round(r[0]) for r in full]}")
    print(f"ratio updater / raw consume: {full_m / raw_m:.2f}")


if __name__ == "__main__":
    main()
