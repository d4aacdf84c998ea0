"""`streamer snapshots`: list, show, pin, unpin and roll back the versions in the snapshot store.

``list`` and ``show`` only read the store. ``pin``, ``unpin`` and ``rollback`` change what
every inference worker serves. They record the pin in the store (``pin.json``, which also
keeps retention from deleting the pinned version) and announce it on ``model-snapshots``
under the model's control key, which every worker reads from the beginning, also one that
starts later. The updater keeps announcing new versions, and pinned workers ignore them
until ``unpin``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from exporters import CONTROL_PIN, Manifest, Pin, SnapshotStore, encode_announcement, encode_unpin

from .errors import BrokerError, ConfigurationError, SnapshotError
from .kafka import ensure_topics, producer_kwargs
from .scoring import build_served_model
from .settings import Settings

logger = logging.getLogger(__name__)

# Seconds to connect, send one announcement and receive its acknowledgement.
ANNOUNCE_TIMEOUT_SECONDS = 30.0
SHA256_PREFIX_CHARS = 12


def add_arguments(parser: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the actions of `streamer snapshots`; ``common`` adds --bootstrap, --data-dir and --log-level to each."""
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list the versions in the store, with metrics and the pinned version")
    show = actions.add_parser("show", help="print the manifest of a version as JSON")
    show.add_argument("version", type=_version, help="version number")
    pin = actions.add_parser("pin", help="make every inference worker serve VERSION and ignore newer ones")
    pin.add_argument("version", type=_version, help="version number; it must be in the store and valid")
    unpin = actions.add_parser("unpin", help="make the inference workers serve the newest version again")
    rollback = actions.add_parser("rollback", help="pin the version before the pinned one, or before the newest")
    for action in (listing, show, pin, unpin, rollback):
        action.add_argument("--model", help="model name (env STREAMER_MODEL_NAME, default fraud)")
        common(action)


def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    """Run one action of `streamer snapshots`; return the exit code.

    Raises:
        SnapshotError: the version is not in the store or fails verification.
        BrokerError: the announcement could not be sent.
        ConfigurationError: a Kafka bootstrap address is missing for an action that announces.
    """
    out = out if out is not None else sys.stdout
    if getattr(args, "model", None):
        settings = settings.replace(model_name=args.model)
    store = SnapshotStore(settings.snapshot_dir, settings.model_name, settings.snapshot_retention)
    if args.action == "list":
        list_snapshots(store, out)
    elif args.action == "show":
        out.write(store.manifest(args.version).to_json().decode("utf-8"))
    elif args.action == "pin":
        pin = pin_version(store, settings, args.version)
        out.write(f"pinned {store.model_name} v{pin.version}; inference workers serve it until unpin\n")
    elif args.action == "rollback":
        pin = pin_version(store, settings, rollback_target(store), action="rollback")
        out.write(f"rolled back {store.model_name} to v{pin.version} (pinned); unpin to serve the newest again\n")
    else:
        try:
            recorded = store.pinned() is not None
        except SnapshotError:
            recorded = False
        released = unpin(store, settings)
        before = f"was v{released.version}" if recorded else "no pin was recorded"
        out.write(f"unpinned {store.model_name} ({before}); inference workers serve the newest version again\n")
    return 0


# -- list ---------------------------------------------------------------------------------


def list_snapshots(store: SnapshotStore, out: TextIO) -> None:
    """Write one line per version: created time, SHA-256 prefix, live AUC and AP, pinned and serving marks.

    "serving" marks the version that the announcements select: the pinned one, else the
    newest. A worker that has not loaded it yet, or rejected it, serves another one.
    """
    manifests = store.manifests()
    pin = store.pinned()
    if not manifests:
        out.write(f"no snapshots of model {store.model_name} in {store.directory}\n")
    else:
        serving = pin.version if pin is not None else manifests[-1].version
        out.write(f"{'VERSION':>7}  {'CREATED (UTC)':<19}  {'SHA256':<12}  {'LIVE AUC':>8}  {'LIVE AP':>8}  STATUS\n")
        for manifest in manifests:
            out.write(_list_line(manifest, pinned=pin is not None and pin.version == manifest.version,
                                 serving=manifest.version == serving))
    if pin is not None and pin.version not in {m.version for m in manifests}:
        out.write(f"pinned v{pin.version} is no longer in the store; run `streamer snapshots unpin`\n")


def _list_line(manifest: Manifest, *, pinned: bool, serving: bool) -> str:
    created = datetime.fromtimestamp(manifest.created_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    status = ", ".join(name for name, flag in (("pinned", pinned), ("serving", serving)) if flag)
    auc = _metric(manifest, "live_auc")
    average_precision = _metric(manifest, "live_average_precision")
    return (f"{manifest.version:>7}  {created:<19}  {manifest.sha256[:SHA256_PREFIX_CHARS]:<12}  "
            f"{auc:>8}  {average_precision:>8}  {status}\n").rstrip() + "\n"


def _metric(manifest: Manifest, name: str) -> str:
    value = manifest.metrics.get(name)
    return "-" if value is None else f"{value:.4f}"


# -- pin, unpin, rollback -----------------------------------------------------------------


def rollback_target(store: SnapshotStore) -> int:
    """Return the newest version below the pinned one, or below the newest if none is pinned.

    Raises SnapshotError if the store has no such version.
    """
    versions = store.versions()
    pin = store.pinned()
    if pin is None and not versions:
        raise SnapshotError(f"no snapshots of model {store.model_name} in {store.directory}: nothing to roll back")
    current = pin.version if pin is not None else versions[-1]
    older = [version for version in versions if version < current]
    if not older:
        raise SnapshotError(
            f"no version before v{current} of model {store.model_name} is left in {store.directory} "
            f"(versions {versions}, retention {store.retention}); pin a version explicitly"
        )
    return older[-1]


def pin_version(store: SnapshotStore, settings: Settings, version: int, *, action: str = "pin") -> Pin:
    """Verify ``version``, record the pin in the store, then announce it to the inference workers.

    Steps: 1. load and verify the version as a worker would (SHA-256, features, probe
    batch); 2. record the pin, under the store's publish lock; 3. announce it. If the
    announcement fails, the previous pin record is restored.

    Raises:
        SnapshotError: the version is not in the store or fails verification.
        BrokerError: the announcement failed; the workers serve what they served before.
    """
    _require_bootstrap(settings, action)
    # Step 1: the same checks as an inference worker, so that a pin no worker would take fails here.
    manifest, data = store.load(version)
    build_served_model(manifest, data)
    # Step 2.
    previous = store.pinned()
    pin, data = store.pin(version)
    # Step 3.
    # NOTE: the publish lock covers the record only. Two pins run at once may announce in
    # the other order than they recorded, and an announcement that timed out may still
    # have reached the topic after the record was restored. `list` then disagrees with the
    # workers until the next pin or unpin.
    path = store.model_path(version).resolve()
    key, value = encode_announcement(pin.manifest, data, store_path=str(path), control=CONTROL_PIN)
    try:
        _announce(settings, key, value, description=f"pin of v{version}")
    except BrokerError:
        _restore_pin(store, previous)
        raise
    return pin


def unpin(store: SnapshotStore, settings: Settings) -> Pin:
    """Announce the unpin to the inference workers, then delete the store's pin record.

    The announcement goes out also when the store has no readable pin record, because a
    worker may still follow a pin whose record was lost. It then names the newest version.

    Raises:
        SnapshotError: the store has neither a pin record nor a version.
        BrokerError: the announcement failed; the pin stays in force.
    """
    _require_bootstrap(settings, "unpin")
    try:
        pin = store.pinned()
    except SnapshotError as exc:
        # Unpinning is the way out of an unreadable record, so it must not fail on one.
        logger.warning("pin record unreadable, announcing the unpin with the newest version error=%s", exc)
        pin = None
    if pin is None:
        latest = store.latest()
        if latest is None:
            raise SnapshotError(f"no pin and no snapshots of model {store.model_name} in {store.directory}")
        logger.warning("no pin recorded in %s; announcing the unpin anyway model=%s", store.directory, store.model_name)
        # Not a recorded pin: only its manifest is used, to name a version in the announcement.
        pin = Pin(manifest=latest, pinned_at=latest.created_at)
    path = store.model_path(pin.version).resolve()
    key, value = encode_unpin(pin.manifest, store_path=str(path))
    _announce(settings, key, value, description="unpin")
    store.unpin()
    return pin


def _restore_pin(store: SnapshotStore, previous: Pin | None) -> None:
    try:
        if previous is None:
            store.unpin()
        else:
            store.pin(previous.version)
    except SnapshotError as exc:
        logger.error("pin record could not be restored after the failed announcement directory=%s error=%s; "
                     "check it with `streamer snapshots list`", store.directory, exc)


def _require_bootstrap(settings: Settings, action: str) -> None:
    if not settings.kafka_bootstrap:
        raise ConfigurationError(
            f"streamer snapshots {action} announces to Kafka: set --bootstrap or STREAMER_KAFKA_BOOTSTRAP"
        )


def _announce(settings: Settings, key: bytes, value: bytes, *, description: str) -> None:
    try:
        asyncio.run(asyncio.wait_for(_send(settings, key, value), ANNOUNCE_TIMEOUT_SECONDS))
    except (BrokerError, KafkaError, OSError, asyncio.TimeoutError) as exc:
        raise BrokerError(
            f"announcing the {description} on topic {settings.topics.model_snapshots} via {settings.kafka_bootstrap} "
            f"failed, so no inference worker received it: {exc}; check that the broker is reachable and run "
            "the command again"
        ) from exc
    logger.info("snapshot control announced %s topic=%s", description, settings.topics.model_snapshots)


async def _send(settings: Settings, key: bytes, value: bytes) -> None:
    # The inference workers read partition 0 of model-snapshots only, which ensure_topics
    # creates with one partition. The control key hashes elsewhere than the model name, so
    # the partition is given explicitly.
    await ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.model_snapshots, value, key=key, partition=0)
    finally:
        await producer.stop()


def _version(text: str) -> int:
    try:
        version = int(text.lstrip("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: expected a number such as 3 or v3") from None
    if version < 1:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: versions start at 1")
    return version
