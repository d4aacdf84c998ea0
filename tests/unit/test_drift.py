"""LossDriftDetector: detections on synthetic and real streams, metrics, log line, settings."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from river.drift import ADWIN

import helpers
from helpers import Record
from streamer.drift import MAX_LOSS, LossDriftDetector, log_loss
from streamer.errors import ConfigurationError
from streamer.evaluation import EvaluationInputError
from streamer.events import label_event, transaction_event
from streamer.metrics import UpdaterMetrics
from streamer.model import load_feature_state, load_model_checkpoint
from streamer.pipeline import UpdaterPipeline
from streamer.settings import Settings

DAY_MS = 86_400_000
START_MS = 1_530_403_200_000  # 2018-07-01T00:00:00Z
FLIP_AT = 20_000  # examples before the labels of the synthetic stream are flipped
BATCH = 1_000
SERIES = {"model": "live", "detector": "adwin"}
RISES = {**SERIES, "direction": "rise"}
FALLS = {**SERIES, "direction": "fall"}


def _stream(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Labels and calibrated scores: each label is 1 with the probability its score gives."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(0.5, 20.0, size=n).astype(np.float32)
    labels = (rng.random(n) < scores).astype(np.int8)
    return labels, scores


def _flipped_stream(n: int = 2 * FLIP_AT) -> tuple[np.ndarray, np.ndarray]:
    """The stream of `_stream` with every label from position FLIP_AT on inverted."""
    labels, scores = _stream(n)
    labels[FLIP_AT:] = 1 - labels[FLIP_AT:]
    return labels, scores


def _feed(detector: LossDriftDetector, labels: np.ndarray, scores: np.ndarray, batch: int = BATCH) -> list:
    """Feed the stream in batches, one example per second of event time; return every detection."""
    times = START_MS + 1000 * np.arange(len(labels), dtype=np.int64)
    found = []
    for lo in range(0, len(labels), batch):
        hi = min(lo + batch, len(labels))
        found += detector.update(labels[lo:hi], scores[lo:hi], times[lo:hi], int(times[hi - 1]))
    return found


# --- log loss ---------------------------------------------------------------------------------


def test_log_loss_of_label_and_score():
    losses = log_loss(np.array([1, 0]), np.array([0.25, 0.25]))

    assert losses[0] == pytest.approx(-math.log(0.25))
    assert losses[1] == pytest.approx(-math.log(0.75))


def test_log_loss_clips_certain_wrong_scores():
    losses = log_loss(np.array([1, 0]), np.array([0.0, 1.0]))

    assert losses[0] == pytest.approx(MAX_LOSS)
    assert losses[1] == pytest.approx(MAX_LOSS)


# --- detections on synthetic streams --------------------------------------------------------------


def test_detector_quiet_on_stationary_stream():
    detector = LossDriftDetector()

    found = _feed(detector, *_stream(2 * FLIP_AT))

    assert found == []


def test_detector_fires_after_labels_flip():
    detector = LossDriftDetector()

    found = _feed(detector, *_flipped_stream())

    assert len(found) >= 1
    assert found[0].examples > FLIP_AT


def test_detection_reports_loss_before_and_after():
    found = _feed(LossDriftDetector(), *_flipped_stream())
    first = found[0]

    assert first.older_mean_loss < 0.2
    assert first.recent_mean_loss > 1.0
    assert first.older_examples > FLIP_AT // 2
    assert first.direction == "rise"


def test_detection_direction_fall_when_loss_drops():
    labels, scores = _flipped_stream()
    # Inverted labels first, then the calibrated ones: the loss falls at FLIP_AT.
    found = _feed(LossDriftDetector(), labels[::-1].copy(), scores[::-1].copy())
    after_change = [d for d in found if d.examples > FLIP_AT]

    assert after_change[0].direction == "fall"
    assert after_change[0].recent_mean_loss < after_change[0].older_mean_loss


def test_detection_times_are_watermark_and_example():
    found = _feed(LossDriftDetector(), *_flipped_stream())
    first = found[0]

    assert first.event_time_ms == START_MS + 1000 * (first.examples - 1)
    assert first.watermark_ms >= first.event_time_ms


def test_detections_match_river_adwin_fed_directly():
    """The batched bookkeeping reports the detections of a plain ADWIN fed value by value."""
    labels, scores = _flipped_stream()
    reference, expected = ADWIN(), []
    for i, value in enumerate((log_loss(labels, scores) / MAX_LOSS).tolist()):
        width_before = 0 if reference.drift_detected else reference.width
        reference.update(value)
        if reference.drift_detected:
            expected.append((i + 1, width_before + 1 - reference.width, reference.width))

    found = _feed(LossDriftDetector(), labels, scores, batch=137)

    assert [(d.examples, d.older_examples, d.recent_examples) for d in found] == expected


def test_detections_independent_of_batch_size():
    """Only the watermark (the newest time of each batch) and the wall clock depend on batching."""
    labels, scores = _flipped_stream()

    def detections_in_batches_of(batch: int) -> list:
        found = _feed(LossDriftDetector(), labels, scores, batch=batch)
        return [dataclasses.replace(d, detected_at=0.0, watermark_ms=0) for d in found]

    assert detections_in_batches_of(1_000) == detections_in_batches_of(61)


def test_estimate_is_mean_loss_of_window():
    labels, scores = _stream(500)
    detector = LossDriftDetector()

    _feed(detector, labels, scores)

    assert detector.estimate == pytest.approx(float(log_loss(labels, scores).mean()))


def test_estimate_nan_before_first_example():
    assert math.isnan(LossDriftDetector().estimate)


def test_update_rejects_non_finite_score():
    detector = LossDriftDetector()

    with pytest.raises(EvaluationInputError, match="finite"):
        detector.update(np.array([0, 1]), np.array([0.1, np.nan]), np.array([START_MS, START_MS]), START_MS)

    assert detector.examples == 0


def test_update_rejects_arrays_of_different_lengths():
    with pytest.raises(EvaluationInputError, match="differ in length"):
        LossDriftDetector().update(np.array([0, 1]), np.array([0.1]), np.array([START_MS, START_MS]), START_MS)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 2.0])
def test_detector_rejects_delta_outside_unit_interval(delta):
    with pytest.raises(ConfigurationError, match="STREAMER_DRIFT_DELTA"):
        LossDriftDetector(delta)


# --- metrics and log line ------------------------------------------------------------------------


@pytest.mark.parametrize("series", [RISES, FALLS])
def test_detections_total_exported_at_zero(series):
    registry = CollectorRegistry()
    LossDriftDetector(metrics=UpdaterMetrics(registry))

    assert registry.get_sample_value("streamer_drift_detections_total", series) == 0


def test_detection_moves_metrics():
    registry = CollectorRegistry()
    detector = LossDriftDetector(metrics=UpdaterMetrics(registry))

    found = _feed(detector, *_flipped_stream())
    rises = [d for d in found if d.direction == "rise"]

    assert registry.get_sample_value("streamer_drift_detections_total", RISES) == len(rises)
    assert registry.get_sample_value("streamer_drift_detections_total", FALLS) == len(found) - len(rises)
    assert registry.get_sample_value(
        "streamer_drift_last_detection_timestamp_seconds", SERIES
    ) == found[-1].watermark_ms / 1000
    assert registry.get_sample_value("streamer_drift_estimate", SERIES) == pytest.approx(detector.estimate)


def test_estimate_gauge_follows_stationary_stream():
    registry = CollectorRegistry()
    detector = LossDriftDetector(metrics=UpdaterMetrics(registry))

    _feed(detector, *_stream(5_000))

    assert registry.get_sample_value("streamer_drift_estimate", SERIES) == pytest.approx(detector.estimate)
    assert registry.get_sample_value("streamer_drift_last_detection_timestamp_seconds", SERIES) is None


def test_detection_log_line_carries_times(caplog):
    with caplog.at_level(logging.WARNING, logger="streamer.drift"):
        found = _feed(LossDriftDetector(), *_flipped_stream())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift detected")]
    first = found[0]
    watermark = np.datetime64(first.watermark_ms, "ms").astype(str) + "Z"

    assert len(lines) == len(found)
    assert f"watermark={watermark}" in lines[0]
    assert "detected_at=20" in lines[0]
    assert f"older_examples={first.older_examples}" in lines[0]
    assert "direction=rise" in lines[0]


# --- settings --------------------------------------------------------------------------------------


def test_drift_delta_read_from_environment():
    settings = Settings.from_env({"STREAMER_DRIFT_DELTA": "0.01"})

    assert settings.drift_delta == 0.01


def test_drift_delta_outside_unit_interval_rejected():
    with pytest.raises(ConfigurationError, match="STREAMER_DRIFT_DELTA"):
        Settings(drift_delta=1.5)


# --- the updater pipeline on handbook transactions ----------------------------------------------


FLIP_DAY_MS = START_MS + 2 * DAY_MS  # 2018-07-03T00:00:00Z: labels from here on are inverted
LABEL_DELAY_MS = DAY_MS


def _handbook_records_flipped(unlabelled_every: int = 0) -> list[Record]:
    """July 1-4 transactions and their labels one day later, labels inverted from FLIP_DAY_MS on.

    With ``unlabelled_every`` n > 0, every n-th transaction gets no label.
    """
    data = helpers.read_handbook_transactions(("2018-07",), "2018-07-05")
    events = []
    for i in range(len(data)):
        time_ms, tx = int(data.event_time_ms[i]), int(data.transaction_id[i])
        fraud = int(data.fraud[i]) if time_ms < FLIP_DAY_MS else 1 - int(data.fraud[i])
        events.append((time_ms, 1, "transactions", transaction_event(
            tx, time_ms, int(data.customer_id[i]), int(data.terminal_id[i]), float(data.amount[i]))))
        if unlabelled_every and i % unlabelled_every == 0:
            continue
        events.append((time_ms + LABEL_DELAY_MS, 0, "labels", label_event(tx, time_ms + LABEL_DELAY_MS, fraud)))
    events.sort(key=lambda e: (e[0], e[1]))
    offsets = {"transactions": 0, "labels": 0}
    records = []
    for _, _, topic, event in events:
        records.append(Record(topic, 0, offsets[topic], b"0", orjson.dumps(event)))
        offsets[topic] += 1
    return records


def _record_detections(detector: LossDriftDetector) -> list:
    """Keep every detection that ``detector.update`` returns in the list returned here."""
    found = []
    update = detector.update

    def recording_update(*args):
        result = update(*args)
        found.extend(result)
        return result

    detector.update = recording_update
    return found


@pytest.mark.usefixtures("one_torch_thread", "handbook_dir")
def test_pipeline_detects_flipped_handbook_labels(source_path: Path, tmp_path: Path):
    source = load_model_checkpoint(source_path)
    registry = CollectorRegistry()
    settings = Settings(data_dir=tmp_path, label_release_idle_seconds=3600.0)
    pipeline = UpdaterPipeline(settings, source, UpdaterMetrics(registry), load_feature_state(source_path, source))
    found = _record_detections(pipeline.drift)
    records = _handbook_records_flipped()

    for lo in range(0, len(records), 4000):
        pipeline.process(records[lo:lo + 4000])

    assert len(found) >= 1
    assert [d for d in found if d.event_time_ms < FLIP_DAY_MS] == []
    assert min(d.watermark_ms for d in found) >= FLIP_DAY_MS + LABEL_DELAY_MS
    assert found[0].direction == "rise"
    assert found[0].recent_mean_loss > found[0].older_mean_loss
    assert registry.get_sample_value("streamer_drift_detections_total", RISES) + registry.get_sample_value(
        "streamer_drift_detections_total", FALLS
    ) == len(found)


@pytest.mark.usefixtures("one_torch_thread", "handbook_dir")
def test_pipeline_feeds_detector_judged_examples_only(source_path: Path, tmp_path: Path):
    """The detector receives the examples that the prequential evaluation judges, and no expired ones."""
    source = load_model_checkpoint(source_path)
    settings = Settings(data_dir=tmp_path, label_release_idle_seconds=3600.0, label_deadline_days=2.0)
    registry = CollectorRegistry()
    pipeline = UpdaterPipeline(settings, source, UpdaterMetrics(registry), load_feature_state(source_path, source))
    records = _handbook_records_flipped(unlabelled_every=3)

    for lo in range(0, len(records), 4000):
        pipeline.process(records[lo:lo + 4000])

    assert registry.get_sample_value("streamer_labels_expired_total", {"policy": "genuine"}) > 0
    assert pipeline.counters["examples"] > pipeline.rolling_live.total_count
    assert pipeline.drift.examples > 0
    assert pipeline.drift.examples == pipeline.rolling_live.total_count
