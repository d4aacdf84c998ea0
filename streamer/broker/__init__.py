"""The embedded Kafka-wire broker for the demo and the tests, and child-process hygiene."""

from .embedded import EmbeddedBroker, broker_binary, kafka_bootstrap, settings_with_broker
from .process import graceful_signals, parent_death_signal

__all__ = [
    "EmbeddedBroker",
    "broker_binary",
    "graceful_signals",
    "kafka_bootstrap",
    "parent_death_signal",
    "settings_with_broker",
]
