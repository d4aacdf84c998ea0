"""`streamer demo`: the whole pipeline on real transactions, with one command.

Steps: 1. start the embedded broker (unless a bootstrap is given) and create the topics;
2. pretrain the source model on April-June; 3. start the updater and the inference worker
as child processes (real faust workers); 4. replay July-August as fast as possible, printing
progress from the workers' metrics endpoints; 5. wait until both workers have consumed
everything, stop them with SIGTERM; 6. report prequential quality of the live fine-tuned
model and of the frozen source model on the last week of the stream, and draw the chart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .broker import EmbeddedBroker, graceful_signals, parent_death_signal
from .dataset import DAY_MS, day_start_ms
from .errors import StreamerError
from .evaluation import PrequentialLog
from .model import ModelCheckpoint, load_model_checkpoint
from .kafka import ensure_topics
from .pretrain import PRETRAIN_FORMAT_VERSION, PretrainConfig, pretrain
from .replay import replay
from .report import format_key_value_table, format_metric_table, metric_rows, plot_rolling_average_precision
from .settings import Settings

logger = logging.getLogger(__name__)

# Seconds a worker gets to write its final checkpoint after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 60
# Seconds without progress after the replay before the demo gives up waiting for a worker.
STALL_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class DemoConfig:
    """Options of `streamer demo`."""

    data: list[Path]
    work_dir: Path
    limit: int | None = None
    pretrain_start: str = "2018-04-01"
    pretrain_end: str = "2018-07-01"
    replay_start: str = "2018-07-01"
    replay_end: str = "2018-09-01"


def _reusable_source(path: Path, config: DemoConfig) -> ModelCheckpoint | None:
    """Return the source model of an earlier run if it was trained on the same period of the same files."""
    try:
        checkpoint = load_model_checkpoint(path)
    except StreamerError:
        return None
    meta = checkpoint.metadata
    same_period = meta.get("training_period") == {"start": config.pretrain_start, "end": config.pretrain_end}
    same_files = meta.get("files") == [str(p.resolve()) for p in config.data]
    same_format = meta.get("format_version") == PRETRAIN_FORMAT_VERSION
    return checkpoint if same_period and same_files and same_format else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Read a metrics endpoint into {"name{label=value,...}": value}, or {} if it is unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


class Workers:
    """The updater and inference worker child processes of the demo."""

    def __init__(self, settings: Settings, source: Path, logs: Path) -> None:
        self.settings = settings
        self.updater_port = _free_port()
        self.inference_port = _free_port()
        env = dict(os.environ)
        env.update({
            "STREAMER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "STREAMER_EMBEDDED_BROKER": "1" if settings.embedded_broker else "0",
            "STREAMER_DATA_DIR": str(settings.data_dir),
            "STREAMER_SOURCE_CHECKPOINT": str(source),
            "STREAMER_UPDATER_METRICS_PORT": str(self.updater_port),
            "STREAMER_INFERENCE_METRICS_PORT": str(self.inference_port),
            # The demo reads no HTTP endpoint, so free ports keep it from colliding with running workers.
            "STREAMER_UPDATER_HTTP_PORT": os.environ.get("STREAMER_UPDATER_HTTP_PORT", "0"),
            "STREAMER_INFERENCE_HTTP_PORT": os.environ.get("STREAMER_INFERENCE_HTTP_PORT", "0"),
            "STREAMER_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
            "STREAMER_EXPORT_EVERY_BATCHES": str(settings.export_every_batches),
        })
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.processes = {
            name: subprocess.Popen(
                [sys.executable, "-m", "streamer", command],
                env=env,
                stdout=open(logs / f"{name}.log", "wb"),
                stderr=subprocess.STDOUT,
                preexec_fn=parent_death_signal,
            )
            for name, command in (("updater", "update"), ("inference", "serve"))
        }

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} worker exited with code {process.returncode}; see {self.logs}/{name}.log")

    def stop(self) -> None:
        """SIGTERM both, wait for their final checkpoint, kill what is left."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("the %s worker did not stop within %d s; killing it", name, STOP_TIMEOUT_SECONDS)
                process.kill()
                process.wait()


def run_demo(config: DemoConfig, settings: Settings) -> int:
    """Run the demo; return the process exit code."""
    work = config.work_dir.resolve()
    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)  # every run starts from the source model
    settings = settings.replace(data_dir=data_dir, consumer_group_prefix=f"demo-{int(time.time())}")
    started = time.monotonic()
    # SIGINT too: a demo started in the background of a script inherits SIGINT as ignored.
    with graceful_signals((signal.SIGTERM, signal.SIGINT)):
        if settings.kafka_bootstrap:
            return _run(config, settings, work, started)
        with EmbeddedBroker() as broker:
            return _run(config, settings.replace(kafka_bootstrap=broker.bootstrap, embedded_broker=True), work, started)


def _run(config: DemoConfig, settings: Settings, work: Path, started: float) -> int:
    print(f"[demo] broker {settings.kafka_bootstrap}; output in {work}", flush=True)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions))

    print(f"[demo] pretraining the source model on {config.pretrain_start} .. {config.pretrain_end} (exclusive)",
          flush=True)
    source_path = work / "models" / "source.pt"
    source = _reusable_source(source_path, config)
    if source is None:
        source = pretrain(PretrainConfig(
            paths=tuple(config.data), start=config.pretrain_start, end=config.pretrain_end, output=source_path,
        ))
    else:
        print(f"[demo] reusing the source model in {source_path} (delete it to pretrain again)", flush=True)
    m = source.metadata["metrics"]
    print(f"[demo] source model: validation AUC {m['validation_auc']:.3f}, AP {m['validation_average_precision']:.3f}, "
          f"{m['seconds']:.0f} s", flush=True)

    workers = Workers(settings, source_path, work / "logs")
    try:
        stats = asyncio.run(_replay_and_watch(config, settings, workers))
        final_updater = scrape(workers.updater_port)
        final_inference = scrape(workers.inference_port)
    finally:
        workers.stop()
    return _report(config, settings, work, stats, final_updater, final_inference, time.monotonic() - started)


async def _replay_and_watch(config: DemoConfig, settings: Settings, workers: Workers):
    print(f"[demo] replaying {config.replay_start} .. {config.replay_end} (exclusive) as fast as possible", flush=True)
    replay_task = asyncio.create_task(replay(
        config.data, bootstrap=settings.kafka_bootstrap, topics=settings.topics,
        start=config.replay_start, end=config.replay_end, limit=config.limit, progress=lambda *_: None,
    ))
    last_progress, last_seen = time.monotonic(), None
    began = time.monotonic()
    while True:
        await asyncio.sleep(2)
        workers.check_alive()
        up, inf = await asyncio.to_thread(scrape, workers.updater_port), await asyncio.to_thread(scrape, workers.inference_port)
        consumed_tx = up.get(f"streamer_events_consumed_total{{topic={settings.topics.transactions}}}", 0)
        consumed_lb = up.get(f"streamer_events_consumed_total{{topic={settings.topics.labels}}}", 0)
        scored = inf.get("streamer_scored_transactions_total", 0)
        _print_progress(time.monotonic() - began, consumed_tx, consumed_lb, scored, up, inf)
        seen = (consumed_tx, consumed_lb, scored, up.get("streamer_labels_joined_total", 0))
        if seen != last_seen:
            last_seen, last_progress = seen, time.monotonic()
        if replay_task.done():
            stats = replay_task.result()
            settled = up.get("streamer_labels_joined_total", 0) + sum(
                v for k, v in up.items() if k.startswith("streamer_labels_rejected_total")
            )
            if consumed_tx >= stats.transactions and settled >= stats.labels and scored >= stats.transactions:
                return stats
            if time.monotonic() - last_progress > STALL_TIMEOUT_SECONDS:
                raise RuntimeError(f"workers stopped making progress; see {workers.logs}")


def _print_progress(elapsed: float, tx: float, labels: float, scored: float, up: dict, inf: dict) -> None:
    auc = up.get("streamer_prequential_auc{model=live}")
    print(
        f"[demo] {elapsed:6.0f} s  updater: {tx:9,.0f} transactions {labels:9,.0f} labels "
        f"({(tx + labels) / max(elapsed, 1e-9):8,.0f} events/s), model v{up.get('streamer_updater_model_version', 0):.0f}, "
        f"rolling AUC {auc if auc is not None else float('nan'):.3f} | inference: {scored:9,.0f} scored, "
        f"serving v{inf.get('streamer_inference_model_version', 0):.0f}",
        flush=True,
    )


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


def _report(config, settings, work, stats, up, inf, seconds) -> int:
    log = PrequentialLog.load(settings.data_dir / "reports" / f"prequential-{settings.model_name}.npz")
    end_ms = day_start_ms(config.replay_end)
    last_event = int(log.arrays()["event_time_ms"].max()) if len(log) else end_ms
    week_end = min(end_ms, (last_event // DAY_MS + 1) * DAY_MS)
    week = log.summary(week_end - 7 * DAY_MS, week_end)
    counts = [
        ("transactions replayed", f"{stats.transactions:,}"),
        ("labels replayed", f"{stats.labels:,}"),
        ("labels joined", f"{up.get('streamer_labels_joined_total', 0):,.0f}"),
        ("micro-batches", f"{up.get('streamer_microbatches_total{outcome=applied}', 0):,.0f}"),
        ("snapshots published", f"{up.get('streamer_snapshots_exported_total', 0):,.0f}"),
        ("snapshots served", f"{inf.get('streamer_snapshots_loaded_total', 0):,.0f}"),
        ("transactions scored", f"{inf.get('streamer_scored_transactions_total', 0):,.0f}"),
        ("wall time", f"{seconds:,.0f} s"),
    ]
    print("\n" + format_key_value_table(counts), flush=True)
    print(f"\nPrequential quality on the last week of the stream ({_day(week_end - 7 * DAY_MS)} .. "
          f"{_day(week_end - DAY_MS)}, {week['rows']:,} transactions, {week['frauds']:,} frauds):", flush=True)
    print(format_metric_table(metric_rows(week)) + "\n", flush=True)
    chart = plot_rolling_average_precision(log.arrays(), work / "rolling-average-precision.png")
    (work / "report.json").write_text(json.dumps({"counts": dict(counts), "last_week": week}, indent=2, default=float))
    print(f"[demo] chart: {chart}\n[demo] report: {work / 'report.json'}\n[demo] logs: {work / 'logs'}", flush=True)
    return 0
