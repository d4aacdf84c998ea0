"""The whole pipeline as a user runs it: `streamer pretrain`, `update`, `serve` and `replay` as processes.

The order follows the README: pretrain a source model, start both workers, then replay,
which creates the topics if they are missing. Snapshots are exported every few
micro-batches, so that a replay of 4,000 July transactions yields several versions.
Labels follow their transactions by 2.4 hours of event time and the replay is paced, so
that training and exports go on while transactions are still being scored. The updater
is stopped first and the inference worker once it serves the updater's last version,
both with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

import helpers
from exporters import SnapshotStore
from streamer.broker import parent_death_signal
from streamer.demo import scrape
from streamer.replay import read_transactions
from streamer.settings import Settings, Topics

pytestmark = pytest.mark.e2e

PARTITIONS = 4
REPLAY_START = "2018-07-01"
REPLAY_TRANSACTIONS = 4000
# 2.4 hours of event time: labels of the first transactions arrive while later ones are replayed.
LABEL_DELAY_DAYS = 0.1
# 4,000 July transactions span about 10 hours of event time: about 10 s of replay.
REPLAY_SPEEDUP = 3600
# Seconds a worker gets to stop after SIGTERM; its final checkpoint takes well under one.
STOP_TIMEOUT_SECONDS = 60
# Seconds to wait for the workers to start, to consume the replay, or to serve a version.
WAIT_TIMEOUT_SECONDS = 90
POLL_SECONDS = 0.5

UPDATER_METRICS = (
    "streamer_events_consumed_total",
    "streamer_invalid_events_total",
    "streamer_labels_joined_total",
    "streamer_examples_trained_total",
    "streamer_microbatch_duration_seconds",
    "streamer_training_loss",
    "streamer_prequential_auc",
    "streamer_prequential_average_precision",
    "streamer_snapshots_exported_total",
    "streamer_export_duration_seconds",
    "streamer_updater_model_version",
)
INFERENCE_METRICS = (
    "streamer_events_consumed_total",
    "streamer_invalid_events_total",
    "streamer_inference_model_version",
    "streamer_inference_latency_seconds",
    "streamer_update_to_serving_delay_seconds",
    "streamer_scored_transactions_total",
)
SWAPPED_IN = re.compile(r"snapshot swapped in model=\S+ version=(\d+)")
# faust's log format puts the level in brackets: "[2018-07-01 00:00:00,000] [pid] [ERROR] ...".
ERROR_LINE = re.compile(r"\[(ERROR|CRITICAL)\]|Traceback")


@dataclass
class Worker:
    """A worker process, its log file and its metrics port."""

    name: str
    process: subprocess.Popen
    log: Path
    output: BinaryIO  # the log file, open for the process's stdout and stderr
    port: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class PipelineRun:
    """What the run recorded, for the tests to inspect."""

    topics: Topics
    store: SnapshotStore
    replay_code: int
    replayed_ids: list[int]
    metric_text: dict[str, str]  # worker name -> metrics exposition text, read before stopping
    metric_values: dict[str, dict[str, float]]
    listening: dict[str, set[tuple[str, int]]]  # worker name -> (address, port) it listens on
    metric_ports: dict[str, int]
    exit_codes: dict[str, int | None]
    leftover_processes: dict[str, list[int]]
    logs: dict[str, str]
    scores: list[ConsumerRecord]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def declared_metric_names(text: str) -> set[str]:
    """Names on the exposition's "# TYPE" lines; a labelled metric has one before its first sample."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes in a session (Linux /proc; zombies included)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while listing
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session_id:
            members.append(int(entry.name))
    return members


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(IPv4 address, port) of the TCP sockets that a process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A is TCP_LISTEN
                continue
            address, port = local.split(":")
            # IPv4 in little-endian hex; an IPv6 address is kept in hex, so it never equals 127.0.0.1.
            host = socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address
            listening.add((host, int(port, 16)))
    return listening


def worker_env(settings: Settings, source: Path, updater_port: int, inference_port: int) -> dict[str, str]:
    topics = settings.topics
    env = dict(os.environ)
    env.update({
        "STREAMER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMER_EMBEDDED_BROKER": "1" if settings.embedded_broker else "0",
        "STREAMER_DATA_DIR": str(settings.data_dir),
        "STREAMER_SOURCE_CHECKPOINT": str(source),
        "STREAMER_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMER_PARTITIONS": str(PARTITIONS),
        "STREAMER_TOPIC_TRANSACTIONS": topics.transactions,
        "STREAMER_TOPIC_LABELS": topics.labels,
        "STREAMER_TOPIC_DEAD_LETTER": topics.dead_letter,
        "STREAMER_TOPIC_MODEL_SNAPSHOTS": topics.model_snapshots,
        "STREAMER_TOPIC_FRAUD_SCORES": topics.fraud_scores,
        "STREAMER_UPDATER_METRICS_PORT": str(updater_port),
        "STREAMER_INFERENCE_METRICS_PORT": str(inference_port),
        # Small micro-batches and frequent exports: several snapshot versions from a short replay.
        "STREAMER_MICROBATCH_SIZE": "64",
        "STREAMER_EXPORT_EVERY_BATCHES": "5",
        "STREAMER_EXPORT_INTERVAL_SECONDS": "2",
        "STREAMER_CHECKPOINT_INTERVAL_SECONDS": "2",
        "STREAMER_LABEL_RELEASE_IDLE_SECONDS": "1",
        "STREAMER_MICROBATCH_MAX_AGE_SECONDS": "1",
        # Every version stays in the store, so that each one can be matched with the worker's log.
        "STREAMER_SNAPSHOT_RETENTION": "1000",
    })
    return env


def run_command(args: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "wb") as output:
        return subprocess.run([sys.executable, "-m", "streamer", *args], env=env, stdout=output,
                              stderr=subprocess.STDOUT, timeout=WAIT_TIMEOUT_SECONDS).returncode


def start_worker(name: str, command: str, env: dict[str, str], logs: Path, port: int) -> Worker:
    log = logs / f"{name}.log"
    output = open(log, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamer", command], env=env, stdout=output, stderr=subprocess.STDOUT,
        # Its own session, so that the test can find every process it leaves behind.
        start_new_session=True, preexec_fn=parent_death_signal,
    )
    return Worker(name, process, log, output, port)


def wait_until(condition, description: str, workers: list[Worker]) -> None:
    """Poll ``condition`` until it is true; fail if a worker exits or the wait times out."""
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while not condition():
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"{worker.name} exited with code {worker.process.returncode} while waiting "
                                   f"for {description}:\n{worker.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {WAIT_TIMEOUT_SECONDS} s waiting for {description}")
        time.sleep(POLL_SECONDS)


ORPHAN_GRACE_SECONDS = 3.0


def stop_worker(worker: Worker) -> tuple[int | None, list[int]]:
    """SIGTERM the worker; return its exit code (None if it had to be killed) and the pids left in its session."""
    worker.process.send_signal(signal.SIGTERM)
    try:
        code = worker.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()
        code = None
    worker.output.close()
    # multiprocessing's resource tracker (started with the export process) exits when it
    # reads end-of-file from its parent, a moment after the worker: allow it that moment.
    deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
    while session_members(worker.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return code, session_members(worker.process.pid)


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord]:
    return await helpers.read_topic(settings, topic, PARTITIONS)


@pytest.fixture(scope="module")
def pipeline_run(settings_factory, handbook_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    settings = settings_factory("end-to-end").replace(partitions=PARTITIONS)
    logs = tmp_path_factory.mktemp("e2e-logs")
    source = tmp_path_factory.mktemp("e2e-models") / "source.pt"
    july = handbook_dir / "transactions-2018-07.csv.gz"
    updater_port, inference_port = free_port(), free_port()
    env = worker_env(settings, source, updater_port, inference_port)

    # 1. The source model: eight April days, the last seven of them for validation.
    code = run_command(["pretrain", str(handbook_dir / "transactions-2018-04.csv.gz"), "--start", "2018-04-01",
                        "--end", "2018-04-09", "--epochs", "1", "--output", str(source)], env, logs / "pretrain.log")
    assert code == 0, (logs / "pretrain.log").read_text()

    # 2. Both workers, before any topic exists.
    workers = {
        "updater": start_worker("updater", "update", env, logs, updater_port),
        "inference": start_worker("inference", "serve", env, logs, inference_port),
    }
    running = list(workers.values())
    try:
        wait_until(lambda: scrape(inference_port).get("streamer_inference_model_version", 0) >= 1,
                   "the inference worker to serve the initial snapshot", running)

        # 3. The replay, as a user runs it.
        replay_code = run_command(
            ["replay", str(july), "--start", REPLAY_START, "--limit", str(REPLAY_TRANSACTIONS),
             "--label-delay-days", str(LABEL_DELAY_DAYS), "--speedup", str(REPLAY_SPEEDUP)],
            env, logs / "replay.log",
        )
        assert replay_code == 0, (logs / "replay.log").read_text()

        def consumed_everything() -> bool:
            up, inf = scrape(updater_port), scrape(inference_port)
            return (up.get("streamer_examples_trained_total", 0) >= REPLAY_TRANSACTIONS
                    and inf.get("streamer_scored_transactions_total", 0) >= REPLAY_TRANSACTIONS)

        wait_until(consumed_everything, "both workers to consume the replay", running)
        metric_text = {name: read_metrics_text(worker.port) for name, worker in workers.items()}
        listening = {name: listening_addresses(worker.process.pid) for name, worker in workers.items()}
        metric_values = {name: scrape(worker.port) for name, worker in workers.items()}

        # 4. Stop the updater first; it announces an export still running before it exits.
        exit_codes, leftovers = {}, {}
        exit_codes["updater"], leftovers["updater"] = stop_worker(workers["updater"])
        running.remove(workers["updater"])
        store = SnapshotStore(settings.snapshot_dir, settings.model_name, 1000)
        newest = max(store.versions())
        wait_until(lambda: scrape(inference_port).get("streamer_inference_model_version", 0) >= newest,
                   f"the inference worker to serve version {newest}", running)
        exit_codes["inference"], leftovers["inference"] = stop_worker(workers["inference"])
        running.remove(workers["inference"])
    finally:
        for worker in running:
            worker.process.kill()
            worker.process.wait()
            worker.output.close()

    rows = read_transactions([july], start=REPLAY_START)
    return PipelineRun(
        topics=settings.topics, store=store, replay_code=replay_code,
        replayed_ids=[row.transaction_id for _, row in zip(range(REPLAY_TRANSACTIONS), rows)],
        metric_text=metric_text, metric_values=metric_values, listening=listening,
        metric_ports={name: worker.port for name, worker in workers.items()},
        exit_codes=exit_codes, leftover_processes=leftovers,
        logs={name: worker.log_text() for name, worker in workers.items()},
        scores=asyncio.run(read_topic(settings, settings.topics.fraud_scores)),
    )


# -- snapshots -------------------------------------------------------------------------------


def test_updater_exports_several_versions(pipeline_run: PipelineRun):
    assert len(pipeline_run.store.versions()) > 2


def test_exported_versions_are_consecutive(pipeline_run: PipelineRun):
    versions = pipeline_run.store.versions()
    assert versions == list(range(1, len(versions) + 1))


def test_inference_swaps_in_every_version(pipeline_run: PipelineRun):
    swapped = [int(v) for v in SWAPPED_IN.findall(pipeline_run.logs["inference"])]
    assert swapped == pipeline_run.store.versions()


def test_later_transactions_scored_by_newer_versions(pipeline_run: PipelineRun):
    # Versions are read per score in the order the transactions were replayed.
    by_id = {orjson.loads(r.value)["transaction_id"]: orjson.loads(r.value)["model_version"]
             for r in pipeline_run.scores}
    versions = [by_id[tx_id] for tx_id in pipeline_run.replayed_ids]
    assert len(set(versions)) > 1


# -- scores ----------------------------------------------------------------------------------


def test_every_replayed_transaction_scored_once(pipeline_run: PipelineRun):
    counts = Counter(orjson.loads(r.value)["transaction_id"] for r in pipeline_run.scores)
    assert counts == Counter(pipeline_run.replayed_ids)


def test_scores_are_probabilities(pipeline_run: PipelineRun):
    scores = [orjson.loads(r.value)["score"] for r in pipeline_run.scores]
    assert min(scores) >= 0
    assert max(scores) <= 1


def test_replay_exits_zero(pipeline_run: PipelineRun):
    assert pipeline_run.replay_code == 0


# -- metrics endpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("name", UPDATER_METRICS)
def test_updater_endpoint_serves_metric(pipeline_run: PipelineRun, name: str):
    assert name in declared_metric_names(pipeline_run.metric_text["updater"])


@pytest.mark.parametrize("name", INFERENCE_METRICS)
def test_inference_endpoint_serves_metric(pipeline_run: PipelineRun, name: str):
    assert name in declared_metric_names(pipeline_run.metric_text["inference"])


def test_updater_metrics_count_the_replay(pipeline_run: PipelineRun):
    values = pipeline_run.metric_values["updater"]
    topics = pipeline_run.topics
    assert values[f"streamer_events_consumed_total{{topic={topics.transactions}}}"] == REPLAY_TRANSACTIONS
    assert values[f"streamer_events_consumed_total{{topic={topics.labels}}}"] == REPLAY_TRANSACTIONS
    assert values["streamer_labels_joined_total"] == REPLAY_TRANSACTIONS
    assert values["streamer_examples_trained_total"] == REPLAY_TRANSACTIONS


def test_updater_reports_prequential_quality(pipeline_run: PipelineRun):
    values = pipeline_run.metric_values["updater"]
    for model in ("live", "source"):
        assert 0 <= values[f"streamer_prequential_auc{{model={model}}}"] <= 1, model
        assert 0 <= values[f"streamer_prequential_average_precision{{model={model}}}"] <= 1, model


def test_inference_metrics_count_the_replay(pipeline_run: PipelineRun):
    values = pipeline_run.metric_values["inference"]
    assert values["streamer_scored_transactions_total"] == REPLAY_TRANSACTIONS


def test_inference_observes_update_to_serving_delay(pipeline_run: PipelineRun):
    values = pipeline_run.metric_values["inference"]
    assert values["streamer_update_to_serving_delay_seconds_count"] >= 2


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_worker_listens_on_loopback_only(pipeline_run: PipelineRun, worker: str):
    hosts = {host for host, _ in pipeline_run.listening[worker]}
    assert hosts == {"127.0.0.1"}


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_worker_serves_metrics_on_its_port(pipeline_run: PipelineRun, worker: str):
    ports = {port for _, port in pipeline_run.listening[worker]}
    assert pipeline_run.metric_ports[worker] in ports


# -- shutdown --------------------------------------------------------------------------------


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_worker_exits_zero_on_sigterm(pipeline_run: PipelineRun, worker: str):
    assert pipeline_run.exit_codes[worker] == 0, pipeline_run.logs[worker][-3000:]


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_worker_leaves_no_process_behind(pipeline_run: PipelineRun, worker: str):
    assert pipeline_run.leftover_processes[worker] == []


@pytest.mark.parametrize("worker", ["updater", "inference"])
def test_worker_logs_no_error(pipeline_run: PipelineRun, worker: str):
    errors = [line for line in pipeline_run.logs[worker].splitlines() if ERROR_LINE.search(line)]
    assert errors == []
