"""The HTTP endpoints (streamer.http_api) over real HTTP on 127.0.0.1, with a fake worker and model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest

from streamer.errors import ConfigurationError
from streamer.features import FEATURE_NAMES
from streamer.health import Check, HealthReport
from streamer.http_api import start_http_server
from streamer.score_request import MAX_BODY_BYTES

VECTOR = [float(i) for i in range(len(FEATURE_NAMES))]
TRANSACTION = {"type": "transaction", "event_id": "tx-1042", "transaction_id": 1042, "event_time": 1530403231000,
               "customer_id": 596, "terminal_id": 3156, "amount": 57.16}
PEEKED = np.full((1, len(FEATURE_NAMES)), 2.0, dtype=np.float32)


class SumSession:
    """An onnxruntime session stand-in whose score is the feature sum divided by 1000."""

    def run(self, outputs, feeds):
        (features,) = feeds.values()
        return [features.sum(axis=1, keepdims=True) / 1000]


class FakeWorker:
    def __init__(self) -> None:
        self.served = SimpleNamespace(session=SumSession(), input_name="features", version=3)
        self.live = HealthReport({"inference-loop": Check(True, "running")})
        self.ready = HealthReport({"model_loaded": Check(True, "serving snapshot version 3")})
        self.peeked: list[tuple] = []
        self.peek_error: Exception | None = None

    def liveness(self) -> HealthReport:
        return self.live

    def readiness(self) -> HealthReport:
        return self.ready

    async def peek_features(self, *transaction) -> np.ndarray:
        if self.peek_error is not None:
            raise self.peek_error
        self.peeked.append(transaction)
        return PEEKED


async def call(worker, method: str, path: str, *, scoring: bool = True, **kwargs) -> tuple[int, dict, str]:
    """Start a server for ``worker``, send one request, stop it; return status, JSON body, bound host."""
    server = await start_http_server(worker, "127.0.0.1", 0, scoring=scoring)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, f"{server.url}{path}", **kwargs) as response:
                body = await response.json(content_type=None)
                return response.status, body, server.host
    finally:
        await server.stop()


def request(method: str, path: str, worker=None, **kwargs) -> tuple[int, dict]:
    status, body, _ = asyncio.run(call(worker or FakeWorker(), method, path, **kwargs))
    return status, body


# -- health ----------------------------------------------------------------------------------


def test_server_bound_to_loopback():
    _, _, host = asyncio.run(call(FakeWorker(), "GET", "/health/live"))
    assert host == "127.0.0.1"


def test_live_ok_returns_200():
    status, body = request("GET", "/health/live")
    assert status == 200
    assert body["status"] == "ok"


def test_live_failing_returns_503():
    worker = FakeWorker()
    worker.live = HealthReport({"inference-loop": Check(False, "failed: ValueError('boom')")})
    status, body = request("GET", "/health/live", worker)
    assert status == 503
    assert body["failing"] == ["inference-loop"]


def test_ready_failing_returns_503_with_reason():
    worker = FakeWorker()
    worker.ready = HealthReport({"model_loaded": Check(False, "no snapshot served yet")})
    status, body = request("GET", "/health/ready", worker)
    assert status == 503
    assert body["checks"]["model_loaded"] == {"ok": False, "detail": "no snapshot served yet"}


def test_score_route_absent_without_scoring():
    status, _, _ = asyncio.run(call(FakeWorker(), "POST", "/score", scoring=False, json={"features": VECTOR}))
    assert status == 404


# -- scoring ---------------------------------------------------------------------------------


def test_score_features_returns_model_score():
    status, body = request("POST", "/score", json={"features": VECTOR, "transaction_id": 9})
    assert status == 200
    assert body == {"score": pytest.approx(sum(VECTOR) / 1000), "model_version": 3, "transaction_id": 9}


def test_score_features_without_id_omits_it():
    _, body = request("POST", "/score", json={"features": VECTOR})
    assert "transaction_id" not in body


def test_score_transaction_uses_peeked_features():
    worker = FakeWorker()
    status, body = request("POST", "/score", worker, json={"transaction": TRANSACTION})
    assert status == 200
    assert body["score"] == pytest.approx(float(PEEKED.sum()) / 1000)
    assert body["transaction_id"] == 1042
    assert worker.peeked == [(1530403231000, 596, 3156, 57.16)]


def test_score_uses_model_read_at_request_start():
    worker = FakeWorker()
    swapped_in = SimpleNamespace(session=SumSession(), input_name="features", version=4)

    async def peek_and_swap(*transaction):
        worker.served = swapped_in  # a snapshot swap while the features are computed
        return PEEKED

    worker.peek_features = peek_and_swap
    _, body = request("POST", "/score", worker, json={"transaction": TRANSACTION})
    assert body["model_version"] == 3


def test_score_without_snapshot_returns_503():
    worker = FakeWorker()
    worker.served = None
    status, body = request("POST", "/score", worker, json={"features": VECTOR})
    assert status == 503
    assert "no snapshot served yet" in body["error"]


def test_score_while_stopping_returns_503():
    worker = FakeWorker()
    worker.peek_error = RuntimeError("cannot schedule new futures after shutdown")
    status, body = request("POST", "/score", worker, json={"transaction": TRANSACTION})
    assert status == 503
    assert body["error"] == "the inference worker is stopping"


def test_score_invalid_json_returns_400():
    status, body = request("POST", "/score", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["error"].startswith("invalid JSON")


def test_score_wrong_length_returns_400():
    status, body = request("POST", "/score", json={"features": VECTOR[:3]})
    assert status == 400
    assert "features must contain 15 values" in body["error"]


def test_score_unknown_field_returns_400():
    status, body = request("POST", "/score", json={"features": VECTOR, "debug": True})
    assert status == 400
    assert "unknown fields ['debug']" in body["error"]


def test_score_json_with_charset_accepted():
    status, _ = request("POST", "/score", data=b'{"features": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}',
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_score_other_content_type_returns_415(content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, body = request("POST", "/score", data=b'{"features": []}', headers=headers)
    assert status == 415
    assert "content type must be application/json" in body["error"]


def test_score_body_over_limit_returns_413():
    body = b'{"features": [' + b" " * MAX_BODY_BYTES + b"]}"
    status, response = request("POST", "/score", data=body, headers={"Content-Type": "application/json"})
    assert status == 413
    assert f"exceeds the limit of {MAX_BODY_BYTES}" in response["error"]


def test_score_chunked_body_over_limit_returns_413():
    async def chunks():
        yield b'{"features": ['
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b" " * 1024
        yield b"]}"

    status, response = request("POST", "/score", data=chunks(), headers={"Content-Type": "application/json"})
    assert status == 413
    assert f"exceeds the limit of {MAX_BODY_BYTES} bytes" in response["error"]


def test_score_get_not_allowed():
    status, _ = request("GET", "/score")
    assert status == 405


# -- start -----------------------------------------------------------------------------------


def test_start_on_taken_port_raises_configuration_error():
    async def start_twice():
        first = await start_http_server(FakeWorker(), "127.0.0.1", 0, scoring=False)
        try:
            with pytest.raises(ConfigurationError, match=f"cannot bind the HTTP endpoints to 127.0.0.1:{first.port}"):
                await start_http_server(FakeWorker(), "127.0.0.1", first.port, scoring=False)
        finally:
            await first.stop()

    asyncio.run(start_twice())


def test_unknown_path_returns_json_404():
    status, body = request("GET", "/metrics")
    assert status == 404
    assert body["error"] == "Not Found: GET /metrics"


def test_handler_failure_returns_json_500():
    worker = FakeWorker()
    worker.served = SimpleNamespace(session=None, input_name="features", version=3)  # run() fails
    status, body = request("POST", "/score", worker, json={"features": VECTOR})
    assert status == 500
    assert body["error"] == "internal error; see the worker's log"
