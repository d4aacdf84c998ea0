"""Benchmark the inference worker: single-row latency, batch scoring, and Kafka in to scores out.

Usage: python benchmarks/bench_inference.py [--transactions N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_updater import fill_broker, make_records, source_model  # noqa: E402
from exporters import SnapshotStore, export_onnx  # noqa: E402
from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.features import FEATURE_NAMES  # noqa: E402
from streamer.inference import InferenceWorker  # noqa: E402
from streamer.kafka import consumer_kwargs, producer_kwargs  # noqa: E402
from streamer.metrics import InferenceMetrics  # noqa: E402
from streamer.model import ScoreModule  # noqa: E402
from streamer.scoring import build_served_model, score  # noqa: E402
from streamer.settings import Settings  # noqa: E402

BATCH = 4000


def served_model(settings: Settings):
    model = ScoreModule(source_model().model)
    probe = np.random.default_rng(0).standard_normal((64, len(FEATURE_NAMES))).astype(np.float32)
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, 3)
    manifest = store.publish(export_onnx(model, probe), feature_names=list(FEATURE_NAMES), source_model={},
                             offsets={}, metrics={})
    return build_served_model(*store.load(manifest.version))


def bench_single_row(served, rows: int = 20_000) -> tuple[float, float]:
    x = np.random.default_rng(1).standard_normal((rows, len(FEATURE_NAMES))).astype(np.float32)
    timings = np.empty(rows)
    for i in range(rows):
        row = x[i:i + 1]
        started = time.perf_counter_ns()
        score(served, row)
        timings[i] = time.perf_counter_ns() - started
    return float(np.percentile(timings, 50)) / 1000, float(np.percentile(timings, 99)) / 1000


def worker(settings: Settings, served) -> InferenceWorker:
    w = InferenceWorker(settings, InferenceMetrics(CollectorRegistry()))
    w.served = served
    return w


def bench_processing(records, settings: Settings, served) -> float:
    w = worker(settings, served)
    started = time.perf_counter()
    scored = 0
    for lo in range(0, len(records), BATCH):
        out, _ = w._process(records[lo:lo + BATCH])
        scored += len(out)
    return scored / (time.perf_counter() - started)


async def bench_kafka(settings: Settings, served, transactions: int, full: bool) -> tuple[float, float]:
    """Consume both topics until every transaction is handled; full=True scores and produces like the worker."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    w = worker(settings, served)
    consumer = AIOKafkaConsumer(settings.topics.transactions, settings.topics.labels,
                                **consumer_kwargs(settings, group_id=None))
    w._producer = AIOKafkaProducer(**producer_kwargs(settings))
    await consumer.start()
    await w._producer.start()
    loop = asyncio.get_running_loop()
    seen, cpu, started = 0, time.process_time(), time.perf_counter()
    try:
        while seen < 2 * transactions:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            records = [r for part in batches.values() for r in part]
            seen += len(records)
            if full and records:
                scored, letters = await loop.run_in_executor(None, w._process, records)
                await w._publish(scored, letters)
        await w._await_inflight()
    finally:
        await consumer.stop()
        await w._producer.stop()
    return transactions / (time.perf_counter() - started), transactions / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, python {platform.python_version()}, 1 onnxruntime thread")
    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    served = served_model(settings)
    p50, p99 = zip(*(bench_single_row(served) for _ in range(args.repeats)))
    print(f"in-process single-row score: p50 {statistics.median(p50):.1f} us, p99 {statistics.median(p99):.1f} us "
          f"(medians of {args.repeats} runs of 20,000 calls)")
    records = make_records(args.transactions, settings)
    rates = [bench_processing(records, settings, served) for _ in range(args.repeats)]
    print(f"worker processing only (decode, features, scoring, encoding): median {statistics.median(rates):,.0f} "
          f"transactions/s  runs {[round(r) for r in rates]}")
    with EmbeddedBroker() as broker:
        settings = settings.replace(kafka_bootstrap=broker.bootstrap, embedded_broker=True)
        asyncio.run(fill_broker(settings, args.transactions))
        raw, full = [], []
        for _ in range(args.repeats):
            raw.append(asyncio.run(bench_kafka(settings, served, args.transactions, full=False)))
            full.append(asyncio.run(bench_kafka(settings, served, args.transactions, full=True)))
    raw_m = statistics.median(r[0] for r in raw)
    full_m = statistics.median(r[0] for r in full)
    cpu_m = statistics.median(r[1] for r in full)
    print(f"raw aiokafka getmany (no decoding): median {raw_m:,.0f} transactions/s (x2 events)")
    print(f"Kafka in to scores out (inference worker): median {full_m:,.0f} transactions/s wall, "
          f"{cpu_m:,.0f} per CPU-second  runs {[round(r[0]) for r in full]}")
    print(f"ratio inference / raw consume: {full_m / raw_m:.2f}")


if __name__ == "__main__":
    main()
