"""Retry of Kafka operations with capped exponential back-off, and produce requests kept for a re-send.

The workers call `retry` around every produce and commit, so that a broker that is
unreachable for a while (or restarted) delays them instead of crashing their loops.
Each failure is logged, counted in ``streamer_broker_errors_total{operation}`` and sets
``streamer_broker_up`` to 0; each success sets it to 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka.errors import KafkaError

from .errors import BrokerError
from .metrics import IngestMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds before the first retry; the delay doubles after each failure up to the maximum.
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
# Errors worth retrying: Kafka errors (timeouts, lost connections, coordinator moves) and
# socket errors that reach the caller before aiokafka wraps them.
RETRIABLE_ERRORS = (KafkaError, OSError)
# Seconds a commit may take. aiokafka retries a commit without limit while the group
# coordinator is unknown, so without this limit an outage would block a worker's loop
# without a log line or a metric.
COMMIT_TIMEOUT_SECONDS = 5.0


async def retry(
    operation: str,
    fn: Callable[[], Awaitable[T]],
    *,
    metrics: IngestMetrics,
    initial: float = INITIAL_BACKOFF_SECONDS,
    maximum: float = MAX_BACKOFF_SECONDS,
    stop_event: asyncio.Event | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await ``fn()`` until it succeeds, with capped exponential back-off between attempts.

    The first back-off is ``initial`` seconds, and it doubles after each failure up to
    ``maximum``. ``fn`` must be safe to call again after a failure (a commit, or a re-send
    of the same records). Errors other than `RETRIABLE_ERRORS` propagate at once.

    Raises:
        BrokerError: ``fn`` failed and ``stop_event`` is set, so the worker is stopping.
    """
    delay = initial
    attempt = 1
    while True:
        try:
            result = await fn()
        except RETRIABLE_ERRORS as exc:
            metrics.broker_errors.labels(operation).inc()
            metrics.broker_up.set(0)
            if stop_event is not None and stop_event.is_set():
                raise BrokerError(
                    f"Kafka operation {operation} failed while the worker is stopping: {exc!r}. Check that "
                    "the broker is reachable. The next start resumes from the last committed offsets."
                ) from exc
            logger.warning("Kafka operation failed operation=%s attempt=%d retry_in=%.1fs error=%r",
                           operation, attempt, delay, exc)
            await _back_off(delay, sleep, stop_event)
            delay = min(delay * 2, maximum)
            attempt += 1
            continue
        metrics.broker_up.set(1)
        if attempt > 1:
            logger.info("Kafka operation succeeded again operation=%s attempts=%d", operation, attempt)
        return result


async def _back_off(
    seconds: float, sleep: Callable[[float], Awaitable[None]], stop_event: asyncio.Event | None
) -> None:
    """Sleep ``seconds``, or less if ``stop_event`` is set meanwhile, so that a stopping worker ends soon."""
    if stop_event is None:
        await sleep(seconds)
        return
    waits = {asyncio.ensure_future(sleep(seconds)), asyncio.ensure_future(stop_event.wait())}
    _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()


async def commit(consumer, offsets=None, *, metrics: IngestMetrics) -> bool:
    """Commit ``offsets`` (default: the consumed positions); return whether the broker accepted them.

    A failure or a timeout after `COMMIT_TIMEOUT_SECONDS` is logged and counted, and the
    caller commits again later: a commit of the same offsets is idempotent.
    """
    try:
        await asyncio.wait_for(consumer.commit(offsets), COMMIT_TIMEOUT_SECONDS)
    except (*RETRIABLE_ERRORS, asyncio.TimeoutError) as exc:
        metrics.broker_errors.labels("commit").inc()
        metrics.broker_up.set(0)
        logger.warning("offset commit failed, committing again later error=%r", exc)
        return False
    metrics.broker_up.set(1)
    return True


@dataclass
class RetainedSend:
    """Records sent to one topic (and partition, if set), kept until the broker acknowledges them.

    ``futures`` are the produce futures of the last attempt. `acknowledged` awaits them
    and, after a failed attempt, sends the same records again, so it can be passed to
    `retry`. A partly acknowledged attempt is sent again in full, so a retry can duplicate
    records (at-least-once).
    """

    topic: str
    partition: int | None
    records: list[tuple[bytes | None, bytes, list | None]]  # (key, value, headers)
    futures: list[asyncio.Future] = field(default_factory=list)

    async def acknowledged(self, producer) -> None:
        """Wait for the broker's acknowledgement of every record, re-sending them after a failed attempt."""
        futures, self.futures = self.futures, []
        if not futures:
            for key, value, headers in self.records:
                futures.append(await producer.send(self.topic, value, key=key, partition=self.partition,
                                                   headers=headers))
        # Every future is awaited, also after the first failure, so that no acknowledgement
        # of an earlier attempt is still pending when the records are sent again.
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise errors[0]
        self.futures = futures


async def reset_positions_beyond_end(consumer) -> list:
    """Seek to the beginning each assigned partition whose position is beyond its high watermark; return them.

    The position can only be beyond the end when the partition lost records, for example a
    topic deleted and created again, or the embedded broker restarted with empty memory.
    Apache Kafka responds to a fetch there with OffsetOutOfRange, and the consumer resets
    by ``auto_offset_reset``. With Tansu 0.6.0 (the embedded broker) and aiokafka 0.14.0
    the consumer was measured to stay at its position after a broker restart, waiting for
    offsets that never come, so the workers call this when a poll returns no records.
    """
    reset = []
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        position = await consumer.position(tp)
        if position > highwater:
            logger.warning("position beyond the end of the partition, seeking to its beginning "
                           "topic=%s partition=%d position=%d high_watermark=%d",
                           tp.topic, tp.partition, position, highwater)
            await consumer.seek_to_beginning(tp)
            reset.append(tp)
    return reset
