"""Benchmark snapshot swaps under load: update-to-serving delay and the worker's memory.

An inference worker runs in this process against the embedded broker while a
`streamer replay` subprocess streams July transactions at a steady rate. Snapshots are
published to the store and announced one after another, as the updater does, and each is
waited for until the worker serves it. The delays are the values of
``streamer_update_to_serving_delay_seconds``: from the manifest's creation time (the
publish) to the swap. The resident set size (RSS) is read before the first swap and after
the last, and weak references to every replaced onnxruntime session show whether the
sessions were released. A control phase of the same load without swaps comes first, so
that RSS growth from the load itself (feature state, buffers) can be distinguished. RSS
is also read after ``malloc_trim``, which returns the C allocator's free memory to the
operating system.

Usage: python benchmarks/bench_swaps.py [--swaps N] [--interval SECONDS] [--speedup X] [--control-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fraud-handbook"
sys.path.insert(0, str(REPO))

from exporters import SnapshotStore, encode_announcement, export_onnx  # noqa: E402
from streamer.broker import EmbeddedBroker  # noqa: E402
from streamer.features import FEATURE_NAMES  # noqa: E402
from streamer.inference import InferenceWorker  # noqa: E402
from streamer.kafka import ensure_topics, producer_kwargs  # noqa: E402
from streamer.metrics import InferenceMetrics  # noqa: E402
from streamer.model import FraudMLP, ScoreModule  # noqa: E402
from streamer.settings import Settings  # noqa: E402

# Seconds to wait for the worker to serve an announced snapshot, or to score its first records.
WAIT_TIMEOUT_SECONDS = 60.0
# Transactions the worker must have scored before the first swap, so that it is under load.
WARM_UP_TRANSACTIONS = 20_000


class RecordingHistogram:
    """Passes observations to the worker's histogram and keeps each value for percentiles."""

    def __init__(self, histogram) -> None:
        self.histogram = histogram
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)
        self.histogram.observe(value)


def rss_mib() -> float:
    """Resident set size of this process in MiB, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def measure_rss() -> tuple[float, float]:
    """Return RSS in MiB after a garbage collection, and again after glibc's malloc_trim(0).

    malloc_trim hands free heap memory back to the operating system, so the second
    figure leaves out memory that was freed but kept by the allocator.
    """
    gc.collect()
    untrimmed = rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return untrimmed, rss_mib()


def exports(count: int):
    """``count`` exports of the production MLP with different weights."""
    probe = np.random.default_rng(0).standard_normal((64, len(FEATURE_NAMES))).astype(np.float32)
    results = []
    for seed in range(count):
        torch.manual_seed(seed)
        results.append(export_onnx(ScoreModule(FraudMLP(len(FEATURE_NAMES)).eval()), probe))
    return results


def start_replay(settings: Settings, speedup: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), STREAMER_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
               STREAMER_EMBEDDED_BROKER="1")
    command = [sys.executable, "-c", "import sys; from streamer.cli import main; sys.exit(main(sys.argv[1:]))",
               "replay", str(DATA / "transactions-2018-07.csv.gz"), str(DATA / "transactions-2018-08.csv.gz"),
               "--speedup", str(speedup),
               "--log-level", "warning"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_until(condition, description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description}: not reached within {WAIT_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(0.002)


async def announce(producer: AIOKafkaProducer, store: SnapshotStore, settings: Settings, result) -> int:
    """Publish ``result`` to the store and announce it, as the updater does; return its version."""
    manifest = await asyncio.to_thread(
        store.publish, result, feature_names=list(FEATURE_NAMES), source_model={"name": "bench"}, offsets={},
        metrics={},
    )
    path = store.model_path(manifest.version)
    key, value = encode_announcement(manifest, path.read_bytes(), store_path=str(path))
    await producer.send_and_wait(settings.topics.model_snapshots, value, key=key)
    return manifest.version


async def bench(settings: Settings, swaps: int, interval: float, speedup: float, control_seconds: float) -> None:
    await ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    models = exports(swaps + 1)

    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=5)
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    worker = InferenceWorker(settings, InferenceMetrics(CollectorRegistry()))
    delays = RecordingHistogram(worker.metrics.update_to_serving)
    worker.metrics.update_to_serving = delays
    replay = None
    try:
        await announce(producer, store, settings, models[0])
        await worker.start()
        await wait_until(lambda: worker.served is not None, "first snapshot served")
        replay = start_replay(settings, speedup)
        await wait_until(lambda: worker.scored >= WARM_UP_TRANSACTIONS, "warm-up transactions scored")

        # Control phase: the same load without swaps.
        rss_control = measure_rss()
        scored_control = worker.scored
        await asyncio.sleep(control_seconds)
        rss_before = measure_rss()
        scored_control = worker.scored - scored_control

        # Swaps, each one waited for until the worker serves it.
        replaced: list[weakref.ref] = []
        scored_before, started = worker.scored, time.perf_counter()
        for result in models[1:]:
            replaced.append(weakref.ref(worker.served.session))
            version = await announce(producer, store, settings, result)
            await wait_until(lambda: worker.served.version == version, f"v{version} served")
            await asyncio.sleep(interval)
        elapsed = time.perf_counter() - started
        scored_during = worker.scored - scored_before
        replay_running = replay.poll() is None
        # Measured while the worker runs, so its current session is alive and every replaced one may be freed.
        rss_after = measure_rss()
        alive = sum(ref() is not None for ref in replaced)
    finally:
        if replay is not None and replay.poll() is None:
            replay.terminate()
            replay.wait()
        await worker.stop()
        await producer.stop()

    values = np.array(delays.values[1:])  # the first is v1, served before the load started
    print(f"swaps: {len(values)} under load, {scored_during:,} transactions scored during them "
          f"({scored_during / elapsed:,.0f}/s over {elapsed:.1f} s); replay still running at the end: {replay_running}")
    print(f"update-to-serving delay: p50 {np.percentile(values, 50) * 1000:.1f} ms, "
          f"p99 {np.percentile(values, 99) * 1000:.1f} ms, max {values.max() * 1000:.1f} ms")
    print(f"control phase without swaps: {control_seconds:.0f} s, {scored_control:,} transactions scored")
    for label, (start, end) in (("control phase", (rss_control, rss_before)), ("swaps", (rss_before, rss_after))):
        print(f"RSS over the {label}: {start[0]:.1f} to {end[0]:.1f} MiB ({end[0] - start[0]:+.1f} MiB); "
              f"after malloc_trim {start[1]:.1f} to {end[1]:.1f} MiB ({end[1] - start[1]:+.1f} MiB)")
    print(f"replaced onnxruntime sessions still alive after gc: {alive} of {len(replaced)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=60, help="snapshots announced under load (default 60)")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between a swap and the next announcement (default 0.5)")
    parser.add_argument("--speedup", type=float, default=43_200,
                        help="replay speed, event-time seconds per second (default 43200, about 4,500 "
                             "July transactions/s and as many labels)")
    parser.add_argument("--control-seconds", type=float, default=30.0,
                        help="seconds of load without swaps before the first swap (default 30)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    with EmbeddedBroker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, embedded_broker=True,
                            data_dir=Path(tempfile.mkdtemp(prefix="bench-swaps-")))
        asyncio.run(bench(settings, args.swaps, args.interval, args.speedup, args.control_seconds))


if __name__ == "__main__":
    main()
