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
import socket
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

import helpers
from workers import free_port, run_command, start_worker, stop_worker, wait_until, worker_env
from exporters import SnapshotStore
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


def read_metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def declared_metric_names(text: str) -> set[str]:
    """Names on the exposition's "# TYPE" lines; a labelled metric has one before its first sample."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


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


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord]:
    return await helpers.read_topic(settings, topic, PARTITIONS)


@pytest.fixture(scope="module")
def pipeline_run(settings_factory, handbook_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    settings = settings_factory("end-to-end").replace(partitions=PARTITIONS)
    logs = tmp_path_factory.mktemp("e2e-logs")
    source = tmp_path_factory.mktemp("e2e-models") / "source.pt"
    july = handbook_dir / "transactions-2018-07.csv.gz"
    updater_port, inference_port = free_port(), free_port()
    env = worker_env(settings, source, updater_port, inference_port, PARTITIONS)

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
