"""Drift detection on the prequential log loss of a model, with River's ADWIN.

Each judged example's log loss (its label against the score the model gave when the
transaction arrived) goes into one ADWIN detector (``river.drift.ADWIN``, River 0.26).
ADWIN keeps a window of recent values and cuts its older part when the means of the two
parts differ by more than a bound set by the significance ``delta``. Each cut is a
detection. River's ADWIN then empties its window at the next value, so the estimate
afterwards is the mean loss since the detection.

Every example is fed on its own: River's ADWIN is implemented in Rust and took about
0.2 µs per value here, well below the updater's cost per transaction (about 16 µs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from river.drift import ADWIN

from .errors import ConfigurationError
from .evaluation import EvaluationInputError
from .metrics import UpdaterMetrics

logger = logging.getLogger(__name__)

DETECTOR = "adwin"
# ADWIN reports changes of the mean in both directions. A fall of the loss follows an
# improvement, for example once the fine-tuning has adapted to a change.
DIRECTIONS = ("rise", "fall")

# Scores are clipped to [LOSS_EPSILON, 1 - LOSS_EPSILON], which bounds one example's loss
# at MAX_LOSS (9.2 nats), so one confidently wrong score cannot dominate the window's mean.
LOSS_EPSILON = 1e-4
MAX_LOSS = -math.log(LOSS_EPSILON)


@dataclass(frozen=True)
class DriftDetection:
    """One detection: when it happened, and the mean loss of the window parts ADWIN compared."""

    model: str
    watermark_ms: int  # transaction watermark (newest event time) when the label was judged
    event_time_ms: int  # event time of the transaction whose loss completed the detection
    detected_at: float  # wall clock, Unix seconds
    examples: int  # examples fed to the detector so far, this one included
    direction: str  # "rise" when the recent mean loss is above the older one, else "fall"
    older_examples: int  # the older part of the window, which ADWIN dropped
    older_mean_loss: float  # nats
    recent_examples: int  # the recent part of the window, which ADWIN kept
    recent_mean_loss: float  # nats


def log_loss(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Return the log loss of each score against its 0/1 label, in nats (float64).

    Scores are clipped to [LOSS_EPSILON, 1 - LOSS_EPSILON] first.
    """
    probabilities = np.clip(np.asarray(scores, dtype=np.float64), LOSS_EPSILON, 1.0 - LOSS_EPSILON)
    positive = np.asarray(labels) == 1
    return -np.log(np.where(positive, probabilities, 1.0 - probabilities))


class LossDriftDetector:
    """ADWIN on the prequential log loss of one model, with its metrics and log line.

    ``model`` is the value of the ``model`` label of the metrics (``live`` for the
    fine-tuned model, as in ``streamer_prequential_auc``).

    NOTE: the detector state is not checkpointed, so after a restart its window starts
    empty and a change that spans the restart is detected later, or not at all. River
    0.26 serialises ADWIN only by pickle or as the raw bytes of its Rust structure. Those
    bytes depend on River's version, and its loader panics on bytes it cannot decode.
    """

    def __init__(self, delta: float = 0.002, *, model: str = "live", metrics: UpdaterMetrics | None = None) -> None:
        if not 0.0 < delta < 1.0:
            raise ConfigurationError(
                f"drift detector delta must be between 0 and 1 (exclusive), got {delta!r}; "
                "set STREAMER_DRIFT_DELTA, for example to River's default 0.002"
            )
        self.delta = delta
        self.model = model
        self.metrics = metrics
        self.examples = 0
        self.detection_count = 0
        self.last_detection: DriftDetection | None = None
        self._adwin = ADWIN(delta=delta)
        if metrics is not None:
            # Exported at 0 from the start, so that increase() counts the first detection.
            for direction in DIRECTIONS:
                metrics.drift_detections.labels(model, DETECTOR, direction)

    @property
    def width(self) -> int:
        """Number of losses in the detector's window (after a detection, the part it kept)."""
        return int(self._adwin.width)

    @property
    def estimate(self) -> float:
        """Mean log loss of the window in nats, NaN while it is empty."""
        if self.width == 0:
            return math.nan
        return self._adwin.estimation * MAX_LOSS

    def update(
        self, labels: np.ndarray, scores: np.ndarray, event_time_ms: np.ndarray, watermark_ms: int
    ) -> list[DriftDetection]:
        """Feed one batch of judged examples, in order; return the detections it caused.

        ``scores`` are the probabilities the model gave each transaction when it arrived,
        ``event_time_ms`` the transactions' event times, and ``watermark_ms`` the
        transaction watermark when the labels were judged. Raises EvaluationInputError,
        and feeds nothing, when the arrays differ in length or a score is not finite.
        """
        _check_batch(labels, scores, event_time_ms)
        # ADWIN's bound is stated for values in [0, 1], so the losses are divided by their
        # maximum.
        values = log_loss(labels, scores) / MAX_LOSS
        cumulative = np.cumsum(values)
        adwin = self._adwin
        # The window before the first value of the batch; River empties it at the next
        # value when the previous one was a detection.
        start, width, total = 0, int(adwin.width), adwin.total
        if adwin.drift_detected:
            width, total = 0, 0.0
        found = []
        for i, value in enumerate(values.tolist()):
            adwin.update(value)
            if not adwin.drift_detected:
                continue
            fed_total = cumulative[i] - (cumulative[start - 1] if start else 0.0)
            found.append(self._detection(
                int(event_time_ms[i]), watermark_ms, self.examples + i + 1,
                width + i + 1 - start, (total + fed_total) * MAX_LOSS,
            ))
            start, width, total = i + 1, 0, 0.0
        self.examples += len(values)
        self._publish(found, watermark_ms)
        return found

    def _detection(
        self, event_time_ms: int, watermark_ms: int, examples: int, window_examples: int, window_loss: float
    ) -> DriftDetection:
        """Describe the detection just made, from the window before the cut and the part kept."""
        recent_examples = self.width
        recent_loss = self._adwin.total * MAX_LOSS
        older_examples = window_examples - recent_examples
        older_mean_loss = (window_loss - recent_loss) / older_examples if older_examples else math.nan
        recent_mean_loss = recent_loss / recent_examples if recent_examples else math.nan
        detection = DriftDetection(
            model=self.model, watermark_ms=watermark_ms, event_time_ms=event_time_ms, detected_at=time.time(),
            examples=examples, direction="fall" if recent_mean_loss < older_mean_loss else "rise",
            older_examples=older_examples, older_mean_loss=older_mean_loss,
            recent_examples=recent_examples, recent_mean_loss=recent_mean_loss,
        )
        logger.warning(
            "drift detected in prequential log loss model=%s detector=%s direction=%s watermark=%s event_time=%s "
            "detected_at=%s examples=%d older_examples=%d older_mean_loss=%.4f recent_examples=%d "
            "recent_mean_loss=%.4f delta=%g",
            self.model, DETECTOR, detection.direction, _iso(watermark_ms / 1000), _iso(event_time_ms / 1000),
            _iso(detection.detected_at), examples, older_examples, older_mean_loss, recent_examples,
            recent_mean_loss, self.delta,
        )
        return detection

    def _publish(self, found: list[DriftDetection], watermark_ms: int) -> None:
        if found:
            self.detection_count += len(found)
            self.last_detection = found[-1]
        m = self.metrics
        if m is None:
            return
        series = (self.model, DETECTOR)
        for detection in found:
            m.drift_detections.labels(*series, detection.direction).inc()
        if found:
            m.drift_last_detection.labels(*series).set(watermark_ms / 1000)
        if self.width:
            m.drift_estimate.labels(*series).set(self.estimate)


def _check_batch(labels: np.ndarray, scores: np.ndarray, event_time_ms: np.ndarray) -> None:
    """Raise EvaluationInputError unless the arrays have one length and every score is finite."""
    lengths = {"labels": len(labels), "scores": len(scores), "event_time_ms": len(event_time_ms)}
    if len(set(lengths.values())) > 1:
        raise EvaluationInputError(f"drift detector input arrays differ in length: {lengths}")
    if not np.isfinite(np.asarray(scores, dtype=np.float64)).all():
        raise EvaluationInputError(
            "drift detector scores must be finite probabilities; a NaN or infinite score would "
            "corrupt the detector's window"
        )


def _iso(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
