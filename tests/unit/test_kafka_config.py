"""Client configuration of `streamer.kafka`: the embedded-broker profile and the real-Kafka defaults."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamer.errors import ConfigurationError
from streamer.kafka import consumer_kwargs, faust_broker_settings, is_embedded, producer_kwargs
from streamer.settings import Settings

REAL = Settings(kafka_bootstrap="127.0.0.1:9092")
EMBEDDED = Settings(kafka_bootstrap="127.0.0.1:9092", embedded_broker=True)


def test_consumer_kwargs_manual_commit():
    assert consumer_kwargs(REAL, group_id="g")["enable_auto_commit"] is False


def test_consumer_kwargs_starts_at_earliest():
    assert consumer_kwargs(REAL, group_id="g")["auto_offset_reset"] == "earliest"


def test_consumer_kwargs_passes_group_id():
    assert consumer_kwargs(REAL, group_id="streamer-updater")["group_id"] == "streamer-updater"


def test_consumer_kwargs_real_kafka_keeps_default_timeouts():
    kwargs = consumer_kwargs(REAL, group_id="g")
    assert "session_timeout_ms" not in kwargs
    assert "heartbeat_interval_ms" not in kwargs


def test_consumer_kwargs_embedded_short_timeouts():
    kwargs = consumer_kwargs(EMBEDDED, group_id="g")
    assert kwargs["session_timeout_ms"] == 2000
    assert kwargs["heartbeat_interval_ms"] == 500
    assert kwargs["rebalance_timeout_ms"] == 2000


def test_consumer_kwargs_embedded_flag_overrides_settings():
    assert "session_timeout_ms" not in consumer_kwargs(EMBEDDED, group_id="g", embedded=False)


def test_consumer_kwargs_heartbeat_below_third_of_session():
    kwargs = consumer_kwargs(EMBEDDED, group_id="g")
    assert kwargs["heartbeat_interval_ms"] * 3 <= kwargs["session_timeout_ms"]


def test_consumer_kwargs_without_bootstrap_rejected():
    with pytest.raises(ConfigurationError, match="STREAMER_KAFKA_BOOTSTRAP"):
        consumer_kwargs(Settings(), group_id="g")


def test_producer_kwargs_not_idempotent():
    assert producer_kwargs(EMBEDDED)["enable_idempotence"] is False


def test_producer_kwargs_acks_all():
    assert producer_kwargs(REAL)["acks"] == "all"


def test_producer_kwargs_uncompressed():
    assert producer_kwargs(REAL)["compression_type"] is None


def test_producer_kwargs_exact_offsets_embedded():
    assert producer_kwargs(EMBEDDED, exact_end_offsets=True)["max_batch_size"] == 1


def test_producer_kwargs_exact_offsets_real_kafka():
    assert producer_kwargs(REAL, exact_end_offsets=True)["max_batch_size"] > 1


def test_client_kwargs_accepted_by_aiokafka():
    async def build():
        AIOKafkaConsumer(**consumer_kwargs(EMBEDDED, group_id="g", client_id="test"))
        AIOKafkaProducer(**producer_kwargs(EMBEDDED, exact_end_offsets=True, client_id="test"))

    asyncio.run(build())


def test_faust_broker_settings_real_kafka_empty():
    assert faust_broker_settings(REAL) == {}


def test_faust_broker_settings_embedded_short_session():
    assert faust_broker_settings(EMBEDDED)["broker_session_timeout"] == 2.0


def test_faust_broker_settings_accepted_by_faust():
    import faust

    settings = faust.Settings("test-app", **faust_broker_settings(EMBEDDED))
    assert settings.broker_heartbeat_interval == 0.5
    assert settings.producer_max_batch_size == 1


def test_is_embedded_follows_settings():
    assert is_embedded(EMBEDDED) is True
    assert is_embedded(REAL) is False
