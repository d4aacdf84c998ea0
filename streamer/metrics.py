"""Prometheus metrics of the updater and the inference worker.

Each worker owns one metrics object built on a registry it is given (tests pass a fresh
``CollectorRegistry``). Names carry base units and ``_total`` for counters.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# Micro-batches take milliseconds; exports about a second; scoring tens of microseconds per batch row.
_TRAIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_EXPORT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
_LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# Label values exported at 0 from the start. A labelled series appears only once
# ``.labels()`` is called, so without this a dashboard query over a healthy worker returns no
# data, and rate() and increase() miss the first count of a series that appears when it moves.
# The operations are the names that the workers pass to streamer.retry: both workers produce
# and commit, and the updater also announces snapshots.
_BROKER_OPERATIONS = ("produce", "commit")
_UPDATER_BROKER_OPERATIONS = ("announce",)
_LABEL_DEADLINE_POLICIES = ("genuine", "drop")


class IngestMetrics:
    """Counters every consuming worker shares."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_consumed = Counter(
            "streamer_events_consumed_total", "Kafka records consumed, by topic.", ["topic"], registry=registry
        )
        self.invalid_events = Counter(
            "streamer_invalid_events_total",
            "Records that failed validation and went to the dead-letter topic, by source topic.",
            ["topic"],
            registry=registry,
        )
        self.broker_errors = Counter(
            "streamer_broker_errors_total", "Kafka operations that failed and were retried.", ["operation"],
            registry=registry,
        )
        self.broker_up = Gauge(
            "streamer_broker_up", "1 if the last Kafka produce or commit of this worker succeeded, 0 if it failed.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag",
            "Records behind the partition's high watermark at the last poll, by topic and partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self._lag_labels: set[tuple[str, str]] = set()
        for operation in _BROKER_OPERATIONS:
            self.broker_errors.labels(operation)

    def count_consumed(self, batches: dict) -> None:
        """Count the records of one poll, ``{TopicPartition: [records]}``, per topic.

        Also exports ``streamer_invalid_events_total`` at 0 for each topic consumed, because
        topic names are known only from the records.

        NOTE: when the first poll of a topic already contains invalid records, its series first
        appears above 0, so rate() and increase() miss those records.
        """
        for tp, part in batches.items():
            self.events_consumed.labels(tp.topic).inc(len(part))
            self.invalid_events.labels(tp.topic)

    def set_consumer_lag(self, lag: dict) -> None:
        """Set the lag of each partition in ``lag``, ``{TopicPartition: records}``, and drop the other partitions.

        A partition left out (revoked, or not fetched yet) loses its series, so that a lag
        from before a rebalance cannot keep an alert firing.
        """
        current = {(tp.topic, str(tp.partition)): records for tp, records in lag.items()}
        for labels in self._lag_labels - current.keys():
            self.consumer_lag.remove(*labels)
        for labels, records in current.items():
            self.consumer_lag.labels(*labels).set(records)
        self._lag_labels = set(current)


class UpdaterMetrics(IngestMetrics):
    """Metrics of the model updater."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        for operation in _UPDATER_BROKER_OPERATIONS:
            self.broker_errors.labels(operation)
        self.labels_joined = Counter("streamer_labels_joined_total", "Labels joined with their transaction.", registry=r)
        self.labels_expired = Counter(
            "streamer_labels_expired_total", "Transactions whose label deadline passed, by policy.", ["policy"],
            registry=r,
        )
        for policy in _LABEL_DEADLINE_POLICIES:
            self.labels_expired.labels(policy)
        self.labels_rejected = Counter(
            "streamer_labels_rejected_total",
            "Labels not joined: duplicate, conflicting, or orphan (transaction never seen).",
            ["reason"],
            registry=r,
        )
        self.pending_labels = Gauge(
            "streamer_pending_labels", "Transactions waiting for their label (not labels held by the gate).", registry=r
        )
        self.label_delay = Gauge(
            "streamer_label_delay_seconds",
            "Event-time seconds from a transaction to its label, over the labels joined by the last poll, "
            "by quantile (0.5, 0.9, 0.99).",
            ["quantile"],
            registry=r,
        )
        self.examples_trained = Counter("streamer_examples_trained_total", "Examples trained on.", registry=r)
        self.microbatches = Counter(
            "streamer_microbatches_total", "Micro-batches, by outcome (applied or skipped_nonfinite).", ["outcome"],
            registry=r,
        )
        # Exported at 0 from the start: increase() in an alert misses the first count of a
        # series that appears only when it first moves.
        for outcome in ("applied", "skipped_nonfinite"):
            self.microbatches.labels(outcome)
        self.microbatch_duration = Histogram(
            "streamer_microbatch_duration_seconds", "Wall time of one micro-batch update.", buckets=_TRAIN_BUCKETS,
            registry=r,
        )
        self.training_loss = Gauge("streamer_training_loss", "Loss of the last applied micro-batch.", registry=r)
        self.prequential_auc = Gauge(
            "streamer_prequential_auc", "Rolling prequential ROC AUC, by model (live or source).", ["model"],
            registry=r,
        )
        self.prequential_ap = Gauge(
            "streamer_prequential_average_precision", "Rolling prequential average precision, by model.", ["model"],
            registry=r,
        )
        self.snapshots_exported = Counter("streamer_snapshots_exported_total", "Snapshots exported.", registry=r)
        self.export_failures = Counter("streamer_export_failures_total", "Snapshot exports that failed.", registry=r)
        self.export_duration = Histogram(
            "streamer_export_duration_seconds", "Wall time of one export (ONNX, checks, store).",
            buckets=_EXPORT_BUCKETS, registry=r,
        )
        self.model_version = Gauge("streamer_updater_model_version", "Version of the last exported snapshot.", registry=r)
        self.checkpoints = Counter("streamer_checkpoints_total", "Checkpoints written.", registry=r)
        self.checkpoint_duration = Histogram(
            "streamer_checkpoint_duration_seconds", "Wall time of one checkpoint.", buckets=_EXPORT_BUCKETS, registry=r
        )
        self.watermark = Gauge(
            "streamer_updater_watermark_seconds", "Newest event time seen, Unix seconds.", registry=r
        )
        self.drift_detections = Counter(
            "streamer_drift_detections_total",
            "Changes detected in the prequential log loss, by model, detector and direction (rise or fall).",
            ["model", "detector", "direction"], registry=r,
        )
        self.drift_last_detection = Gauge(
            "streamer_drift_last_detection_timestamp_seconds",
            "Transaction watermark (event time, Unix seconds) at the last drift detection, by model and detector.",
            ["model", "detector"], registry=r,
        )
        self.drift_estimate = Gauge(
            "streamer_drift_estimate",
            "Mean prequential log loss (nats) in the drift detector's window, by model and detector.",
            ["model", "detector"], registry=r,
        )


class InferenceMetrics(IngestMetrics):
    """Metrics of the inference worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        r = registry
        self.scored = Counter("streamer_scored_transactions_total", "Transactions scored and published.", registry=r)
        self.latency = Histogram(
            "streamer_inference_latency_seconds",
            "In-process scoring time per transaction (batch scoring time divided by batch size).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_duration = Histogram(
            "streamer_inference_batch_duration_seconds", "Time from poll to scores handed to the producer, per batch.",
            buckets=_TRAIN_BUCKETS, registry=r,
        )
        self.model_version = Gauge("streamer_inference_model_version", "Version of the snapshot being served.", registry=r)
        self.pinned_version = Gauge(
            "streamer_inference_pinned_version", "Version pinned by `streamer snapshots pin`, 0 when none is.", registry=r
        )
        self.snapshots_loaded = Counter("streamer_snapshots_loaded_total", "Snapshots swapped in.", registry=r)
        self.snapshots_rejected = Counter(
            "streamer_snapshots_rejected_total", "Snapshots rejected, by reason.", ["reason"], registry=r
        )
        self.update_to_serving = Histogram(
            "streamer_update_to_serving_delay_seconds", "Time from snapshot export to serving it.",
            buckets=_DELAY_BUCKETS, registry=r,
        )
        self.checkpoints = Counter("streamer_checkpoints_total", "Checkpoints of the feature state written.", registry=r)
        self.checkpoint_duration = Histogram(
            "streamer_checkpoint_duration_seconds", "Wall time of writing one checkpoint.", buckets=_EXPORT_BUCKETS,
            registry=r,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start the metrics HTTP endpoint on host:port (port 0 picks a free one); return the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("metrics endpoint listening on http://%s:%d/metrics", host, bound)
    return bound
