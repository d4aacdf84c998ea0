"""Benchmark the latency from Kafka in to score out of `streamer serve` at fixed input rates.

The benchmark starts the embedded broker, announces one snapshot on the model-snapshots
topic, and starts `streamer serve` as a process restricted to one CPU core. For each
rate it produces July and August transactions to the transactions topic at a steady
pace, and a consumer without a group reads fraud-scores. The latency of a transaction is the time its
score record is received minus the time it was handed to the producer (``send()``), both
read from this process's monotonic clock. It covers producer batching, the broker twice,
the worker's poll, features, scoring and publishing, and the fetch of the score.

Records produced in the first ``--warmup`` seconds of each run are left out. The worker,
which keeps its feature state from run to run, serves every run of every rate. Its own
metrics, read before and after each run, split the time: the mean batch from poll to
scores handed to the producer, and the checkpoints written between two batches.

NOTE: the CPU mask keeps the worker on one core but does not keep other processes off
it, so on a shared machine the figures include waits for the CPU. Report the load average.

Usage: python benchmarks/bench_kafka_latency.py [--rates 1000 5000] [--seconds S] [--warmup W] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fraud-handbook"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_updater import source_model  # noqa: E402
from exporters import SnapshotStore, encode_announcement, export_onnx  # noqa: E402
from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.dataset import load_transactions  # noqa: E402
from streamer.demo import scrape  # noqa: E402
from streamer.events import transaction_event  # noqa: E402
from streamer.features import FEATURE_NAMES  # noqa: E402
from streamer.kafka import consumer_kwargs, ensure_topics, producer_kwargs  # noqa: E402
from streamer.model import ScoreModule  # noqa: E402
from streamer.settings import Settings  # noqa: E402

PARTITIONS = 4
# Seconds between two pacing steps of the producer. Each step sends the records due by then,
# so at 5,000 transactions/s a step sends about 5 of them.
PACE_SECONDS = 0.001
# The score consumer's fetch wait: short, so that it adds little to the measured latency.
SCORE_FETCH_MAX_WAIT_MS = 5
WORKER_READY_TIMEOUT_SECONDS = 60
DRAIN_TIMEOUT_SECONDS = 60
WORKER_STOP_TIMEOUT_SECONDS = 30


@dataclass
class RunResult:
    rate: int
    produced_per_second: float  # achieved input rate
    latencies_ms: np.ndarray  # send() to score received, per measured transaction
    to_scored_at_ms: np.ndarray  # send() to the score record's scored_at, wall clock, 1 ms resolution
    worker_cpu_share: float  # CPU seconds of the worker per wall second during the run
    driver_cpu_share: float  # the same for this process, which produces and consumes
    worker_wait_share: float  # seconds the worker's threads waited for a CPU while runnable, per wall second
    other_scores: int  # score records received that were not the first score of a transaction of this run
    worker_metrics: dict[str, float]  # increase of the worker's own counters and histograms during the run


# Counters and histogram sums and counts of the worker read before and after each run.
WORKER_SERIES = (
    "streamer_inference_batch_duration_seconds_sum",
    "streamer_inference_batch_duration_seconds_count",
    "streamer_checkpoint_duration_seconds_sum",
    "streamer_checkpoint_duration_seconds_count",
    "streamer_scored_transactions_total",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def announce_snapshot(settings: Settings) -> None:
    """Export a randomly initialised model and announce it, as the updater announces its first snapshot."""
    probe = np.random.default_rng(0).standard_normal((64, len(FEATURE_NAMES))).astype(np.float32)
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, 3)
    manifest = store.publish(export_onnx(ScoreModule(source_model().model), probe),
                             feature_names=list(FEATURE_NAMES), source_model={}, offsets={}, metrics={})
    model_path = store.model_path(manifest.version)
    key, value = encode_announcement(manifest, model_path.read_bytes(), store_path=str(model_path.resolve()))

    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        await ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
        producer = AIOKafkaProducer(**producer_kwargs(settings))
        await producer.start()
        try:
            await producer.send_and_wait(settings.topics.model_snapshots, value, key=key)
        finally:
            await producer.stop()

    asyncio.run(send())


def start_worker(settings: Settings, metrics_port: int, cpu: int, log: Path) -> subprocess.Popen:
    """Start `streamer serve` with every thread it will create restricted to ``cpu``."""
    env = dict(os.environ)
    env.update({
        "STREAMER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMER_EMBEDDED_BROKER": "1",
        "STREAMER_DATA_DIR": str(settings.data_dir),
        "STREAMER_PARTITIONS": str(settings.partitions),
        "STREAMER_INFERENCE_METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(REPO),
    })

    def restrict_to_cpu() -> None:
        # Runs in the child before exec, so every thread of the worker inherits the mask.
        os.sched_setaffinity(0, {cpu})

    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "streamer", "serve"], env=env, stdout=output,
                                stderr=subprocess.STDOUT, preexec_fn=restrict_to_cpu)


def thread_affinities(pid: int) -> set[frozenset[int]]:
    """Return the distinct CPU masks of a process's threads."""
    return {frozenset(os.sched_getaffinity(int(task.name))) for task in Path(f"/proc/{pid}/task").iterdir()}


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of a process, all threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields after the command: state is field 3, utime 14 and stime 15, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_wait_seconds(pid: int) -> float:
    """Return the time the threads of a process spent runnable but waiting for a CPU (Linux schedstat)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except OSError:
            continue  # the thread exited while listing
    return total_ns / 1e9


def wait_until_serving(process: subprocess.Popen, metrics_port: int, log: Path) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_SECONDS
    while scrape(metrics_port).get("streamer_inference_model_version", 0) < 1:
        if process.poll() is not None:
            raise RuntimeError(f"streamer serve exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"streamer serve did not serve a snapshot within {WORKER_READY_TIMEOUT_SECONDS} s; "
                               f"see its log {log}")
        time.sleep(0.2)


def transaction_values(data: dict[str, np.ndarray], first: int, count: int) -> list[tuple[int, bytes, bytes]]:
    """Return (transaction id, key, value) of ``count`` transactions from row ``first``, keyed as the replay keys them."""
    values = []
    for i in range(first, first + count):
        tx_id = int(data["transaction_id"][i])
        event = transaction_event(tx_id, int(data["event_time_ms"][i]), int(data["customer_id"][i]),
                                  int(data["terminal_id"][i]), float(data["amount"][i]))
        values.append((tx_id, b"%d" % int(data["customer_id"][i]), orjson.dumps(event)))
    return values


async def run_at_rate(settings: Settings, transactions: list[tuple[int, bytes, bytes]], rate: int,
                      warmup: float, worker_pid: int, metrics_port: int) -> RunResult:
    """Produce ``transactions`` at ``rate`` per second and measure each one's latency to its score."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(**producer_kwargs(settings))
    consumer = AIOKafkaConsumer(**{**consumer_kwargs(settings, group_id=None),
                                   "fetch_max_wait_ms": SCORE_FETCH_MAX_WAIT_MS})
    await producer.start()
    await consumer.start()
    scores = [TopicPartition(settings.topics.fraud_scores, p) for p in range(settings.partitions)]
    consumer.assign(scores)
    await consumer.seek_to_end(*scores)
    for tp in scores:
        await consumer.position(tp)  # resolve the end offset now, before anything is produced

    sent_at: dict[int, tuple[float, float]] = {}  # transaction id -> (monotonic, wall) at send()
    received_at: dict[int, tuple[float, int]] = {}  # transaction id -> (monotonic at receipt, scored_at ms)

    expected = {tx_id for tx_id, _, _ in transactions}
    # The embedded broker's "latest" offset is the base offset of the last record batch plus
    # one, so seek_to_end() can land before scores of the previous run. They are skipped here.
    others = 0  # score records of transactions not produced in this run, or a second score of one

    async def receive() -> None:
        nonlocal others
        while len(received_at) < len(expected):
            batches = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    score = orjson.loads(record.value)
                    tx_id = score["transaction_id"]
                    if tx_id not in expected or tx_id in received_at:
                        others += 1
                        continue
                    received_at[tx_id] = (now, score["scored_at"])

    receiver = asyncio.create_task(receive())
    sends = []
    cpu_before = cpu_seconds(worker_pid)
    wait_before = run_queue_wait_seconds(worker_pid)
    driver_cpu_before = time.process_time()
    metrics_before = scrape(metrics_port)
    started = time.perf_counter()
    try:
        produced = 0
        while produced < len(transactions):
            due = min(len(transactions), int((time.perf_counter() - started) * rate) + 1)
            for tx_id, key, value in transactions[produced:due]:
                sent_at[tx_id] = (time.perf_counter(), time.time())
                sends.append(await producer.send(settings.topics.transactions, value, key=key))
            produced = due
            await asyncio.sleep(PACE_SECONDS)
        elapsed = time.perf_counter() - started
        await asyncio.gather(*sends)
        await asyncio.wait_for(receiver, DRAIN_TIMEOUT_SECONDS)
        worker_cpu = cpu_seconds(worker_pid) - cpu_before
        worker_wait = run_queue_wait_seconds(worker_pid) - wait_before
        driver_cpu = time.process_time() - driver_cpu_before
        metrics_after = scrape(metrics_port)
        wall = time.perf_counter() - started
    finally:
        receiver.cancel()
        await producer.stop()
        await consumer.stop()

    measured = [tx_id for tx_id, _, _ in transactions if sent_at[tx_id][0] - started >= warmup]
    latencies = np.array([received_at[t][0] - sent_at[t][0] for t in measured]) * 1000
    to_scored_at = np.array([received_at[t][1] - sent_at[t][1] * 1000 for t in measured])
    increase = {name: metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0) for name in WORKER_SERIES}
    return RunResult(rate, len(transactions) / elapsed, latencies, to_scored_at, worker_cpu / wall, driver_cpu / wall,
                     worker_wait / wall, others, increase)


def percentiles(values: np.ndarray) -> tuple[float, float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99)), float(values.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 5000], help="transactions per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run, after the warm-up")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the start of each run left out")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("this benchmark needs at least 2 CPU cores: one for the worker, one for the rest")
    worker_cpu, other_cpus = cpus[-1], set(cpus[:-1])
    # This process and the broker it starts run on the other cores, away from the worker's.
    os.sched_setaffinity(0, other_cpus)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"worker on CPU {worker_cpu}, benchmark and broker on CPUs {sorted(other_cpus)}")

    data = load_transactions([DATA / "transactions-2018-07.csv.gz", DATA / "transactions-2018-08.csv.gz"])
    folder = Path(tempfile.mkdtemp(prefix="bench-kafka-latency-"))
    with EmbeddedBroker() as broker:
        settings = Settings(data_dir=folder / "data", kafka_bootstrap=broker.bootstrap, embedded_broker=True,
                            partitions=PARTITIONS)
        announce_snapshot(settings)
        metrics_port, log = free_port(), folder / "serve.log"
        worker = start_worker(settings, metrics_port, worker_cpu, log)
        try:
            wait_until_serving(worker, metrics_port, log)
            print(f"worker pid {worker.pid}, thread CPU masks {[sorted(m) for m in thread_affinities(worker.pid)]}")
            next_row = 0
            for rate in args.rates:
                runs = []
                for _ in range(args.repeats):
                    count = int(rate * (args.warmup + args.seconds))
                    available = len(data["transaction_id"])
                    if next_row + count > available:
                        raise SystemExit(f"July and August have {available:,} transactions, too few for these rates "
                                         "and durations: lower --rates, --seconds or --repeats")
                    transactions = transaction_values(data, next_row, count)
                    next_row += count
                    runs.append(asyncio.run(run_at_rate(settings, transactions, rate, args.warmup, worker.pid,
                                                        metrics_port)))
                report(rate, runs)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=WORKER_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def report(rate: int, runs: list[RunResult]) -> None:
    stats = [percentiles(run.latencies_ms) for run in runs]
    scored = [percentiles(run.to_scored_at_ms) for run in runs]
    print(f"rate {rate:,}/s: {len(runs)} runs of {len(runs[0].latencies_ms):,} measured transactions")
    print(f"  achieved input rate: {[round(run.produced_per_second) for run in runs]} transactions/s")
    print(f"  send to score received: median p50 {statistics.median(s[0] for s in stats):.1f} ms, "
          f"median p99 {statistics.median(s[1] for s in stats):.1f} ms; "
          f"runs p50 {[round(s[0], 1) for s in stats]}, p99 {[round(s[1], 1) for s in stats]}, "
          f"max {[round(s[2], 1) for s in stats]}")
    print(f"  send to scored_at (wall clock, 1 ms resolution): median p50 {statistics.median(s[0] for s in scored):.1f} "
          f"ms, median p99 {statistics.median(s[1] for s in scored):.1f} ms")
    print(f"  CPU: worker {[round(run.worker_cpu_share, 2) for run in runs]}, "
          f"benchmark process {[round(run.driver_cpu_share, 2) for run in runs]} of one core; "
          f"worker waited for a CPU {[round(run.worker_wait_share, 2) for run in runs]} s per s; "
          f"other score records received: {[run.other_scores for run in runs]}")
    batch = [mean_of(run, "streamer_inference_batch_duration_seconds") for run in runs]
    batch_size = [run.worker_metrics["streamer_scored_transactions_total"]
                  / max(1.0, run.worker_metrics["streamer_inference_batch_duration_seconds_count"]) for run in runs]
    checkpoint = [mean_of(run, "streamer_checkpoint_duration_seconds") for run in runs]
    checkpoints = [int(run.worker_metrics["streamer_checkpoint_duration_seconds_count"]) for run in runs]
    print(f"  worker batches: mean {[round(b * 1000, 1) for b in batch]} ms from poll to scores handed to the "
          f"producer, mean {[round(b) for b in batch_size]} transactions per batch")
    print(f"  worker checkpoints: {checkpoints}, mean {[round(c * 1000, 1) for c in checkpoint]} ms each "
          "(written between two batches)")


def mean_of(run: RunResult, histogram: str) -> float:
    """Return the mean observation of a worker histogram during the run, or NaN without observations."""
    count = run.worker_metrics[f"{histogram}_count"]
    return run.worker_metrics[f"{histogram}_sum"] / count if count else float("nan")


if __name__ == "__main__":
    main()
