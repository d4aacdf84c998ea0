"""One frozen settings object for every streamer process.

Each field reads an environment variable (named in its comment) and may be overridden by
a command-line option. Units are in the field name or the comment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError


@dataclass(frozen=True)
class Topics:
    """Kafka topic names (STREAMER_TOPIC_<NAME>)."""

    transactions: str = "transactions"
    labels: str = "labels"
    dead_letter: str = "dead-letter"
    model_snapshots: str = "model-snapshots"
    fraud_scores: str = "fraud-scores"


@dataclass(frozen=True)
class Settings:
    """Settings of the broker connection, the updater, the exporter and the inference worker."""

    # STREAMER_KAFKA_BOOTSTRAP: "host:port[,host:port]"; empty starts the embedded broker.
    kafka_bootstrap: str | None = None
    # STREAMER_EMBEDDED_BROKER: the bootstrap is the embedded Tansu broker; turns on its
    # workarounds (short group timeouts). Set by the commands that start it.
    embedded_broker: bool = False
    topics: Topics = field(default_factory=Topics)
    # STREAMER_PARTITIONS: partitions of the topics streamer creates.
    partitions: int = 4
    # STREAMER_DATA_DIR: checkpoints, snapshot store and reports live below this folder.
    data_dir: Path = Path("streamer-data")
    # STREAMER_MODEL_NAME: name of the target model in snapshots and metrics.
    model_name: str = "fraud"
    # STREAMER_SOURCE_CHECKPOINT: source model file written by `streamer pretrain`.
    source_checkpoint: Path | None = None

    # STREAMER_LABEL_DEADLINE_DAYS: event-time days after a transaction at which a
    # missing label is given up on.
    label_deadline_days: float = 14.0
    # STREAMER_LABEL_DEADLINE_POLICY: "genuine" trains on an expired example as label 0,
    # "drop" discards it.
    label_deadline_policy: str = "genuine"

    # STREAMER_LABEL_RELEASE_IDLE_SECONDS: labels wait until the transactions reach their
    # event time. After this many wall-clock seconds without transactions they are
    # released anyway, so that an idle transaction stream does not hold labels back.
    label_release_idle_seconds: float = 3.0
    # STREAMER_MAX_EVENT_TIME_SKEW_DAYS: event-time days a transaction may be ahead of the
    # newest earlier transaction of its partition. A later one is dead-lettered instead of
    # moving the watermark, and so is one more than the label deadline behind it.
    max_event_time_skew_days: float = 30.0
    # STREAMER_DEDUP_WINDOW: joined transaction ids remembered to reject a repeated
    # transaction or label. A repeat of a transaction that left the join (joined or expired)
    # more than this many transactions ago is not detected.
    dedup_window: int = 500_000
    # STREAMER_DEAD_LETTER_DUPLICATE_LABELS: send a repeated label (same value again) to the
    # dead-letter topic. When off, it is only counted in streamer_labels_rejected_total.
    dead_letter_duplicate_labels: bool = False

    # STREAMER_MICROBATCH_SIZE: joined examples per micro-batch.
    microbatch_size: int = 512
    # STREAMER_MICROBATCH_MAX_AGE_SECONDS: wall-clock seconds after which a partial
    # micro-batch is trained anyway.
    microbatch_max_age_seconds: float = 5.0
    # STREAMER_LEARNING_RATE: Adam learning rate of the fine-tuning. 3e-4 beat 1e-3 and 3e-3
    # in prequential AP on July-August of the handbook data, with every source model tried.
    learning_rate: float = 3e-4
    # STREAMER_L2SP_LAMBDA: weight of the L2-SP penalty lambda * ||theta - theta_source||^2.
    l2sp_lambda: float = 1e-3
    # STREAMER_FREEZE_UPDATES: micro-batches during which the lower (transferred hidden)
    # layers stay frozen; 0 trains every layer from the start.
    freeze_updates: int = 0
    # STREAMER_RESET_HEAD: re-initialise the output layer even when its shape matches.
    reset_head: bool = False

    # STREAMER_DRIFT_DELTA: significance of the ADWIN drift detector on the live model's
    # prequential log loss, between 0 and 1. Smaller values report fewer and larger changes.
    drift_delta: float = 0.002

    # STREAMER_CHECKPOINT_INTERVAL_SECONDS: wall-clock seconds between checkpoints; the
    # offsets of the events a checkpoint includes are committed right after it.
    checkpoint_interval_seconds: float = 10.0
    # STREAMER_TRAINING_LEDGER: record the transaction id of every trained example in
    # <data_dir>/ledger/<model>.ids (8 bytes per example; see streamer.ledger).
    training_ledger: bool = False
    # STREAMER_INFERENCE_CHECKPOINT_INTERVAL_SECONDS: wall-clock seconds between checkpoints
    # of the inference worker's feature state. Its offsets are committed right after each,
    # and a restart scores again the transactions consumed since the last one.
    inference_checkpoint_interval_seconds: float = 5.0
    # STREAMER_STOP_TIMEOUT_SECONDS: wall-clock seconds the updater's stop may wait for its
    # current micro-batch, a running export and closing its Kafka clients, in total. A batch
    # still running past it gets no final checkpoint, so a restart resumes from the last one.
    stop_timeout_seconds: float = 30.0
    # STREAMER_EXPORT_EVERY_BATCHES: micro-batches between two snapshot exports.
    export_every_batches: int = 100
    # STREAMER_EXPORT_INTERVAL_SECONDS: wall-clock seconds after which a snapshot is
    # exported even if fewer micro-batches were trained (only if any were).
    export_interval_seconds: float = 60.0
    # STREAMER_SNAPSHOT_RETENTION: snapshot versions kept in the store.
    snapshot_retention: int = 5

    # STREAMER_METRICS_HOST: address of the Prometheus endpoints.
    metrics_host: str = "127.0.0.1"
    # STREAMER_UPDATER_METRICS_PORT / STREAMER_INFERENCE_METRICS_PORT; 0 picks a free port.
    updater_metrics_port: int = 9466
    inference_metrics_port: int = 9467
    # STREAMER_HTTP_HOST: address of the HTTP endpoints (health checks, and scoring on the
    # inference worker). Nothing on them authenticates, so keep loopback unless a proxy or
    # a container boundary guards them.
    http_host: str = "127.0.0.1"
    # STREAMER_UPDATER_HTTP_PORT / STREAMER_INFERENCE_HTTP_PORT; 0 picks a free port.
    updater_http_port: int = 8466
    inference_http_port: int = 8467
    # STREAMER_CONSUMER_GROUP_PREFIX: consumer groups are "<prefix>-updater" and
    # "<prefix>-inference".
    consumer_group_prefix: str = "streamer"

    def __post_init__(self) -> None:
        if self.label_deadline_policy not in ("genuine", "drop"):
            raise ConfigurationError(
                f"label_deadline_policy must be 'genuine' or 'drop', got {self.label_deadline_policy!r}"
            )
        for name in ("partitions", "microbatch_size", "export_every_batches", "snapshot_retention", "dedup_window"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.max_event_time_skew_days > 0:
            raise ConfigurationError(
                f"max_event_time_skew_days must be a positive number of days, got {self.max_event_time_skew_days!r}"
            )
        if self.stop_timeout_seconds <= 0:
            raise ConfigurationError(f"stop_timeout_seconds must be > 0, got {self.stop_timeout_seconds}")
        if self.l2sp_lambda < 0 or self.learning_rate <= 0:
            raise ConfigurationError("l2sp_lambda must be >= 0 and learning_rate > 0")
        if not 0 < self.drift_delta < 1:
            raise ConfigurationError(
                f"drift_delta (STREAMER_DRIFT_DELTA) must be between 0 and 1 (exclusive), got {self.drift_delta}"
            )
        for name in ("updater_metrics_port", "inference_metrics_port", "updater_http_port", "inference_http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigurationError(f"{name} must be a TCP port from 0 to 65535, got {getattr(self, name)}")
        if not self.inference_checkpoint_interval_seconds >= 0:
            raise ConfigurationError(
                "inference_checkpoint_interval_seconds (STREAMER_INFERENCE_CHECKPOINT_INTERVAL_SECONDS) "
                f"must be 0 or more seconds, got {self.inference_checkpoint_interval_seconds}"
            )

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints" / self.model_name

    def inference_checkpoint_dir(self, worker_id: str) -> Path:
        return self.data_dir / "inference-checkpoints" / self.model_name / worker_id

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    def replace(self, **changes) -> "Settings":
        """Return a copy with the given fields changed; None values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        """Build settings from STREAMER_* environment variables, defaults elsewhere."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            if f.name == "topics":
                continue
            raw = env.get(f"STREAMER_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw, f.type)
        topic_values = {
            t.name: env[f"STREAMER_TOPIC_{t.name.upper()}"]
            for t in dataclasses.fields(Topics)
            if env.get(f"STREAMER_TOPIC_{t.name.upper()}")
        }
        return cls(topics=Topics(**topic_values), **values)


def _convert(name: str, raw: str, type_name: str):
    try:
        if "bool" in type_name:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if "Path" in type_name:
            return Path(raw)
        return raw
    except ValueError:
        raise ConfigurationError(
            f"environment variable STREAMER_{name.upper()}={raw!r} is not a valid {type_name}"
        ) from None
