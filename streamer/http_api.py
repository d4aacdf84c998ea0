"""HTTP endpoints of the workers (aiohttp, on the worker's event loop).

Both workers serve ``GET /health/live`` and ``GET /health/ready`` (200 or 503 with a JSON
report of each condition, see `streamer.health`). The inference worker also serves
``POST /score``, which scores one feature vector or one transaction event with the
snapshot it serves (body forms in `streamer.score_request`):

- 200 ``{"score": p, "model_version": v, "transaction_id": id}`` (``transaction_id`` only
  when the request gave one);
- 400 invalid JSON, wrong field types, lengths or values, unknown fields;
- 413 a body over `MAX_BODY_BYTES`; 415 a content type other than ``application/json``;
- 503 no snapshot served yet, or the worker is stopping.

Every error response is ``{"error": "<what failed and why>"}``. Nothing here
authenticates, which is why the server binds to loopback unless configured otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from .errors import ConfigurationError
from .health import HealthReport
from .score_request import MAX_BODY_BYTES, ScoreRequestError, TransactionRequest, parse_score_request
from .scoring import score

logger = logging.getLogger(__name__)

# Seconds stop() waits for requests in progress before closing their connections.
SHUTDOWN_TIMEOUT_SECONDS = 5.0


class HealthSource(Protocol):
    """A worker whose health the endpoints report."""

    def liveness(self) -> HealthReport: ...

    def readiness(self) -> HealthReport: ...


@dataclass
class HttpServer:
    """A running HTTP server and the address it is bound to."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting connections and close the open ones."""
        await self.runner.cleanup()
        logger.info("HTTP endpoints stopped url=%s", self.url)


async def start_http_server(worker: HealthSource, host: str, port: int, *, scoring: bool) -> HttpServer:
    """Serve the health endpoints of ``worker``, and /score if ``scoring``, on host:port (0 picks a free port).

    ``worker`` must also have ``served`` and ``peek_features`` when ``scoring`` (an
    `InferenceWorker`).
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    app.router.add_get("/health/live", _health_handler(worker.liveness))
    app.router.add_get("/health/ready", _health_handler(worker.readiness))
    if scoring:
        app.router.add_post("/score", _ScoreHandler(worker).handle)
    # No access log: one line per request would flood the worker's log at scoring rates.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(
            f"cannot bind the HTTP endpoints to {host}:{port}: {exc.strerror or exc}. Set another port "
            "(STREAMER_UPDATER_HTTP_PORT or STREAMER_INFERENCE_HTTP_PORT; 0 picks a free one) "
            "or stop the process that uses it"
        ) from exc
    bound_host, bound_port = runner.addresses[0][:2]
    server = HttpServer(runner, bound_host, bound_port)
    routes = "/health/live, /health/ready" + (", /score" if scoring else "")
    logger.info("HTTP endpoints listening url=%s routes=%s", server.url, routes)
    return server


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (unknown path, wrong method) and unexpected failures into JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
    except Exception:
        logger.exception("HTTP request failed method=%s path=%s", request.method, request.path)
        return _error(500, "internal error; see the worker's log")


def _health_handler(probe):
    async def handle(request: web.Request) -> web.Response:
        report = probe()
        return web.json_response(report.to_json(), status=200 if report.ok else 503)

    return handle


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _ScoreHandler:
    def __init__(self, worker) -> None:
        self.worker = worker

    async def handle(self, request: web.Request) -> web.Response:
        # Read once: a snapshot swapped in during this request does not mix into its score.
        served = self.worker.served
        if request.content_type != "application/json":
            return self._reject(415, f"content type must be application/json, got {request.content_type}")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._reject(413, f"body of {request.content_length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # A chunked body without Content-Length is cut off once it passes the limit.
            return self._reject(413, f"body exceeds the limit of {MAX_BODY_BYTES} bytes")
        try:
            parsed = parse_score_request(body)
        except ScoreRequestError as exc:
            return self._reject(400, str(exc))
        if served is None:
            return self._reject(503, "no snapshot served yet; retry when /health/ready returns 200")

        if isinstance(parsed, TransactionRequest):
            # NOTE: this waits for the Kafka batch that the scoring thread may be processing,
            # about 32 ms for 4,000 records at the 125 k transactions/s measured in BENCHMARKS.md.
            try:
                features = await self.worker.peek_features(
                    parsed.event_time_ms, parsed.customer_id, parsed.terminal_id, parsed.amount
                )
            except RuntimeError:  # the score thread is shut down
                return self._reject(503, "the inference worker is stopping")
        else:
            features = parsed.features
        # Scoring one row of the MLP took 7.7 µs at p50 (benchmarks/bench_inference.py), so it
        # runs on the event loop. onnxruntime allows concurrent run() calls on one session, so
        # the score thread may use the same session meanwhile.
        probability = float(score(served, features)[0])
        response = {"score": probability, "model_version": served.version}
        if parsed.transaction_id is not None:
            response["transaction_id"] = parsed.transaction_id
        return web.json_response(response)

    @staticmethod
    def _reject(status: int, message: str) -> web.Response:
        # Debug level: a misbehaving client could otherwise flood the worker's log.
        logger.debug("score request rejected status=%d reason=%s", status, message)
        return _error(status, message)
