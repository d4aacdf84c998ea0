"""The HTTP endpoints of a real inference worker and updater, over HTTP on 127.0.0.1, against the session's broker.

One module-scoped scenario starts an inference worker with its HTTP server before any
snapshot exists, reads /health/ready and /score, announces a snapshot, replays July
transactions, and then sends scoring requests of every form and every invalid kind. The
tests assert on the recorded responses.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import torch
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from exporters import SnapshotStore, encode_announcement, export_onnx
from streamer.events import transaction_event
from streamer.features import FEATURE_NAMES, FeatureState
from streamer.http_api import HttpServer, start_http_server
from streamer.inference import InferenceWorker
from streamer.kafka import ensure_topics, producer_kwargs
from streamer.metrics import InferenceMetrics, UpdaterMetrics
from streamer.model import FraudMLP, ScoreModule, load_feature_state, load_model_checkpoint
from streamer.replay import Transaction, read_transactions, replay
from streamer.score_request import MAX_BODY_BYTES
from streamer.scoring import score
from streamer.settings import Settings
from streamer.updater import Updater

pytestmark = pytest.mark.integration

PARTITIONS = 2
TRANSACTIONS = 600
# Largest difference between an HTTP score and the same snapshot run in-process on the same
# features: both are onnxruntime on CPU with one row, so they should agree to a few float32 epsilons.
SCORE_ATOL = 1e-6
WAIT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.1
JSON = {"Content-Type": "application/json"}
# Id of the transaction sent over HTTP for a customer of the replayed rows; no handbook id is this large.
RETURNING_TRANSACTION_ID = 10**9


@dataclass
class Response:
    status: int
    body: dict


@dataclass
class Scenario:
    """What the tests of this module inspect."""

    server_host: str
    server_port: int
    ready_before_snapshot: Response
    score_before_snapshot: Response
    ready_after_snapshot: Response
    live: Response
    # Scoring requests by case name, with what the same snapshot computes in-process.
    responses: dict[str, Response] = field(default_factory=dict)
    expected_scores: dict[str, float] = field(default_factory=dict)
    served_version: int = 0
    entries_before_requests: int = 0
    entries_after_requests: int = 0
    other_loopback_refused: bool = False
    # customer_count_1d of the returning customer's transaction sent over HTTP.
    returning_customer_count_1d: int = 0
    ready_after_stop: Response | None = None


# -- helpers -------------------------------------------------------------------------------


def publish_snapshot(settings: Settings, probe: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """Export an untrained MLP normalised on ``probe``; return its ONNX bytes and announcement key and value."""
    torch.manual_seed(7)
    model = FraudMLP(len(FEATURE_NAMES))
    model.set_normalisation(torch.from_numpy(probe.mean(axis=0)), torch.from_numpy(probe.std(axis=0) + 1e-3))
    result = export_onnx(ScoreModule(model.eval()), probe)
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, retention=2)
    manifest = store.publish(result, feature_names=list(FEATURE_NAMES), source_model={"name": "untrained"},
                             offsets={}, metrics={})
    key, value = encode_announcement(manifest, result.onnx_bytes, store_path=str(store.model_path(manifest.version)))
    return result.onnx_bytes, key, value


async def announce(settings: Settings, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.model_snapshots, value, key=key, partition=0)
    finally:
        await producer.stop()


async def get(session: aiohttp.ClientSession, url: str) -> Response:
    async with session.get(url) as response:
        return Response(response.status, await response.json(content_type=None))


async def post(session: aiohttp.ClientSession, url: str, **kwargs) -> Response:
    async with session.post(url, **kwargs) as response:
        return Response(response.status, await response.json(content_type=None))


async def wait_for_ready(session: aiohttp.ClientSession, url: str, accept: Callable[[Response], bool]) -> Response:
    """Poll /health/ready until ``accept`` holds; fail with the last response."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while True:
        response = await get(session, f"{url}/health/ready")
        if accept(response):
            return response
        if time.monotonic() > deadline:
            raise TimeoutError(f"/health/ready stayed at {response} for {WAIT_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


async def wait_until_scored(registry: CollectorRegistry, count: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while (registry.get_sample_value("streamer_scored_transactions_total") or 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} transactions scored in {WAIT_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


def only_model_missing(response: Response) -> bool:
    return response.status == 503 and response.body["failing"] == ["model_loaded"]


def refuses_connection(host: str, port: int) -> bool:
    """Return True if nothing accepts TCP connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) != 0


# -- scenario ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(handbook_dir: Path) -> list[Transaction]:
    """July transactions: the first TRANSACTIONS are replayed, the rest are sent over HTTP only."""
    july = handbook_dir / "transactions-2018-07.csv.gz"
    return [row for _, row in zip(range(TRANSACTIONS + 50), read_transactions([july], start="2018-07-01"))]


@pytest.fixture(scope="module")
def scenario(settings_factory: Callable[[str], Settings], handbook_dir: Path, rows: list[Transaction]) -> Scenario:
    settings = settings_factory("http-api").replace(partitions=PARTITIONS)
    return asyncio.run(run_scenario(settings, handbook_dir / "transactions-2018-07.csv.gz", rows))


def offline_features(rows: list[Transaction]) -> tuple[np.ndarray, FeatureState]:
    state = FeatureState()
    features = state.transform_transactions(
        np.array([r.event_time_ms for r in rows]), np.array([r.customer_id for r in rows]),
        np.array([r.terminal_id for r in rows]), np.array([r.amount for r in rows]),
    )
    return features, state


async def run_scenario(settings: Settings, july: Path, rows: list[Transaction]) -> Scenario:
    await ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS)
    replayed, extra = rows[:TRANSACTIONS], rows[TRANSACTIONS:]
    features, state = offline_features(replayed)
    onnx_bytes, key, value = publish_snapshot(settings, features[:256])
    registry = CollectorRegistry()
    worker = InferenceWorker(settings, InferenceMetrics(registry))
    server = await start_http_server(worker, "127.0.0.1", 0, scoring=True)
    url = server.url
    try:
        async with aiohttp.ClientSession() as session:
            await worker.start()
            before = await wait_for_ready(session, url, only_model_missing)
            score_before = await post(session, f"{url}/score", json={"features": features[0].tolist()})

            await announce(settings, key, value)
            after = await wait_for_ready(session, url, lambda r: r.status == 200)
            await replay([july], bootstrap=settings.kafka_bootstrap, topics=settings.topics, start="2018-07-01",
                         limit=TRANSACTIONS, progress=None)
            await wait_until_scored(registry, TRANSACTIONS)

            scenario = Scenario(server.host, server.port, before, score_before, after,
                                await get(session, f"{url}/health/live"))
            scenario.served_version = worker.served.version
            scenario.entries_before_requests = worker.features.num_entries
            await send_requests(session, url, scenario, worker, features, state, replayed, extra, onnx_bytes)
            scenario.entries_after_requests = worker.features.num_entries
            scenario.other_loopback_refused = refuses_connection("127.0.0.2", server.port)

            await worker.stop()
            scenario.ready_after_stop = await get(session, f"{url}/health/ready")
    finally:
        if worker._tasks and not worker._stopping.is_set():
            await worker.stop()
        await server.stop()
    return scenario


async def send_requests(
    session: aiohttp.ClientSession, url: str, scenario: Scenario, worker: InferenceWorker,
    features: np.ndarray, state: FeatureState, replayed: list[Transaction], extra: list[Transaction],
    onnx_bytes: bytes,
) -> None:
    """Send every scoring case and record the responses, and the in-process scores to compare with."""
    responses, expected = scenario.responses, scenario.expected_scores
    offline = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def offline_score(row: np.ndarray) -> float:
        return float(offline.run(None, {offline.get_inputs()[0].name: row})[0].reshape(-1)[0])

    row = features[-1:]
    responses["features"] = await post(session, f"{url}/score", json={"features": row[0].tolist(),
                                                                       "transaction_id": 77})
    expected["features"] = float(score(worker.served, row)[0])
    responses["features by name"] = await post(
        session, f"{url}/score", json={"features": dict(zip(FEATURE_NAMES, row[0].tolist()))})
    expected["features by name"] = expected["features"]

    # Transactions after the replayed ones: their features come from the worker's state,
    # which equals the offline state of the replayed rows. The first is of the customer
    # seen most often, so that its customer windows are not empty.
    regular = Counter(r.customer_id for r in replayed).most_common(1)[0][0]
    seen = next(r for r in reversed(replayed) if r.customer_id == regular)
    returning = Transaction(RETURNING_TRANSACTION_ID, extra[0].event_time_ms, regular, seen.terminal_id, 42.0, 0)
    scenario.returning_customer_count_1d = int(state.peek_transaction(
        returning.event_time_ms, returning.customer_id, returning.terminal_id, returning.amount
    )[0, FEATURE_NAMES.index("customer_count_1d")])
    for case, transaction in (("transaction", returning), ("transaction repeated", returning),
                              ("transaction of another customer", extra[1])):
        event = transaction_event(transaction.transaction_id, transaction.event_time_ms, transaction.customer_id,
                                  transaction.terminal_id, transaction.amount)
        responses[case] = await post(session, f"{url}/score", json={"transaction": event})
        peeked = state.peek_transaction(transaction.event_time_ms, transaction.customer_id,
                                        transaction.terminal_id, transaction.amount)
        expected[case] = offline_score(peeked)

    vector = features[0].tolist()
    event = transaction_event(1, 1530403231000, 596, 3156, 57.16)
    invalid = {
        "invalid JSON": dict(data=b'{"features": [1, 2', headers=JSON),
        "non-finite value": dict(data=b'{"features": [1e400' + b", 0" * 14 + b"]}", headers=JSON),
        "wrong length": dict(json={"features": vector[:-1]}),
        "wrong type": dict(json={"features": vector[:-1] + ["1.0"]}),
        "out of float32 range": dict(json={"features": vector[:-1] + [1e39]}),
        "unknown field": dict(json={"features": vector, "model_version": 3}),
        "unknown feature name": dict(json={"features": dict(zip(FEATURE_NAMES, vector), colour=1.0)}),
        "invalid transaction": dict(json={"transaction": dict(event, amount=-5.0)}),
        "body over limit": dict(data=b" " * (MAX_BODY_BYTES + 1), headers=JSON),
        "text content type": dict(data=orjson.dumps({"features": vector}), headers={"Content-Type": "text/plain"}),
    }
    for case, kwargs in invalid.items():
        responses[case] = await post(session, f"{url}/score", **kwargs)


# -- health ----------------------------------------------------------------------------------


def test_ready_before_snapshot_is_503(scenario: Scenario):
    assert scenario.ready_before_snapshot.status == 503


def test_ready_before_snapshot_names_model(scenario: Scenario):
    assert scenario.ready_before_snapshot.body["checks"]["model_loaded"] == {
        "ok": False, "detail": "no snapshot served yet"}


def test_ready_before_snapshot_other_checks_pass(scenario: Scenario):
    checks = scenario.ready_before_snapshot.body["checks"]
    assert [name for name in ("running", "partitions_assigned", "broker_reachable") if not checks[name]["ok"]] == []


def test_ready_after_snapshot_is_200(scenario: Scenario):
    assert scenario.ready_after_snapshot.status == 200


def test_ready_after_snapshot_names_version(scenario: Scenario):
    assert scenario.ready_after_snapshot.body["checks"]["model_loaded"]["detail"] == "serving snapshot version 1"


def test_live_while_running_is_200(scenario: Scenario):
    assert scenario.live.status == 200


def test_ready_after_stop_is_503(scenario: Scenario):
    assert scenario.ready_after_stop.status == 503
    assert "running" in scenario.ready_after_stop.body["failing"]


def test_server_bound_to_loopback_address(scenario: Scenario):
    assert scenario.server_host == "127.0.0.1"


def test_server_not_on_other_loopback_address(scenario: Scenario):
    # Bound to 0.0.0.0, the server would also accept connections on 127.0.0.2.
    assert scenario.other_loopback_refused


# -- scoring ---------------------------------------------------------------------------------


def test_score_before_snapshot_is_503(scenario: Scenario):
    assert scenario.score_before_snapshot.status == 503
    assert "no snapshot served yet" in scenario.score_before_snapshot.body["error"]


@pytest.mark.parametrize("case", ["features", "features by name", "transaction", "transaction repeated",
                                  "transaction of another customer"])
def test_score_equals_in_process_score(scenario: Scenario, case: str):
    response = scenario.responses[case]
    assert response.status == 200
    assert abs(response.body["score"] - scenario.expected_scores[case]) <= SCORE_ATOL


@pytest.mark.parametrize("case", ["features", "transaction"])
def test_score_names_served_version(scenario: Scenario, case: str):
    assert scenario.responses[case].body["model_version"] == scenario.served_version


def test_score_echoes_transaction_id(scenario: Scenario):
    assert scenario.responses["features"].body["transaction_id"] == 77
    assert scenario.responses["transaction"].body["transaction_id"] == RETURNING_TRANSACTION_ID


def test_score_transaction_uses_worker_state(scenario: Scenario):
    # Precondition of the transaction cases: the customer's windows are not empty.
    assert scenario.returning_customer_count_1d > 1


def test_score_transaction_leaves_state_unchanged(scenario: Scenario):
    assert scenario.entries_after_requests == scenario.entries_before_requests


def test_score_transaction_repeated_scores_equally(scenario: Scenario):
    assert scenario.responses["transaction repeated"].body["score"] == scenario.responses["transaction"].body["score"]


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("invalid JSON", 400, "invalid JSON"),
        ("non-finite value", 400, "invalid JSON: number is infinity"),
        ("wrong length", 400, "features must contain 15 values"),
        ("wrong type", 400, "features[14] must be a number, got string"),
        ("out of float32 range", 400, "features[14] is 1e+39, outside the float32 range"),
        ("unknown field", 400, "unknown fields ['model_version']"),
        ("unknown feature name", 400, "unknown feature names ['colour']"),
        ("invalid transaction", 400, "invalid transaction: amount must be between 0 and 1000000"),
        ("body over limit", 413, f"exceeds the limit of {MAX_BODY_BYTES}"),
        ("text content type", 415, "content type must be application/json, got text/plain"),
    ],
)
def test_invalid_request_rejected(scenario: Scenario, case: str, status: int, message: str):
    response = scenario.responses[case]
    assert response.status == status
    assert message in response.body["error"]


# -- updater ---------------------------------------------------------------------------------


async def run_updater_health(settings: Settings) -> tuple[Response, Response, Response]:
    """Start an updater with its HTTP server; return /health/ready when ready, /score, and /health/ready after stop."""
    await ensure_topics(settings.kafka_bootstrap, settings.topics, PARTITIONS)
    source = load_model_checkpoint(settings.source_checkpoint)
    updater = Updater(settings, source, UpdaterMetrics(CollectorRegistry()),
                      load_feature_state(settings.source_checkpoint, source))
    server: HttpServer = await start_http_server(updater, "127.0.0.1", 0, scoring=False)
    try:
        async with aiohttp.ClientSession() as session:
            await updater.start()
            try:
                ready = await wait_for_ready(session, server.url, lambda r: r.status == 200)
                no_score = await post(session, f"{server.url}/score", json={"features": [0.0] * len(FEATURE_NAMES)})
            finally:
                await updater.stop()
            stopped = await get(session, f"{server.url}/health/ready")
    finally:
        await server.stop()
    return ready, no_score, stopped


def test_updater_health_ready_then_stopping(settings_factory: Callable[[str], Settings], source_path: Path):
    settings = settings_factory("http-updater").replace(partitions=PARTITIONS, source_checkpoint=source_path)
    ready, no_score, stopped = asyncio.run(run_updater_health(settings))
    assert ready.body["checks"]["model_loaded"]["detail"] == "target model loaded, newest snapshot version 1"
    assert no_score.status == 404
    assert stopped.status == 503
    assert stopped.body["checks"]["running"] == {"ok": False, "detail": "worker is stopping"}
