"""The faust applications of the two workers.

Start them with the streamer CLI (``streamer update``, ``streamer serve``) or with faust's
own command on the module-level apps, for example::

    STREAMER_KAFKA_BOOTSTRAP=127.0.0.1:9092 faust -A streamer.apps:updater_app worker --without-web

Each app runs its worker as a `mode.Service`. faust provides the process, signals, logging
and shutdown ordering, while the service consumes with its own batch consumer (see
`streamer.updater` for why).
"""

from __future__ import annotations

import asyncio
import logging

import faust
import mode
from prometheus_client import CollectorRegistry

from .errors import ConfigurationError
from .http_api import start_http_server
from .inference import InferenceWorker
from .kafka import ensure_topics, faust_broker_settings
from .metrics import InferenceMetrics, UpdaterMetrics, serve_metrics
from .model import load_feature_state, load_model_checkpoint
from .settings import Settings
from .updater import Updater

logger = logging.getLogger(__name__)


def _base_app(app_id: str, settings: Settings) -> faust.App:
    if not settings.kafka_bootstrap:
        raise ConfigurationError(
            "STREAMER_KAFKA_BOOTSTRAP is not set: point it at Kafka (host:port), "
            "or run `streamer demo`, which starts the embedded broker"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        datadir=str(settings.data_dir / "faust"),
        # faust starts its web server even when disabled; keep it on loopback.
        web_enabled=False,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        topic_allow_declare=False,
        **faust_broker_settings(settings),
    )


def _watch(task: asyncio.Task, service: mode.Service) -> None:
    """Crash the worker when its loop dies, instead of idling with a dead loop."""

    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            logger.error("worker loop failed", exc_info=t.exception())
            asyncio.ensure_future(service.crash(t.exception()))

    task.add_done_callback(done)


async def _create_missing_topics(settings: Settings) -> None:
    # A worker may start before `streamer replay` creates the topics. A topic created by a
    # client's first request gets the broker's defaults, so model-snapshots could have several
    # partitions and no compaction. The inference worker reads partition 0 only, so it would
    # never receive an announcement whose key hashes to another partition.
    await ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)


def create_updater_app(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    """Create a faust app whose worker runs the model updater."""
    if settings.source_checkpoint is None:
        raise ConfigurationError("no source model: set STREAMER_SOURCE_CHECKPOINT or pass --source")
    load_model_checkpoint(settings.source_checkpoint)  # fail before connecting if it is missing or corrupt
    app = _base_app(f"{settings.consumer_group_prefix}-updater-app", settings)
    registry = registry or CollectorRegistry()

    @app.service
    class UpdaterService(mode.Service):
        updater: Updater

        async def on_start(self) -> None:
            if settings.source_checkpoint is None:
                raise ConfigurationError("no source model: set STREAMER_SOURCE_CHECKPOINT or --source")
            source = load_model_checkpoint(settings.source_checkpoint)
            features = load_feature_state(settings.source_checkpoint, source)
            metrics = UpdaterMetrics(registry)
            serve_metrics(registry, settings.metrics_host, settings.updater_metrics_port)
            await _create_missing_topics(settings)
            self.updater = Updater(settings, source, metrics, features)
            # Started first, so that probes see the worker as live but not ready while it starts.
            self.http = await start_http_server(self.updater, settings.http_host, settings.updater_http_port,
                                                scoring=False)
            await self.updater.start()
            _watch(self.updater._task, self)

        async def on_stop(self) -> None:
            if getattr(self, "updater", None) is not None:
                await self.updater.stop()
            if getattr(self, "http", None) is not None:
                await self.http.stop()

    return app


def create_inference_app(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    """Create a faust app whose worker runs the inference worker."""
    app = _base_app(f"{settings.consumer_group_prefix}-inference-app", settings)
    registry = registry or CollectorRegistry()

    @app.service
    class InferenceService(mode.Service):
        worker: InferenceWorker

        async def on_start(self) -> None:
            features = None
            if settings.source_checkpoint is not None:
                # Start from the source model's feature state, as the updater does.
                features = load_feature_state(settings.source_checkpoint, load_model_checkpoint(settings.source_checkpoint))
            metrics = InferenceMetrics(registry)
            serve_metrics(registry, settings.metrics_host, settings.inference_metrics_port)
            await _create_missing_topics(settings)
            self.worker = InferenceWorker(settings, metrics, initial_features=features)
            self.http = await start_http_server(self.worker, settings.http_host, settings.inference_http_port,
                                                scoring=True)
            await self.worker.start()
            for task in self.worker._tasks:
                _watch(task, self)

        async def on_stop(self) -> None:
            if getattr(self, "worker", None) is not None:
                await self.worker.stop()
            if getattr(self, "http", None) is not None:
                await self.http.stop()

    return app


def __getattr__(name: str):
    # Built on first access so that importing this module needs no environment.
    if name == "updater_app":
        return create_updater_app(Settings.from_env())
    if name == "inference_app":
        return create_inference_app(Settings.from_env())
    raise AttributeError(name)
