"""Benchmark POST /score of the inference worker: latency p50/p99 and throughput over keep-alive HTTP.

The server is an `InferenceWorker` with a snapshot served, its feature state filled from
July 2018 handbook transactions, and its HTTP endpoints on 127.0.0.1. It runs in a child
process pinned to CPU 0, so its figures are those of one core. The client (aiohttp,
keep-alive connections) runs in this process, pinned to CPU 1 when there is one. Each
request scores one transaction event that follows the ones in the state (features from
the state, then the model), or one feature vector. The client measures latency from
sending a request to reading its whole response, one request at a time. Throughput is
measured that way and with several requests in flight on as many connections.

Usage: python benchmarks/bench_http.py [--requests N] [--repeats R] [--concurrency C] [--state-transactions S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import aiohttp
import numpy as np
import orjson
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_inference import served_model  # noqa: E402
from streamer.events import transaction_event  # noqa: E402
from streamer.http_api import start_http_server  # noqa: E402
from streamer.inference import InferenceWorker  # noqa: E402
from streamer.metrics import InferenceMetrics  # noqa: E402
from streamer.replay import Transaction, read_transactions  # noqa: E402
from streamer.settings import Settings  # noqa: E402

JULY = REPO.parent / "shared" / "data" / "fraud-handbook" / "transactions-2018-07.csv.gz"
WARMUP_REQUESTS = 500
SERVER_CPU = 0
FORM_LABELS = {"transaction": "a transaction event", "features": "a feature vector"}
CLIENT_CPU = 1


def pin_to(cpu: int) -> str:
    """Pin this process to ``cpu`` if the platform allows it and the CPU is available; describe the outcome."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this platform)"
    available = sorted(os.sched_getaffinity(0))
    chosen = cpu if cpu in available else available[-1]
    os.sched_setaffinity(0, {chosen})
    return f"pinned to CPU {chosen}"


def july_rows(count: int) -> list[Transaction]:
    return list(islice(read_transactions([JULY], start="2018-07-01"), count))


# -- server (child process) ------------------------------------------------------------------


def serve(connection, state_rows: list[Transaction]) -> None:
    connection.send(pin_to(SERVER_CPU))
    asyncio.run(_serve(connection, state_rows))


async def _serve(connection, state_rows: list[Transaction]) -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    worker = InferenceWorker(settings, InferenceMetrics(CollectorRegistry()))
    worker.served = served_model(settings)
    columns = list(zip(*state_rows))
    worker.features.transform_transactions(*(np.array(columns[i]) for i in (1, 2, 3, 4)))
    server = await start_http_server(worker, "127.0.0.1", 0, scoring=True)
    connection.send(server.port)
    # Serve until the parent sends anything (or closes the pipe).
    await asyncio.get_running_loop().run_in_executor(None, _wait_for_message, connection)
    await server.stop()


def _wait_for_message(connection) -> None:
    try:
        connection.recv()
    except EOFError:
        pass


# -- client ----------------------------------------------------------------------------------


async def send_all(url: str, bodies: list[bytes], concurrency: int) -> tuple[np.ndarray, float]:
    """POST every body; return per-request latencies in microseconds (sequential runs only) and the wall time."""
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies = np.empty(len(bodies))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"POST /score returned {response.status}: {await response.text()}")

        for body in bodies[:WARMUP_REQUESTS]:
            await post(body)
        started = time.perf_counter()
        if concurrency == 1:
            for i, body in enumerate(bodies):
                sent = time.perf_counter_ns()
                await post(body)
                latencies[i] = (time.perf_counter_ns() - sent) / 1000
        else:
            queue = iter(bodies)

            async def drain() -> None:
                for body in queue:
                    await post(body)

            await asyncio.gather(*(drain() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def request_bodies(rows: list[Transaction], form: str, features: np.ndarray) -> list[bytes]:
    if form == "transaction":
        return [orjson.dumps({"transaction": transaction_event(r.transaction_id, r.event_time_ms, r.customer_id,
                                                               r.terminal_id, r.amount)}) for r in rows]
    return [orjson.dumps({"features": features[i % len(features)].tolist(), "transaction_id": r.transaction_id})
            for i, r in enumerate(rows)]


def run_form(url: str, bodies: list[bytes], repeats: int, concurrency: int) -> None:
    p50, p99, sequential, parallel = [], [], [], []
    for _ in range(repeats):
        latencies, elapsed = asyncio.run(send_all(url, bodies, 1))
        p50.append(float(np.percentile(latencies, 50)))
        p99.append(float(np.percentile(latencies, 99)))
        sequential.append(len(bodies) / elapsed)
        _, elapsed = asyncio.run(send_all(url, bodies, concurrency))
        parallel.append(len(bodies) / elapsed)
    print(f"  latency, one request at a time: p50 {statistics.median(p50):.0f} us, p99 {statistics.median(p99):.0f} us"
          f"  (runs p50 {[round(v) for v in p50]}, p99 {[round(v) for v in p99]})")
    print(f"  throughput, one request at a time: {statistics.median(sequential):,.0f} requests/s"
          f"  (runs {[round(v) for v in sequential]})")
    print(f"  throughput, {concurrency} connections: {statistics.median(parallel):,.0f} requests/s"
          f"  (runs {[round(v) for v in parallel]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections of the throughput run with requests in flight (default: %(default)s)")
    parser.add_argument("--state-transactions", type=int, default=100_000,
                        help="July transactions in the feature state before the requests (default: %(default)s)")
    args = parser.parse_args()

    rows = july_rows(args.state_transactions + args.requests)
    state_rows, request_rows = rows[:args.state_transactions], rows[args.state_transactions:]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"aiohttp {aiohttp.__version__}")
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    server = context.Process(target=serve, args=(child_end, state_rows), daemon=True)
    server.start()
    try:
        print(f"server: {parent_end.recv()}; client: {pin_to(CLIENT_CPU)}")
        url = f"http://127.0.0.1:{parent_end.recv()}/score"
        features = np.random.default_rng(0).uniform(0, 50, (1000, 15))
        for form in ("transaction", "features"):
            print(f"POST /score with {FORM_LABELS[form]} ({args.requests:,} requests per run, medians of {args.repeats} runs):")
            run_form(url, request_bodies(request_rows, form, features), args.repeats, args.concurrency)
    finally:
        parent_end.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()


if __name__ == "__main__":
    main()
