"""The embedded broker process: loopback only, clean stop, no orphan after its parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streamer.broker import EmbeddedBroker, kafka_bootstrap
from streamer.settings import Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and needs prctl"),
]

REPO = Path(__file__).resolve().parents[2]
# Seconds to wait for a process to disappear; generous for a loaded CI machine.
GONE_TIMEOUT_SECONDS = 15.0


def process_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_until_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """TCP addresses (host, port) on which the process has listening sockets."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    addresses = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addresses.add(_decode_address(local))
    return addresses


def _decode_address(hex_address: str) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    if len(host_hex) == 8:  # IPv4, little-endian
        host = ".".join(str(int(host_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        host = f"ipv6:{host_hex}"
    return host, int(port_hex, 16)


def start_child(code: str, temp_dir: Path) -> subprocess.Popen:
    """Start a Python child that runs ``code`` and prints the broker pid as its first line.

    The child's temporary files, among them the broker log that a killed child cannot
    remove, go to ``temp_dir``.
    """
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=dict(os.environ, TMPDIR=str(temp_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_broker_pid(child: subprocess.Popen) -> int:
    line = child.stdout.readline()
    if not line.strip().isdigit():
        child.kill()
        raise AssertionError(f"the child printed no broker pid: {line!r}; stderr: {child.stderr.read()}")
    return int(line)


def kill_if_alive(pid: int) -> None:
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_embedded_broker_listens_on_loopback_only():
    with EmbeddedBroker() as broker:
        port = int(broker.bootstrap.rsplit(":", 1)[1])
        addresses = listening_addresses(broker.pid)
    assert addresses == {("127.0.0.1", port)}


def test_embedded_broker_bootstrap_is_loopback():
    with EmbeddedBroker() as broker:
        host = broker.bootstrap.rsplit(":", 1)[0]
    assert host == "127.0.0.1"


def test_embedded_broker_stop_leaves_no_process():
    broker = EmbeddedBroker()
    broker.start()
    pid = broker.pid
    broker.stop()
    assert not process_alive(pid)


def test_embedded_broker_stop_twice_is_harmless():
    broker = EmbeddedBroker()
    broker.start()
    broker.stop()
    broker.stop()
    assert broker.pid is None


def test_embedded_broker_stop_removes_log_folder():
    with EmbeddedBroker() as broker:
        log_dir = broker.log_path.parent
    assert not log_dir.exists()


def test_embedded_broker_dies_with_killed_parent(tmp_path):
    child = start_child("""
        import time
        from streamer.broker import EmbeddedBroker
        broker = EmbeddedBroker()
        broker.start()
        print(broker.pid, flush=True)
        time.sleep(120)
    """, tmp_path)
    broker_pid = read_broker_pid(child)
    try:
        child.kill()  # SIGKILL: no atexit, no finally; only the parent-death signal is left
        child.wait()
        gone = wait_until_gone(broker_pid)
    finally:
        kill_if_alive(broker_pid)
        child.stdout.close()
        child.stderr.close()
    assert gone


def test_graceful_signals_sigterm_stops_broker(tmp_path):
    child = start_child("""
        import logging, time
        from streamer.broker import EmbeddedBroker, graceful_signals
        logging.basicConfig(level=logging.INFO)
        with graceful_signals(), EmbeddedBroker() as broker:
            print(broker.pid, flush=True)
            time.sleep(120)
    """, tmp_path)
    broker_pid = read_broker_pid(child)
    try:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=GONE_TIMEOUT_SECONDS)
        gone = wait_until_gone(broker_pid)
    finally:
        kill_if_alive(broker_pid)
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM
    assert "embedded broker stopped" in stderr
    assert gone


def test_kafka_bootstrap_without_setting_starts_embedded_broker():
    with kafka_bootstrap(Settings()) as bootstrap:
        host = bootstrap.rsplit(":", 1)[0]
    assert host == "127.0.0.1"
