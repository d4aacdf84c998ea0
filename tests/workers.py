"""Worker processes for end-to-end tests: environment, start, wait, stop, and what they leave behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from streamer.broker import parent_death_signal
from streamer.settings import Settings

# Seconds a worker gets to stop after SIGTERM; its final checkpoint takes well under one.
STOP_TIMEOUT_SECONDS = 60
# Seconds to wait for the workers to start, to consume the replay, or to serve a version.
WAIT_TIMEOUT_SECONDS = 90
POLL_SECONDS = 0.5


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def worker_env(
    settings: Settings, source: Path, updater_port: int, inference_port: int, partitions: int, **extra: str
) -> dict[str, str]:
    """Environment of a worker process: the settings' broker, topics and folders, fast exports, and ``extra``."""
    topics = settings.topics
    env = dict(os.environ)
    env.update({
        "STREAMER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMER_EMBEDDED_BROKER": "1" if settings.embedded_broker else "0",
        "STREAMER_DATA_DIR": str(settings.data_dir),
        "STREAMER_SOURCE_CHECKPOINT": str(source),
        "STREAMER_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMER_PARTITIONS": str(partitions),
        "STREAMER_TOPIC_TRANSACTIONS": topics.transactions,
        "STREAMER_TOPIC_LABELS": topics.labels,
        "STREAMER_TOPIC_DEAD_LETTER": topics.dead_letter,
        "STREAMER_TOPIC_MODEL_SNAPSHOTS": topics.model_snapshots,
        "STREAMER_TOPIC_FRAUD_SCORES": topics.fraud_scores,
        "STREAMER_UPDATER_METRICS_PORT": str(updater_port),
        "STREAMER_INFERENCE_METRICS_PORT": str(inference_port),
        # Free ports, so that parallel test runs on one machine do not collide.
        "STREAMER_UPDATER_HTTP_PORT": "0",
        "STREAMER_INFERENCE_HTTP_PORT": "0",
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
    env.update(extra)
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
